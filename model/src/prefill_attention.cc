#include "prefill_attention.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "model/kernels.h"
#include "simd.h"

namespace amoeba {
namespace {

void SoftmaxRowScalar(float* s, int64_t len, float scale) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < len; ++j) mx = std::max(mx, s[j]);
  float sum = 0.f;
  for (int64_t j = 0; j < len; ++j) {
    s[j] = std::exp((s[j] - mx) * scale);
    sum += s[j];
  }
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < len; ++j) s[j] *= inv;
}

AMOEBA_AVX2 void SoftmaxRowAvx2(float* s, int64_t len, float scale) {
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float mx = lanes[0];
  for (int i = 1; i < 8; ++i) mx = std::max(mx, lanes[i]);
  for (; j < len; ++j) mx = std::max(mx, s[j]);
  const __m256 vmx = _mm256_set1_ps(mx), vscale = _mm256_set1_ps(scale);
  __m256 vsum = _mm256_setzero_ps();
  for (j = 0; j + 8 <= len; j += 8) {
    const __m256 e = simd::Exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), vmx), vscale));
    _mm256_storeu_ps(s + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  _mm256_store_ps(lanes, vsum);
  float sum = 0.f;
  for (int i = 0; i < 8; ++i) sum += lanes[i];
  for (; j < len; ++j) {
    s[j] = std::exp((s[j] - mx) * scale);
    sum += s[j];
  }
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (j = 0; j + 8 <= len; j += 8)
    _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), inv));
  for (; j < len; ++j) s[j] *= 1.0f / sum;
}

// s[0, len) = exp((s - max) · scale), unnormalized; returns their sum.
AMOEBA_AVX512 float ExpRowAvx512(float* s, int64_t len, float scale) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 m = len - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - j)) - 1);
    vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, s + j));
  }
  const __m512 vmx = _mm512_set1_ps(simd::ReduceMax16(vmax)), vscale = _mm512_set1_ps(scale);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 m = len - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - j)) - 1);
    const __m512 e =
        simd::Exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vmx), vscale));
    _mm512_mask_storeu_ps(s + j, m, e);
    vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
  }
  return simd::ReduceAdd16(vsum);
}

AMOEBA_AVX512 void SoftmaxRowAvx512(float* s, int64_t len, float scale) {
  const __m512 inv = _mm512_set1_ps(1.0f / ExpRowAvx512(s, len, scale));
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 m = len - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - j)) - 1);
    _mm512_mask_storeu_ps(s + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), inv));
  }
}

// s[0, len) = softmax(s · scale); s[len, width) = 0 (keys the row may not see yet).
void SoftmaxRow(float* s, int64_t len, int64_t width, float scale, KernelIsa isa) {
  if (isa == KernelIsa::kAvx512)
    SoftmaxRowAvx512(s, len, scale);
  else if (isa == KernelIsa::kAvx2)
    SoftmaxRowAvx2(s, len, scale);
  else
    SoftmaxRowScalar(s, len, scale);
  std::memset(s + len, 0, (width - len) * sizeof(float));
}

// --- AVX-512: our own blocked kernels (OpenBLAS 0.3.21 runs its AVX2 Haswell sgemm on these
// CPUs, and a K-dimension of one head is too short for a general GEMM to reach its rate).

inline constexpr int64_t kKeyChunk = 64;  // keys per score/value pass; K^T rows are padded to it

// A 16 × 16 block transposed in registers: rows in r[0..16), columns out in r[0..16).
AMOEBA_AVX512 void Transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);  // per 128-bit lane: r_i[0], r_i+1[0], r_i[1], ...
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // u[i + c]: column 4·lane + c of rows i..i+3
    u[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 16;
       h += 8)  // t[h + c] (c < 4): columns c and c + 8; t[h + 4 + c]: c + 4, c + 12
    for (int c = 0; c < 4; ++c) {
      t[h + c] = _mm512_shuffle_f32x4(u[h + c], u[h + 4 + c], 0x88);
      t[h + 4 + c] = _mm512_shuffle_f32x4(u[h + c], u[h + 4 + c], 0xdd);
    }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd);
    r[4 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xdd);
  }
}

