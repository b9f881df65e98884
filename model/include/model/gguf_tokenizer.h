// Tokenizers in GGUF files, both ways: a model's tokenizer written as llama.cpp's vocabulary
// metadata (SentencePiece → "llama", byte-level BPE → "gpt2"), and a GGUF file's vocabulary
// rebuilt as a tokenizer (the original file when Amoeba wrote it). The SentencePiece side writes
// and reads sentencepiece's ModelProto wire format by hand (a few varint and length-delimited
// fields), so the model library needs no protobuf.
#pragma once
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/gguf.h"
#include "model/tokenizer.h"
#include "model/weights.h"

namespace amoeba {

// Adds `dir`'s tokenizer (tokenizer.model or tokenizer.json) to `w` as GGUF vocabulary metadata,
// checked against `m`'s vocabulary size and special tokens; `embed` also keeps the original file
// under amoeba.tokenizer.* (which llama.cpp ignores).
absl::Status AddTokenizer(const Model& m, const std::string& dir, bool embed, GgufWriter& w);

// The tokenizer of a GGUF file: the original tokenizer.model / tokenizer.json when Amoeba wrote
// the file (kept under `amoeba.tokenizer.*`, which llama.cpp ignores), else rebuilt from
// llama.cpp's vocabulary: "llama" as a SentencePiece BPE model (pieces, scores, types; byte
// fallback, identity normalization, a dummy prefix: the Llama convention), "gpt2" as byte-level
// BPE (tokens and merges, GPT-2's pre-tokenizer). NOT_FOUND when the file has no vocabulary.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadGgufTokenizer(const std::string& path);
// The same tokenizer as a file in `dir` (tokenizer.model or tokenizer.json, written atomically).
absl::Status WriteGgufTokenizer(const std::string& path, const std::string& dir);

}  // namespace amoeba
