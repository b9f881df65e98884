// Trains a SentencePiece tokenizer (libsentencepiece's trainer) on a text file.
#pragma once
#include <string>

#include "absl/status/status.h"

namespace amoeba {

struct TokenizerTrainOptions {
  int vocab_size = 4096;
  std::string model_type = "bpe";  // "bpe" or "unigram"
  bool byte_fallback = true;       // unknown characters become byte tokens, as in Llama's tokenizer
  int max_sentences = 200000;
};

// Writes `out_dir`/tokenizer.model; ids: 0 <unk>, 1 <s>, 2 </s> (the Llama convention).
absl::Status TrainSentencePiece(const std::string& text_file, const std::string& out_dir,
                                const TokenizerTrainOptions& options = {});

}  // namespace amoeba