// kt[d * ldk + j] = k[j * hd + d] for j < L; columns [L, ldk) are zero. hd is a multiple of 16.
AMOEBA_AVX512 void TransposeKeys(const float* k, int64_t L, int64_t hd, int64_t ldk, float* kt) {
  __m512 r[16];
  for (int64_t j0 = 0; j0 < L; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, L - j0);
    for (int64_t d0 = 0; d0 < hd; d0 += 16) {
      for (int64_t i = 0; i < 16; ++i)
        r[i] = i < n ? _mm512_loadu_ps(k + (j0 + i) * hd + d0) : _mm512_setzero_ps();
      Transpose16(r);
      for (int64_t c = 0; c < 16; ++c) _mm512_storeu_ps(kt + (d0 + c) * ldk + j0, r[c]);
    }
  }
  const int64_t done = (L + 15) / 16 * 16;
  for (int64_t d = 0; d < hd; ++d)
    std::memset(kt + d * ldk + done, 0, (ldk - done) * sizeof(float));
}

// s[r * lds + j] = q_r · k_{j0 + j} for R query rows and kKeyChunk keys (4 vectors of 16).
template <int R>
AMOEBA_AVX512 void ScoreTile(const float* q, int64_t q_stride, const float* kt, int64_t ldk,
                             int64_t hd, float* s, int64_t lds) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < hd; ++d) {
    const float* kr = kt + d * ldk;
    const __m512 k0 = _mm512_loadu_ps(kr), k1 = _mm512_loadu_ps(kr + 16),
                 k2 = _mm512_loadu_ps(kr + 32), k3 = _mm512_loadu_ps(kr + 48);
    for (int r = 0; r < R; ++r) {
      const __m512 b = _mm512_set1_ps(q[r * q_stride + d]);
      acc[r][0] = _mm512_fmadd_ps(b, k0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(b, k1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(b, k2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(b, k3, acc[r][3]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + r * lds + c * 16, acc[r][c]);
}

// o_r += Σ_{j < keys} p[r * lds + j] · v_j for R rows of NV × 16 values each.
template <int R, int NV>
AMOEBA_AVX512 void ValueTile(const float* p, int64_t lds, const float* v, int64_t keys, float* o,
                             int64_t o_stride) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_loadu_ps(o + r * o_stride + c * 16);
  for (int64_t j = 0; j < keys; ++j) {
    __m512 vj[NV];
    for (int c = 0; c < NV; ++c) vj[c] = _mm512_loadu_ps(v + j * NV * 16 + c * 16);
    for (int r = 0; r < R; ++r) {
      const __m512 b = _mm512_set1_ps(p[r * lds + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(b, vj[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * o_stride + c * 16, acc[r][c]);
}

// Rows per register tile: 24 accumulators at most (32 zmm registers less the loaded vectors).
template <int NV>
inline constexpr int kValueRows = NV >= 8 ? 3 : 6;

template <int NV>
AMOEBA_AVX512 void ValueRows(int rows, const float* p, int64_t lds, const float* v, int64_t keys,
                             float* o, int64_t o_stride) {
  switch (rows) {
    case 1:
      return ValueTile<1, NV>(p, lds, v, keys, o, o_stride);
    case 2:
      return ValueTile<2, NV>(p, lds, v, keys, o, o_stride);
    case 3:
      return ValueTile<3, NV>(p, lds, v, keys, o, o_stride);
    case 4:
      if constexpr (kValueRows<NV> >= 4) return ValueTile<4, NV>(p, lds, v, keys, o, o_stride);
      break;
    case 5:
      if constexpr (kValueRows<NV> >= 5) return ValueTile<5, NV>(p, lds, v, keys, o, o_stride);
      break;
    case 6:
      if constexpr (kValueRows<NV> >= 6) return ValueTile<6, NV>(p, lds, v, keys, o, o_stride);
      break;
  }
}

AMOEBA_AVX512 void ScoreRows(int rows, const float* q, int64_t q_stride, const float* kt,
                             int64_t ldk, int64_t hd, float* s, int64_t lds) {
  switch (rows) {
    case 1:
      return ScoreTile<1>(q, q_stride, kt, ldk, hd, s, lds);
    case 2:
      return ScoreTile<2>(q, q_stride, kt, ldk, hd, s, lds);
    case 3:
      return ScoreTile<3>(q, q_stride, kt, ldk, hd, s, lds);
    case 4:
      return ScoreTile<4>(q, q_stride, kt, ldk, hd, s, lds);
    case 5:
      return ScoreTile<5>(q, q_stride, kt, ldk, hd, s, lds);
    case 6:
      return ScoreTile<6>(q, q_stride, kt, ldk, hd, s, lds);
  }
}

// One query head's block of `rows` queries (row i sees `first_len + i` keys): scores chunk by
// chunk of keys across all row tiles (a K^T chunk stays in L1 while every tile uses it), the
// row softmax, then the values chunk by chunk into the output rows.
template <int NV>
AMOEBA_AVX512 void AttendBlockAvx512(const float* q, int64_t q_stride, const float* kt, int64_t ldk,
                                     const float* v, int64_t rows, int64_t first_len, float scale,
                                     float* S, float* o, int64_t o_stride) {
  constexpr int64_t hd = NV * 16, kScoreRows = 6, kRows = kValueRows<NV>;
  const int64_t last_len = first_len + rows - 1;
  for (int64_t j0 = 0; j0 < last_len; j0 += kKeyChunk)
    for (int64_t r0 = 0; r0 < rows; r0 += kScoreRows) {
      const int64_t n = std::min(kScoreRows, rows - r0);
      if (first_len + r0 + n - 1 <= j0) continue;  // the tile's rows see none of these keys
      ScoreRows(static_cast<int>(n), q + r0 * q_stride, q_stride, kt + j0, ldk, hd,
                S + r0 * ldk + j0, ldk);
    }
  alignas(64) float inv_sum[kPrefillQueryBlock];
  for (int64_t r = 0; r < rows; ++r) {
    // Zeros up to the last key its value tile reads, so the tile's rows share one key count.
    const int64_t width = std::min(last_len, first_len + (r / kRows) * kRows + kRows - 1);
    inv_sum[r] = 1.0f / ExpRowAvx512(S + r * ldk, first_len + r, scale);
    std::memset(S + r * ldk + first_len + r, 0, (width - first_len - r) * sizeof(float));
    std::memset(o + r * o_stride, 0, hd * sizeof(float));
  }
  for (int64_t j0 = 0; j0 < last_len; j0 += kKeyChunk)
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const int64_t n = std::min(kRows, rows - r0);
      const int64_t tile_len = first_len + r0 + n - 1;
      if (tile_len <= j0) continue;
      ValueRows<NV>(static_cast<int>(n), S + r0 * ldk + j0, ldk, v + j0 * hd,
                    std::min(kKeyChunk, tile_len - j0), o + r0 * o_stride, o_stride);
    }
  // The softmax's normalization, once per output value instead of once per key.
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(inv_sum[r]);
    for (int64_t c = 0; c < hd; c += 16)
      _mm512_storeu_ps(o + r * o_stride + c,
                       _mm512_mul_ps(_mm512_loadu_ps(o + r * o_stride + c), inv));
  }
}

void AttendBlock(int64_t hd, const float* q, int64_t q_stride, const float* kt, int64_t ldk,
                 const float* v, int64_t rows, int64_t first_len, float scale, float* S, float* o,
                 int64_t o_stride) {
  switch (hd) {
    case 16:
      return AttendBlockAvx512<1>(q, q_stride, kt, ldk, v, rows, first_len, scale, S, o, o_stride);
    case 32:
      return AttendBlockAvx512<2>(q, q_stride, kt, ldk, v, rows, first_len, scale, S, o, o_stride);
    case 64:
      return AttendBlockAvx512<4>(q, q_stride, kt, ldk, v, rows, first_len, scale, S, o, o_stride);
    case 128:
      return AttendBlockAvx512<8>(q, q_stride, kt, ldk, v, rows, first_len, scale, S, o, o_stride);
  }
}

bool BlockedKernelFits(int64_t hd) {
  return hd == 16 || hd == 32 || hd == 64 || hd == 128;
}

void PrefillAttentionAvx512(const PrefillAttentionArgs& a, at::Tensor& scratch) {
  const int64_t hd = a.head_dim, B = kPrefillQueryBlock;
  const int64_t blocks = (a.T + B - 1) / B;
  const int64_t tasks = blocks * a.kv_heads;
  const int64_t L = a.p0 + a.T;
  // K^T rows a whole number of key chunks long, plus one cache line: rows 4 KB apart would all
  // fall in the same L1 sets, and a score tile reads 64 of them.
  const int64_t ldk = (L + kKeyChunk - 1) / kKeyChunk * kKeyChunk + 16;
  const int threads = std::max(1, at::get_num_threads());
  const int64_t keys_size = a.kv_heads * hd * ldk, per_thread = B * ldk;
  const int64_t need = keys_size + threads * per_thread;
  // Grown by half again at least: a chunked prefill asks for a little more at every call, and a
  // fresh buffer each time would page-fault its whole size in.
  if (!scratch.defined() || scratch.numel() < need)
    scratch =
        at::empty({std::max(need, scratch.defined() ? scratch.numel() * 3 / 2 : 0)}, at::kFloat);
  float* kt = scratch.data_ptr<float>();
  float* buffers = kt + keys_size;
  // K^T once per KV head, shared by every query block and query head of its group.
  at::parallel_for(0, a.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h)
      TransposeKeys(a.k + h * a.kv_head_stride, L, hd, ldk, kt + h * hd * ldk);
  });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      float* S = buffers + w * per_thread;
      for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
        const int64_t block = blocks - 1 - t / a.kv_heads, kvh = t % a.kv_heads;
        const int64_t t0 = block * B, rows = std::min(B, a.T - t0);
        for (int64_t g = 0; g < a.group; ++g) {
          const int64_t qh = kvh * a.group + g;
          AttendBlock(hd, a.q + t0 * a.q_stride + qh * hd, a.q_stride, kt + kvh * hd * ldk, ldk,
                      a.v + kvh * a.kv_head_stride, rows, a.p0 + t0 + 1, a.scale, S,
                      a.out + t0 * a.out_stride + qh * hd, a.out_stride);
        }
      }
    }
  });
}

}  // namespace

