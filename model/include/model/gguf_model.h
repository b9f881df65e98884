// A Model as a GGUF file for llama.cpp, and back. Uniform widths are written as architecture
// `llama`; per-layer widths as `deci` (llama.cpp's architecture for NAS-pruned LLaMA models),
// whose per-layer arrays `attention.head_count`, `attention.head_count_kv` and
// `feed_forward_length` carry a subnet's shape and whose optional `attn_output` / `ffn_down`
// biases carry its compensation biases. A layer whose heads (or channels) are all pruned is written
// as one zero-weight KV group (or one zero channel) plus its bias: llama.cpp's deci graph drops
// both the attention output and the bias of a head-free layer, and skips the whole layer when
// feed_forward_length is 0. q/k rows are permuted from Hugging Face's rotate-half order to the
// interleaved pairs llama.cpp rotates.
#pragma once
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/tokenizer.h"
#include "model/weight_format.h"
#include "model/weights.h"

namespace amoeba {

struct GgufExportOptions {
  // Projections, embedding and LM head; rows whose length is not a multiple of 32 (odd per-layer
  // channel counts) fall back to f16 in the block formats. Norms and biases are always f32.
  WeightFormat format = WeightFormat::kF16;
  std::string name = "amoeba-subnet";  // general.name
  // Directory holding tokenizer.json (byte-level BPE → "gpt2") or tokenizer.model (SentencePiece
  // → "llama"); empty = no tokenizer metadata.
  std::string tokenizer_dir;
  // Also keep the original tokenizer file (amoeba.tokenizer.model / .json): LoadGgufTokenizer
  // then reads it exactly instead of rebuilding it from llama.cpp's vocabulary.
  bool embed_tokenizer = true;
};

// Writes `m` to `path` atomically.
absl::Status SaveGguf(const Model& m, const std::string& path, const GgufExportOptions& o = {});

// Reads a llama or deci GGUF file (F32, F16, Q8_0, Q4_0 tensors, dequantized to fp32).
absl::StatusOr<Model> LoadGgufModel(const std::string& path);

// Bytes of the tensor data SaveGguf writes for `m` in `format` (aligned, f16 fallbacks and
// zero groups included; the header with the tokenizer comes on top).
int64_t GgufTensorBytes(const Model& m, WeightFormat format);

// The architecture SaveGguf would write for `m`: "llama" or "deci".
std::string GgufArchitectureFor(const Model& m);

}  // namespace amoeba
