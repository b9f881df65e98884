#include "model/tokenizer_train.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "model/sentencepiece_bridge.h"

namespace amoeba {
namespace fs = std::filesystem;

absl::Status TrainSentencePiece(const std::string& text_file, const std::string& out_dir,
                                const TokenizerTrainOptions& o) {
  if (!fs::exists(text_file)) return absl::NotFoundError(absl::StrCat(text_file, ": not found"));
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  const std::string tmp_prefix = (fs::path(out_dir) / ".tokenizer.training").string();
  const std::string args = absl::StrCat(
      "--input=", text_file, " --model_prefix=", tmp_prefix, " --vocab_size=", o.vocab_size,
      " --model_type=", o.model_type, " --byte_fallback=", o.byte_fallback ? "true" : "false",
      " --character_coverage=0.9995 --input_sentence_size=", o.max_sentences,
      " --shuffle_input_sentence=true --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1",
      " --split_digits=true --allow_whitespace_only_pieces=true --remove_extra_whitespaces=false",
      " --minloglevel=2 --num_threads=2");
  std::string err;
  if (!sp::Train(args, &err)) return absl::InternalError(absl::StrCat("sentencepiece training: ", err));
  fs::rename(tmp_prefix + ".model", fs::path(out_dir) / "tokenizer.model", ec);
  fs::remove(tmp_prefix + ".vocab", ec);
  if (ec) return absl::InternalError(absl::StrCat("move tokenizer.model: ", ec.message()));
  return absl::OkStatus();
}

}  // namespace amoeba
