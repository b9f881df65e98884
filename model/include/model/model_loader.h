// A model given as either a Hugging Face directory or a .gguf file (told apart by the name):
// the model, and its tokenizer — from `tokenizer_dir` when given, else the directory's files or
// the one the .gguf file carries.
#pragma once
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/tokenizer.h"
#include "model/weights.h"

namespace amoeba {

bool IsGgufPath(const std::string& path);
absl::StatusOr<Model> LoadModelOrGguf(const std::string& path);
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadModelTokenizer(const std::string& model_path,
                                                              const std::string& tokenizer_dir);

}  // namespace amoeba
