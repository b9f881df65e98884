// Attention of one new token over its sequence's KV cache (the decode step), for one KV head and
// the query heads that share it (GQA). The AVX-512 path keeps the query and the output in
// registers and scores 16 keys per block (one transposing reduction instead of a horizontal sum
// per key); other instruction sets and head sizes use the portable loop.
#pragma once
#include <c10/util/Half.h>

#include <cstdint>

namespace amoeba {

// out[g] = softmax(q[g] · keys^T · scale) · values for g < group.
// q, out: [group, head_dim] contiguous; keys, values: [len, head_dim] contiguous rows;
// scores: scratch of at least len floats. len >= 1.
void DecodeAttention(const float* q, int64_t group, const float* keys, const float* values,
                     int64_t len, int64_t head_dim, float scale, float* scores, float* out);
// The same over an fp16 KV cache (values widened to fp32 in registers).
void DecodeAttention(const float* q, int64_t group, const at::Half* keys, const at::Half* values,
                     int64_t len, int64_t head_dim, float scale, float* scores, float* out);

}  // namespace amoeba