void PrefillAttention(const PrefillAttentionArgs& a, at::Tensor& scratch) {
  if (ActiveKernelIsa() == KernelIsa::kAvx512 && BlockedKernelFits(a.head_dim))
    return PrefillAttentionAvx512(a, scratch);
  const int64_t hd = a.head_dim, B = kPrefillQueryBlock;
  const int64_t blocks = (a.T + B - 1) / B;
  const int64_t tasks = blocks * a.kv_heads;
  const int64_t max_keys = a.p0 + a.T;
  const int threads = std::max(1, at::get_num_threads());
  const int64_t per_thread = B * max_keys;
  if (!scratch.defined() || scratch.numel() < threads * per_thread)
    scratch = at::empty({threads * per_thread}, at::kFloat);
  float* buffers = scratch.data_ptr<float>();
  const KernelIsa isa = ActiveKernelIsa();
  // Tasks are taken in order of decreasing work (the last query blocks see the most keys), from
  // a shared counter: causal blocks differ in cost, so a static split would leave a thread idle.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard;
    for (int64_t w = begin; w < end; ++w) {
      float* S = buffers + w * per_thread;
      for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
        const int64_t block = blocks - 1 - t / a.kv_heads, kvh = t % a.kv_heads;
        const int64_t t0 = block * B, rows = std::min(B, a.T - t0);
        const int64_t keys = a.p0 + t0 + rows;  // what the block's last row sees
        const at::Tensor K =
            at::from_blob(const_cast<float*>(a.k) + kvh * a.kv_head_stride, {keys, hd});
        const at::Tensor V =
            at::from_blob(const_cast<float*>(a.v) + kvh * a.kv_head_stride, {keys, hd});
        at::Tensor scores = at::from_blob(S, {rows, keys});
        for (int64_t g = 0; g < a.group; ++g) {
          const int64_t qh = kvh * a.group + g;
          const at::Tensor Q = at::from_blob(const_cast<float*>(a.q) + t0 * a.q_stride + qh * hd,
                                             {rows, hd}, {a.q_stride, 1});
          at::mm_out(scores, Q, K.t());
          for (int64_t i = 0; i < rows; ++i)
            SoftmaxRow(S + i * keys, a.p0 + t0 + i + 1, keys, a.scale, isa);
          at::Tensor O =
              at::from_blob(a.out + t0 * a.out_stride + qh * hd, {rows, hd}, {a.out_stride, 1});
          at::mm_out(O, scores, V);
        }
      }
    }
  });
}

}  // namespace amoeba
