// Causal attention of a run of new tokens (prefill) over their sequence's cache, blocked by query
// rows: a task is (KV head, block of up to kPrefillQueryBlock queries); it scores its queries
// against the keys they may see (one GEMM), takes a row-wise softmax over each row's own causal
// length in place, and multiplies by the values (a second GEMM). Working memory is one
// block × keys score buffer per thread, so the cost grows with the prompt as the arithmetic does:
// the batched form before it held every head's T × L scores (and as much again for the mask and
// the softmax), which past ~800 tokens on the 100m preset left the allocator's reusable heap
// (glibc maps blocks over 32 MB afresh, so each layer paid page faults on hundreds of MB) and
// fell off a 3x cliff.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "model/kernels.h"

namespace amoeba {

inline constexpr int64_t kPrefillQueryBlock = 64;

struct PrefillAttentionArgs {
  const float* q = nullptr;  // [T, q_stride]: query head h of row t at q + t*q_stride + h*hd
  int64_t q_stride = 0;
  // Keys and values as float: the row of position p and KV head h at k + h * kv_head_stride +
  // p * kv_row_stride (0: head_dim, each head's rows contiguous), positions [0, p0 + T).
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t kv_head_stride = 0;
  int64_t kv_row_stride = 0;
  int64_t kv_heads = 0, group = 1, head_dim = 0;
  int64_t p0 = 0;  // tokens already in the cache before this run
  int64_t T = 0;   // new tokens
  float scale = 1.f;
  float* out = nullptr;  // [T, out_stride], laid out as q
  int64_t out_stride = 0;
  // Both products from bf16 inputs with fp32 sums where a bf16 kernel runs (below); the softmax
  // and the output stay fp32. Else fp32 throughout.
  bool bf16 = false;
};

// The bf16 kernels and their choice: model/kernels.h (PrefillBf16Kernel).

// `scratch` is grown to what the call needs (threads × block × keys floats) and kept.
void PrefillAttention(const PrefillAttentionArgs& a, at::Tensor& scratch);

}  // namespace amoeba
