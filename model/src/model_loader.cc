#include "model/model_loader.h"

#include "absl/strings/match.h"
#include "model/gguf_model.h"
#include "model/gguf_tokenizer.h"

namespace amoeba {

bool IsGgufPath(const std::string& path) {
  return absl::EndsWith(path, ".gguf");
}

absl::StatusOr<Model> LoadModelOrGguf(const std::string& path) {
  return IsGgufPath(path) ? LoadGgufModel(path) : LoadModel(path);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadModelTokenizer(const std::string& model_path,
                                                              const std::string& tokenizer_dir) {
  if (!tokenizer_dir.empty()) return LoadTokenizer(tokenizer_dir);
  return IsGgufPath(model_path) ? LoadGgufTokenizer(model_path) : LoadTokenizer(model_path);
}

}  // namespace amoeba
