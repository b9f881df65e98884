// Attention of one new token over its sequence's KV cache (the decode step), for a range of KV
// heads and the query heads that share each (GQA). The cache is position-major: the row of
// position p and KV head h lies at keys + p * row_stride + h * head_dim, so a sequence's layer is
// one run of memory however many positions it holds (a head-major layout with room to grow split
// it into one short run per head with gaps between, which the hardware prefetchers served at
// half the rate at short contexts). The AVX-512 path walks that run a 16-position window at a
// time, every head of the range within each window, scoring 16 keys per transposing reduction;
// other instruction sets and head sizes use the portable loop. Each query head's result does not
// depend on which other heads share the call.
#pragma once
#include <c10/util/Half.h>

#include <cstdint>

namespace amoeba {

// Scratch floats one query head needs for contexts of up to `max_len` positions.
int64_t DecodeAttentionScratchPerHead(int64_t max_len);

// out[qh] = softmax(q[qh] · keys_h^T · scale) · values_h for the kv_heads * group query heads
// qh = h * group + g (h < kv_heads: the range's heads, counted from `keys`' first).
// q, out: [kv_heads * group, head_dim] contiguous; keys, values: the range's first head at
// position 0; row_stride >= kv_heads * head_dim; scratch: kv_heads * group *
// DecodeAttentionScratchPerHead(>= len) floats. len >= 1.
void DecodeAttention(const float* q, int64_t kv_heads, int64_t group, const float* keys,
                     const float* values, int64_t row_stride, int64_t len, int64_t head_dim,
                     float scale, float* scratch, float* out);
// The same over an fp16 KV cache (values widened to fp32 in registers).
void DecodeAttention(const float* q, int64_t kv_heads, int64_t group, const at::Half* keys,
                     const at::Half* values, int64_t row_stride, int64_t len, int64_t head_dim,
                     float scale, float* scratch, float* out);

}  // namespace amoeba
