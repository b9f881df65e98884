#include "model/tokenizer_train.h"

#include <spawn.h>
#include <sys/wait.h>

#include <filesystem>
#include <vector>

#include "absl/strings/str_cat.h"

extern char** environ;

namespace amoeba {
namespace fs = std::filesystem;

// Training runs Debian's spm_train in a child process: libsentencepiece's trainer cannot share a
// process with libtorch's protobuf (see sentencepiece_module.cc), and a child keeps its memory and
// logging out of ours.
absl::Status TrainSentencePiece(const std::string& text_file, const std::string& out_dir,
                                const TokenizerTrainOptions& o) {
  if (!fs::exists(text_file)) return absl::NotFoundError(absl::StrCat(text_file, ": not found"));
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  const std::string prefix = (fs::path(out_dir) / ".tokenizer.training").string();
  std::vector<std::string> args = {
      "spm_train",
      "--input=" + text_file,
      "--model_prefix=" + prefix,
      absl::StrCat("--vocab_size=", o.vocab_size),
      "--model_type=" + o.model_type,
      std::string("--byte_fallback=") + (o.byte_fallback ? "true" : "false"),
      "--character_coverage=0.9995",
      absl::StrCat("--input_sentence_size=", o.max_sentences),
      "--shuffle_input_sentence=true",
      "--unk_id=0",
      "--bos_id=1",
      "--eos_id=2",
      "--pad_id=-1",
      "--split_digits=true",
      "--hard_vocab_limit=false",  // small corpora: a smaller vocabulary instead of an error
      "--remove_extra_whitespaces=false",
      "--minloglevel=2",
      "--num_threads=2"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  if (posix_spawnp(&pid, "spm_train", nullptr, nullptr, argv.data(), environ) != 0) {
    return absl::FailedPreconditionError(
        "cannot run spm_train (install Debian's sentencepiece package)");
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return absl::InternalError(
        absl::StrCat("spm_train failed on ", text_file, " (status ", status, ")"));
  }
  fs::rename(prefix + ".model", fs::path(out_dir) / "tokenizer.model", ec);
  if (ec) return absl::InternalError(absl::StrCat("move tokenizer.model: ", ec.message()));
  fs::remove(prefix + ".vocab", ec);
  return absl::OkStatus();
}

}  // namespace amoeba
