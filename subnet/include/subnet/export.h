// Export of one shape as a standalone Hugging Face directory (docs/supernet-format.md).
#pragma once
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "model/weight_format.h"
#include "subnet/subnet_builder.h"

namespace amoeba {

struct ExportOptions {
  // Same fraction of heads/channels in every layer: a standard LlamaForCausalLM checkpoint
  // (biases written for all projections, zeros where there is no compensation).
  bool uniform_width = false;
  at::ScalarType dtype = at::kFloat;
  // Merge the shape's SMoL adapters (when the supernet has them): the export is the tuned subnet
  // the server serves. false (`--no-adapters`) exports the base subnet.
  bool adapters = true;
  // A Hugging Face directory (WriteExport, in `dtype`) or one GGUF file (WriteGgufExport, in
  // `gguf_dtype`).
  enum class Format { kHf, kGguf };
  Format format = Format::kHf;
  WeightFormat gguf_dtype = WeightFormat::kF16;
};

// Sets `o`'s format and dtype from their names, as the CLI and the API spell them: format "hf"
// (or "") | "gguf"; dtype "" (the format's default: f32 for hf, f16 for gguf), for hf "f32" |
// "f16" | "bf16", for gguf "f32" | "f16" | "q8_0" | "q4_0". INVALID_ARGUMENT names "format" or
// "dtype".
absl::Status ParseExportFormat(std::string_view format, std::string_view dtype, ExportOptions& o);

// How BuildSubnet builds the subnet an export of `o` holds.
SubnetOptions SubnetOptionsForExport(const ExportOptions& o);

// The subnet as BuildSubnet makes it (adapters merged unless `o.adapters` is false), in the
// layout the export format needs.
absl::StatusOr<Model> SubnetForExport(const Supernet& s, const Smol* smol, const Shape& shape,
                                      const ExportOptions& o);

// Writes config.json, model.safetensors and the tokenizer into `out_dir` atomically (a temp
// directory renamed into place).
absl::Status WriteExport(const Supernet& s, const Model& subnet, const std::string& out_dir,
                         const ExportOptions& o);

// Writes `subnet` as one GGUF file for llama.cpp (model/gguf_model.h: llama for uniform widths,
// deci for per-layer ones) in `format`, with the supernet's tokenizer, atomically.
absl::Status WriteGgufExport(const Supernet& s, const Model& subnet, const Shape& shape,
                             const std::string& path, WeightFormat format);

}  // namespace amoeba
