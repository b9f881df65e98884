// Rotary position embedding tables with Hugging Face semantics (rotate-half convention;
// linear and llama3 frequency scaling). cos/sin are [max_len, head_dim/2], fp32.
#pragma once
#include <ATen/ATen.h>

#include "model/config.h"

namespace amoeba {

// inv_freq exactly as transformers computes it (fp32), including rope_scaling.
at::Tensor RopeInvFreq(const ModelConfig& c);

struct RopeTable {
  RopeTable() = default;
  RopeTable(const ModelConfig& c, int64_t max_len);
  at::Tensor cos, sin;  // [max_len, head_dim/2]
  int64_t max_len() const { return cos.defined() ? cos.size(0) : 0; }
};

// Applies rotate-half RoPE in place to `n_heads` heads of `x` ([head_dim] each, contiguous) for
// one token at position `pos`.
void ApplyRope(float* x, int64_t n_heads, int64_t head_dim, const RopeTable& t, int64_t pos);

}  // namespace amoeba
