// Export of one shape as a standalone Hugging Face directory (design §3).
#pragma once
#include <string>

#include "absl/status/status.h"
#include "subnet/supernet.h"

namespace amoeba {

struct ExportOptions {
  // Same fraction of heads/channels in every layer: a standard LlamaForCausalLM checkpoint
  // (biases written for all projections, zeros where there is no compensation).
  bool uniform_width = false;
  at::ScalarType dtype = at::kFloat;
};

// The sliced subnet, with LoRA already merged if the caller passes a merged model.
absl::StatusOr<Model> SubnetForExport(const Supernet& s, const Shape& shape,
                                      const ExportOptions& o);

// Writes config.json, model.safetensors and the tokenizer into `out_dir` atomically (a temp
// directory renamed into place).
absl::Status WriteExport(const Supernet& s, const Model& subnet, const std::string& out_dir,
                         const ExportOptions& o);

}  // namespace amoeba
