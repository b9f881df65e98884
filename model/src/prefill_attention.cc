#include "prefill_attention.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "model/kernels.h"
#include "simd.h"

// GCC 12's _mm512_undefined_ps (inside the shuffles of Transpose16) trips -Wuninitialized where
// Transpose16 is inlined into the bf16 kernel; the value is never read (as simd.h notes).
#pragma GCC diagnostic ignored "-Wuninitialized"

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

// kt[d * ldk + j] = k[j * rs + d] for j < L; columns [L, ldk) are zero. hd is a multiple of 16.
AMOEBA_AVX512 void TransposeKeys(const float* k, int64_t L, int64_t hd, int64_t rs, int64_t ldk,
                                 float* kt) {
  __m512 r[16];
  for (int64_t j0 = 0; j0 < L; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, L - j0);
    for (int64_t d0 = 0; d0 < hd; d0 += 16) {
      for (int64_t i = 0; i < 16; ++i)
        r[i] = i < n ? _mm512_loadu_ps(k + (j0 + i) * rs + d0) : _mm512_setzero_ps();
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

// o_r += Σ_{j < keys} p[r * lds + j] · v_j for R rows of NV × 16 values each (v_j at v + j * vs).
template <int R, int NV>
AMOEBA_AVX512 void ValueTile(const float* p, int64_t lds, const float* v, int64_t vs, int64_t keys,
                             float* o, int64_t o_stride) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_loadu_ps(o + r * o_stride + c * 16);
  for (int64_t j = 0; j < keys; ++j) {
    __m512 vj[NV];
    for (int c = 0; c < NV; ++c) vj[c] = _mm512_loadu_ps(v + j * vs + c * 16);
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

// f(std::integral_constant<int, rows>{}) for a register tile of 1..kMax rows (kMax <= 6): the
// tile kernels take their row count as a template argument.
template <int kMax, typename F>
inline void WithRows(int rows, F&& f) {
  static_assert(kMax >= 1 && kMax <= 6);
  switch (rows) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      if constexpr (kMax >= 2) return f(std::integral_constant<int, 2>{});
      break;
    case 3:
      if constexpr (kMax >= 3) return f(std::integral_constant<int, 3>{});
      break;
    case 4:
      if constexpr (kMax >= 4) return f(std::integral_constant<int, 4>{});
      break;
    case 5:
      if constexpr (kMax >= 5) return f(std::integral_constant<int, 5>{});
      break;
    case 6:
      if constexpr (kMax >= 6) return f(std::integral_constant<int, 6>{});
      break;
  }
}

// The dispatchers and their lambdas carry the kernels' target, so the tiles inline into them.
template <int NV>
AMOEBA_AVX512 void ValueRows(int rows, const float* p, int64_t lds, const float* v, int64_t vs,
                             int64_t keys, float* o, int64_t o_stride) {
  WithRows<kValueRows<NV>>(rows, [&](auto r) AMOEBA_AVX512 {
    ValueTile<decltype(r)::value, NV>(p, lds, v, vs, keys, o, o_stride);
  });
}

AMOEBA_AVX512 void ScoreRows(int rows, const float* q, int64_t q_stride, const float* kt,
                             int64_t ldk, int64_t hd, float* s, int64_t lds) {
  WithRows<6>(rows, [&](auto r) AMOEBA_AVX512 {
    ScoreTile<decltype(r)::value>(q, q_stride, kt, ldk, hd, s, lds);
  });
}

// o_r = src_r · inv_sum[r] for `rows` rows of hd values: the softmax's normalization, once per
// output value instead of once per key (src may be o).
AMOEBA_AVX512 void NormalizeRows(const float* src, int64_t src_stride, const float* inv_sum,
                                 int64_t rows, int64_t hd, float* o, int64_t o_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(inv_sum[r]);
    for (int64_t c = 0; c < hd; c += 16)
      _mm512_storeu_ps(o + r * o_stride + c,
                       _mm512_mul_ps(_mm512_loadu_ps(src + r * src_stride + c), inv));
  }
}

// One query head's block of `rows` queries (row i sees `first_len + i` keys): scores chunk by
// chunk of keys across all row tiles (a K^T chunk stays in L1 while every tile uses it), the
// row softmax, then the values chunk by chunk into the output rows.
template <int NV>
AMOEBA_AVX512 void AttendBlockAvx512(const float* q, int64_t q_stride, const float* kt, int64_t ldk,
                                     const float* v, int64_t vs, int64_t rows, int64_t first_len,
                                     float scale, float* S, float* o, int64_t o_stride) {
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
      ValueRows<NV>(static_cast<int>(n), S + r0 * ldk + j0, ldk, v + j0 * vs, vs,
                    std::min(kKeyChunk, tile_len - j0), o + r0 * o_stride, o_stride);
    }
  NormalizeRows(o, o_stride, inv_sum, rows, hd, o, o_stride);
}

bool BlockedKernelFits(int64_t hd) {
  return hd == 16 || hd == 32 || hd == 64 || hd == 128;
}

// f(std::integral_constant<int, hd / 16>{}) for the head dimensions the blocked kernels take
// (BlockedKernelFits): they hold a row of a head in hd / 16 vectors.
template <typename F>
void WithHeadVectors(int64_t hd, F&& f) {
  switch (hd) {
    case 16:
      return f(std::integral_constant<int, 1>{});
    case 32:
      return f(std::integral_constant<int, 2>{});
    case 64:
      return f(std::integral_constant<int, 4>{});
    case 128:
      return f(std::integral_constant<int, 8>{});
  }
}

// (KV head, query block) tasks from a shared counter, the blocks that see the most keys first:
// causal blocks differ in cost, so a static split would leave a thread idle.
// fn(worker, kv_head, first_row, rows) for each, on `threads` workers.
template <typename F>
void ForEachBlockTask(const PrefillAttentionArgs& a, int threads, F&& fn) {
  const int64_t B = kPrefillQueryBlock, blocks = (a.T + B - 1) / B, tasks = blocks * a.kv_heads;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w)
      for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
        const int64_t t0 = (blocks - 1 - t / a.kv_heads) * B;
        fn(w, t % a.kv_heads, t0, std::min(B, a.T - t0));
      }
  });
}

// Working memory grown to `need` floats, by half again at least: a chunked prefill asks for a
// little more at every call, and a fresh buffer each time would page-fault its whole size in.
void GrowScratch(at::Tensor& scratch, int64_t need) {
  if (!scratch.defined() || scratch.numel() < need)
    scratch =
        at::empty({std::max(need, scratch.defined() ? scratch.numel() * 3 / 2 : 0)}, at::kFloat);
}

void PrefillAttentionAvx512(const PrefillAttentionArgs& a, at::Tensor& scratch) {
  const int64_t hd = a.head_dim, B = kPrefillQueryBlock;
  const int64_t rs = a.kv_row_stride > 0 ? a.kv_row_stride : hd;
  const int64_t L = a.p0 + a.T;
  // K^T rows a whole number of key chunks long, plus one cache line: rows 4 KB apart would all
  // fall in the same L1 sets, and a score tile reads 64 of them.
  const int64_t ldk = (L + kKeyChunk - 1) / kKeyChunk * kKeyChunk + 16;
  const int threads = std::max(1, at::get_num_threads());
  const int64_t keys_size = a.kv_heads * hd * ldk, per_thread = B * ldk;
  GrowScratch(scratch, keys_size + threads * per_thread);
  float* kt = scratch.data_ptr<float>();
  float* buffers = kt + keys_size;
  // K^T once per KV head, shared by every query block and query head of its group.
  at::parallel_for(0, a.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h)
      TransposeKeys(a.k + h * a.kv_head_stride, L, hd, rs, ldk, kt + h * hd * ldk);
  });
  ForEachBlockTask(a, threads, [&](int64_t w, int64_t kvh, int64_t t0, int64_t rows) {
    float* S = buffers + w * per_thread;
    for (int64_t g = 0; g < a.group; ++g) {
      const int64_t qh = kvh * a.group + g;
      WithHeadVectors(hd, [&](auto nv) {
        AttendBlockAvx512<decltype(nv)::value>(
            a.q + t0 * a.q_stride + qh * hd, a.q_stride, kt + kvh * hd * ldk, ldk,
            a.v + kvh * a.kv_head_stride, rs, rows, a.p0 + t0 + 1, a.scale, S,
            a.out + t0 * a.out_stride + qh * hd, a.out_stride);
      });
    }
  });
}

// --- AVX512-BF16: the same blocked kernel with bf16 inputs to both products (vdpbf16ps: a pair
// of bf16 products summed into fp32 per lane, twice the multiply-adds of an fp32 FMA per
// instruction). Queries, keys, values and the softmax's probabilities are rounded to bf16; the
// sums, the softmax and the output stay fp32.

#define AMOEBA_AVX512_BF16 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512bf16,avx2,fma,f16c")))

// bf16 pairs (a[i], b[i]) for i < 16 as 16 lanes of 32 bits: vdpbf16ps's operand layout.
AMOEBA_AVX512_BF16 inline __m512i PackPairs(__m512 a, __m512 b) {
  // cvtne2ps_pbh(b, a) holds a's 16 bf16 in its low half and b's in its high half.
  const __m512i interleave =
      _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(b, a));
}

// Keys as dimension pairs: kp[p * 2ldk + 2j + e] = bf16(k[j * rs + 2p + e]) for j < L; keys
// [L, ldk) are zero.
AMOEBA_AVX512_BF16 void PackKeys(const float* k, int64_t L, int64_t hd, int64_t rs, int64_t ldk,
                                 uint16_t* kp) {
  __m512 r[16];
  for (int64_t j0 = 0; j0 < L; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, L - j0);
    for (int64_t d0 = 0; d0 < hd; d0 += 16) {
      for (int64_t i = 0; i < 16; ++i)
        r[i] = i < n ? _mm512_loadu_ps(k + (j0 + i) * rs + d0) : _mm512_setzero_ps();
      Transpose16(r);  // r[c]: dimension d0 + c of the 16 keys
      for (int64_t e = 0; e < 8; ++e)
        _mm512_storeu_si512(kp + (d0 / 2 + e) * 2 * ldk + 2 * j0,
                            PackPairs(r[2 * e], r[2 * e + 1]));
    }
  }
  const int64_t done = (L + 15) / 16 * 16;
  for (int64_t p = 0; p < hd / 2; ++p)
    std::memset(kp + p * 2 * ldk + 2 * done, 0, (ldk - done) * 2 * sizeof(uint16_t));
}

// Values as key pairs: vp[m * 2hd + 2c + e] = bf16(v[(2m + e) * rs + c]) for m < ldk / 2; keys
// past L are zero.
AMOEBA_AVX512_BF16 void PackValues(const float* v, int64_t L, int64_t hd, int64_t rs, int64_t ldk,
                                   uint16_t* vp) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t m = 0; m < ldk / 2; ++m)
    for (int64_t c = 0; c < hd; c += 16) {
      const __m512 a = 2 * m < L ? _mm512_loadu_ps(v + 2 * m * rs + c) : zero;
      const __m512 b = 2 * m + 1 < L ? _mm512_loadu_ps(v + (2 * m + 1) * rs + c) : zero;
      _mm512_storeu_si512(vp + m * 2 * hd + 2 * c, PackPairs(a, b));
    }
}

// out[i] = bf16(x[i]) for i < n, a multiple of 16.
AMOEBA_AVX512_BF16 void ToBf16(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
}

// p[0, padded) = bf16(exp((s - max) · scale)) for j < len, zero past it; returns the fp32 sum of
// the exponentials. One pass after the max. The exponential is 2^t as 2^round(t) (scalef) times a
// degree-4 polynomial of the rest: relative error ~4e-5, far below bf16's rounding (2e-3), and
// under half the instructions of simd::Exp16. `padded` is a multiple of 16.
AMOEBA_AVX512_BF16 float ExpRowToBf16(const float* s, int64_t len, int64_t padded, float scale,
                                      uint16_t* p) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 m = len - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - j)) - 1);
    vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, s + j));
  }
  constexpr float kLn2 = 0.69314718f;
  const __m512 vmx = _mm512_set1_ps(simd::ReduceMax16(vmax));
  const __m512 k = _mm512_set1_ps(scale * 1.44269504f);  // log2(e)
  const __m512 c1 = _mm512_set1_ps(kLn2), c2 = _mm512_set1_ps(kLn2 * kLn2 / 2),
               c3 = _mm512_set1_ps(kLn2 * kLn2 * kLn2 / 6),
               c4 = _mm512_set1_ps(kLn2 * kLn2 * kLn2 * kLn2 / 24), one = _mm512_set1_ps(1.f);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < padded; j += 16) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, len - j));
    const __mmask16 m = left == 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vmx), k);
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 y = _mm512_fmadd_ps(c4, f, c3);
    y = _mm512_fmadd_ps(y, f, c2);
    y = _mm512_fmadd_ps(y, f, c1);
    y = _mm512_fmadd_ps(y, f, one);
    const __m512 e = _mm512_maskz_scalef_ps(m, y, n);
    vsum = _mm512_add_ps(vsum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(e));
  }
  return simd::ReduceAdd16(vsum);
}

// s[r * lds + j] = q_r · k_j for R query rows (bf16 dimension pairs, `qld` pairs apart) and
// kKeyChunk keys.
template <int R>
AMOEBA_AVX512_BF16 void ScoreTileBf16(const uint32_t* q, int64_t qld, const uint16_t* kp,
                                      int64_t ldk, int64_t pairs, float* s, int64_t lds) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* kr = kp + p * 2 * ldk;
    __m512bh k[4];
    for (int c = 0; c < 4; ++c) k[c] = (__m512bh)_mm512_loadu_si512(kr + 32 * c);
    for (int r = 0; r < R; ++r) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r * qld + p]));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], b, k[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + r * lds + c * 16, acc[r][c]);
}

// o_r += Σ_j p_rj · v_j over `pairs` key pairs: p as bf16 key pairs (`ldp` pairs apart), v as
// PackValues lays it out.
template <int R, int NV>
AMOEBA_AVX512_BF16 void ValueTileBf16(const uint32_t* p, int64_t ldp, const uint16_t* vp,
                                      int64_t pairs, float* o, int64_t o_stride) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_loadu_ps(o + r * o_stride + c * 16);
  for (int64_t m = 0; m < pairs; ++m) {
    __m512bh vj[NV];
    for (int c = 0; c < NV; ++c)
      vj[c] = (__m512bh)_mm512_loadu_si512(vp + m * 2 * NV * 16 + c * 32);
    for (int r = 0; r < R; ++r) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[r * ldp + m]));
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], b, vj[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * o_stride + c * 16, acc[r][c]);
}

template <int NV>
AMOEBA_AVX512_BF16 void ValueRowsBf16(int rows, const uint32_t* p, int64_t ldp, const uint16_t* vp,
                                      int64_t pairs, float* o, int64_t o_stride) {
  WithRows<kValueRows<NV>>(rows, [&](auto r) AMOEBA_AVX512_BF16 {
    ValueTileBf16<decltype(r)::value, NV>(p, ldp, vp, pairs, o, o_stride);
  });
}

AMOEBA_AVX512_BF16 void ScoreRowsBf16(int rows, const uint32_t* q, int64_t qld, const uint16_t* kp,
                                      int64_t ldk, int64_t pairs, float* s, int64_t lds) {
  WithRows<6>(rows, [&](auto r) AMOEBA_AVX512_BF16 {
    ScoreTileBf16<decltype(r)::value>(q, qld, kp, ldk, pairs, s, lds);
  });
}

// Per-thread working memory of the bf16 kernels.
struct Bf16Buffers {
  float* scores = nullptr;    // [kPrefillQueryBlock, ldk]
  uint16_t* probs = nullptr;  // [kPrefillQueryBlock, ldk] bf16
  uint16_t* q = nullptr;      // [kPrefillQueryBlock, hd] bf16
  float* out = nullptr;       // [kPrefillQueryBlock, hd] (AMX: the sum tiles' rows)
};

// AttendBlockAvx512 with bf16 products: the block's queries are rounded once, each row's
// probabilities once after its softmax.
template <int NV>
AMOEBA_AVX512_BF16 void AttendBlockBf16(const float* q, int64_t q_stride, const uint16_t* kp,
                                        int64_t ldk, const uint16_t* vp, int64_t rows,
                                        int64_t first_len, float scale, const Bf16Buffers& buf,
                                        float* o, int64_t o_stride) {
  constexpr int64_t hd = NV * 16, kScoreRows = 6, kRows = kValueRows<NV>;
  const int64_t last_len = first_len + rows - 1;
  float* S = buf.scores;
  for (int64_t r = 0; r < rows; ++r) ToBf16(q + r * q_stride, hd, buf.q + r * hd);
  const auto* qp = reinterpret_cast<const uint32_t*>(buf.q);
  for (int64_t j0 = 0; j0 < last_len; j0 += kKeyChunk)
    for (int64_t r0 = 0; r0 < rows; r0 += kScoreRows) {
      const int64_t n = std::min(kScoreRows, rows - r0);
      if (first_len + r0 + n - 1 <= j0) continue;
      ScoreRowsBf16(static_cast<int>(n), qp + r0 * hd / 2, hd / 2, kp + 2 * j0, ldk, hd / 2,
                    S + r0 * ldk + j0, ldk);
    }
  alignas(64) float inv_sum[kPrefillQueryBlock];
  for (int64_t r = 0; r < rows; ++r) {
    // Zeros up to the last key pair its value tile reads, so the tile's rows share one count.
    const int64_t width = std::min(last_len, first_len + (r / kRows) * kRows + kRows - 1);
    // The pair of an odd key count reads one key past `width`: zero it too (<= ldk, as ldk is a
    // whole number of chunks plus 16).
    const int64_t padded = (width + 16) / 16 * 16;
    inv_sum[r] =
        1.0f / ExpRowToBf16(S + r * ldk, first_len + r, padded, scale, buf.probs + r * ldk);
    std::memset(o + r * o_stride, 0, hd * sizeof(float));
  }
  const auto* pp = reinterpret_cast<const uint32_t*>(buf.probs);
  for (int64_t j0 = 0; j0 < last_len; j0 += kKeyChunk)
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const int64_t n = std::min(kRows, rows - r0);
      const int64_t tile_len = first_len + r0 + n - 1;
      if (tile_len <= j0) continue;
      const int64_t keys = std::min(kKeyChunk, tile_len - j0);
      ValueRowsBf16<NV>(static_cast<int>(n), pp + (r0 * ldk + j0) / 2, ldk / 2, vp + j0 * hd,
                        (keys + 1) / 2, o + r0 * o_stride, o_stride);
    }
  NormalizeRows(o, o_stride, inv_sum, rows, hd, o, o_stride);
}

// --- AMX-BF16: the products as tile multiplies (tdpbf16ps: a 16 × 32 bf16 tile times a 32 × 16
// one into 16 × 16 fp32, 16x the multiply-adds of an AVX-512 FMA per cycle), from the same packed
// keys and values (their pair layout is the B tile's). Softmax stays AVX-512 fp32; with the
// products nearly free, it and the bf16 conversions are what remains.

#define AMOEBA_AMX_BF16                                                     \
  __attribute__((                                                           \
      target("amx-tile,amx-bf16,avx512f,avx512vl,avx512bw,avx512bf16,avx2," \
             "fma,f16c")))

struct AttentionTileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
// Tiles 0-3: 16 × 16 fp32 sums; 4: the A operand (16 rows × 32 bf16); 5: the B operand (16 pair
// rows × 16 columns × 2 bf16). All are 16 rows of 64 bytes.
constexpr AttentionTileConfig MakeAttentionTiles() {
  AttentionTileConfig c;
  for (int t = 0; t < 6; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  return c;
}
// In static memory: gcc 12 drops stores to a local config that only ldtilecfg reads.
alignas(64) constexpr AttentionTileConfig kAttentionTiles = MakeAttentionTiles();
constexpr int64_t kTileRows = 16;

// C tiles 0..n-1 += A (tile 4) × B_c, B_c loaded from b + c * b_step (bytes apart by b_stride).
template <int N>
AMOEBA_AMX_BF16 inline void TileProducts(const uint16_t* b, int64_t b_step, int64_t b_stride) {
  _tile_loadd(5, b, b_stride);
  _tile_dpbf16ps(0, 4, 5);
  if constexpr (N > 1) {
    _tile_loadd(5, b + b_step, b_stride);
    _tile_dpbf16ps(1, 4, 5);
  }
  if constexpr (N > 2) {
    _tile_loadd(5, b + 2 * b_step, b_stride);
    _tile_dpbf16ps(2, 4, 5);
  }
  if constexpr (N > 3) {
    _tile_loadd(5, b + 3 * b_step, b_stride);
    _tile_dpbf16ps(3, 4, 5);
  }
}

template <int N>
AMOEBA_AMX_BF16 inline void ZeroSums() {
  _tile_zero(0);
  if constexpr (N > 1) _tile_zero(1);
  if constexpr (N > 2) _tile_zero(2);
  if constexpr (N > 3) _tile_zero(3);
}

// Stores sum tiles 0..N-1 at c + t * 16 floats, rows `stride` bytes apart.
template <int N>
AMOEBA_AMX_BF16 inline void StoreSums(float* c, int64_t stride) {
  _tile_stored(0, c, stride);
  if constexpr (N > 1) _tile_stored(1, c + 16, stride);
  if constexpr (N > 2) _tile_stored(2, c + 32, stride);
  if constexpr (N > 3) _tile_stored(3, c + 48, stride);
}

// out[r][c0, c0 + 16N) = Σ_j probs[r][j] · v_j over a 16-row tile's first `keys` keys (rounded up
// to 32), rows `ldk` probabilities and hd outputs apart: sum tiles 0..N-1.
template <int N>
AMOEBA_AMX_BF16 void ValueTilesAmx(const uint16_t* probs, int64_t ldk, const uint16_t* vp,
                                   int64_t hd, int64_t c0, int64_t keys, float* out) {
  ZeroSums<N>();
  for (int64_t j = 0; j < keys; j += 32) {
    _tile_loadd(4, probs + j, ldk * sizeof(uint16_t));
    TileProducts<N>(vp + (j / 2) * 2 * hd + 2 * c0, 32, 2 * hd * sizeof(uint16_t));
  }
  StoreSums<N>(out + c0, hd * sizeof(float));
}

// One query head's block of `rows` queries (row i sees `first_len + i` keys) in tiles of 16 rows:
// scores 64 keys at a time (4 sum tiles, hd / 32 steps of K), the row softmax, then the values 32
// keys at a time into 16 × 64 output tiles. Rows past `rows` in the last tile are computed from
// zero queries and never written out.
AMOEBA_AMX_BF16 void AttendBlockAmx(int64_t hd, const float* q, int64_t q_stride,
                                    const uint16_t* kp, int64_t ldk, const uint16_t* vp,
                                    int64_t rows, int64_t first_len, float scale,
                                    const Bf16Buffers& buf, float* o, int64_t o_stride) {
  _tile_loadconfig(&kAttentionTiles);  // the integer kernels configure their own tiles
  const int64_t last_len = first_len + rows - 1;
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  for (int64_t r = 0; r < rows; ++r) ToBf16(q + r * q_stride, hd, buf.q + r * hd);
  std::memset(buf.q + rows * hd, 0, (tiles * kTileRows - rows) * hd * sizeof(uint16_t));
  float* S = buf.scores;
  for (int64_t rt = 0; rt < tiles; ++rt) {
    const int64_t r0 = rt * kTileRows;
    const int64_t tile_len = std::min(last_len, first_len + r0 + kTileRows - 1);
    for (int64_t j0 = 0; j0 < tile_len; j0 += kKeyChunk) {
      ZeroSums<4>();
      for (int64_t k0 = 0; k0 < hd; k0 += 32) {
        _tile_loadd(4, buf.q + r0 * hd + k0, hd * sizeof(uint16_t));
        TileProducts<4>(kp + (k0 / 2) * 2 * ldk + 2 * j0, 32, 2 * ldk * sizeof(uint16_t));
      }
      StoreSums<4>(S + r0 * ldk + j0, ldk * sizeof(float));
    }
  }
  alignas(64) float inv_sum[kPrefillQueryBlock];
  for (int64_t r = 0; r < rows; ++r) {
    // Zeros up to the tile's last key, rounded to the 32 keys of an A tile.
    const int64_t r0 = r / kTileRows * kTileRows;
    const int64_t tile_len = std::min(last_len, first_len + r0 + kTileRows - 1);
    const int64_t padded = (tile_len + 31) / 32 * 32;  // <= ldk
    inv_sum[r] =
        1.0f / ExpRowToBf16(S + r * ldk, first_len + r, padded, scale, buf.probs + r * ldk);
  }
  for (int64_t rt = 0; rt < tiles; ++rt) {
    const int64_t r0 = rt * kTileRows;
    const int64_t tile_len = std::min(last_len, first_len + r0 + kTileRows - 1);
    if (rows - r0 < kTileRows)  // rows past the block: zero probabilities, finite sums
      std::memset(buf.probs + rows * ldk, 0, (r0 + kTileRows - rows) * ldk * sizeof(uint16_t));
    for (int64_t c0 = 0; c0 < hd; c0 += 64) {  // 64 outputs at a time; hd 32: one 32
      if (hd - c0 >= 64)
        ValueTilesAmx<4>(buf.probs + r0 * ldk, ldk, vp, hd, c0, tile_len, buf.out + r0 * hd);
      else
        ValueTilesAmx<2>(buf.probs + r0 * ldk, ldk, vp, hd, c0, tile_len, buf.out + r0 * hd);
    }
  }
  NormalizeRows(buf.out, hd, inv_sum, rows, hd, o, o_stride);
}

// Keys and values packed once per KV head (bf16 pairs), then (KV head, query block) tasks as the
// fp32 kernel takes them.
void PrefillAttentionBf16(const PrefillAttentionArgs& a, PrefillBf16Kernel kernel,
                          at::Tensor& scratch) {
  const int64_t hd = a.head_dim, B = kPrefillQueryBlock;
  const int64_t rs = a.kv_row_stride > 0 ? a.kv_row_stride : hd;
  const int64_t L = a.p0 + a.T;
  const int64_t ldk = (L + kKeyChunk - 1) / kKeyChunk * kKeyChunk + 16;  // as the fp32 kernel
  const int threads = std::max(1, at::get_num_threads());
  // In floats: per KV head its packed keys and values (hd × ldk bf16 each); per thread the scores,
  // the probabilities, the block's queries and its output sums.
  const int64_t head_size = hd * ldk, per_thread = B * ldk + B * ldk / 2 + B * hd / 2 + B * hd;
  GrowScratch(scratch, a.kv_heads * head_size + threads * per_thread);
  float* base = scratch.data_ptr<float>();
  auto keys_of = [&](int64_t h) { return reinterpret_cast<uint16_t*>(base + h * head_size); };
  auto values_of = [&](int64_t h) { return keys_of(h) + hd * ldk; };
  float* buffers = base + a.kv_heads * head_size;
  at::parallel_for(0, 2 * a.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i / 2;
      if (i % 2 == 0)
        PackKeys(a.k + h * a.kv_head_stride, L, hd, rs, ldk, keys_of(h));
      else
        PackValues(a.v + h * a.kv_head_stride, L, hd, rs, ldk, values_of(h));
    }
  });
  ForEachBlockTask(a, threads, [&](int64_t w, int64_t kvh, int64_t t0, int64_t rows) {
    float* mine = buffers + w * per_thread;
    const Bf16Buffers buf{mine, reinterpret_cast<uint16_t*>(mine + B * ldk),
                          reinterpret_cast<uint16_t*>(mine + B * ldk + B * ldk / 2),
                          mine + B * ldk + B * ldk / 2 + B * hd / 2};
    for (int64_t g = 0; g < a.group; ++g) {
      const int64_t qh = kvh * a.group + g;
      const float* q = a.q + t0 * a.q_stride + qh * hd;
      float* o = a.out + t0 * a.out_stride + qh * hd;
      if (kernel == PrefillBf16Kernel::kAmxBf16) {
        AttendBlockAmx(hd, q, a.q_stride, keys_of(kvh), ldk, values_of(kvh), rows, a.p0 + t0 + 1,
                       a.scale, buf, o, a.out_stride);
      } else {
        WithHeadVectors(hd, [&](auto nv) {
          AttendBlockBf16<decltype(nv)::value>(q, a.q_stride, keys_of(kvh), ldk, values_of(kvh),
                                               rows, a.p0 + t0 + 1, a.scale, buf, o, a.out_stride);
        });
      }
    }
  });
}

std::atomic<int> g_forced_bf16{static_cast<int>(PrefillBf16Kernel::kAuto)};

}  // namespace

std::vector<PrefillBf16Kernel> AvailablePrefillBf16Kernels() {
  std::vector<PrefillBf16Kernel> kernels = {PrefillBf16Kernel::kNone};
  if (ActiveKernelIsa() == KernelIsa::kAvx512 && CpuHasAvx512Bf16())
    kernels.push_back(PrefillBf16Kernel::kAvx512Bf16);
  if (ActiveKernelIsa() == KernelIsa::kAvx512 && CpuHasAmxBf16())
    kernels.push_back(PrefillBf16Kernel::kAmxBf16);
  return kernels;
}

void ForcePrefillBf16Kernel(PrefillBf16Kernel kernel) {
  g_forced_bf16.store(static_cast<int>(kernel));
}

PrefillBf16Kernel ActivePrefillBf16Kernel(int64_t head_dim) {
  if (ActiveKernelIsa() != KernelIsa::kAvx512 || !BlockedKernelFits(head_dim))
    return PrefillBf16Kernel::kNone;
  const bool amx = CpuHasAmxBf16() && head_dim >= 32;  // an A tile takes 32 bf16 of a row
  switch (static_cast<PrefillBf16Kernel>(g_forced_bf16.load(std::memory_order_relaxed))) {
    case PrefillBf16Kernel::kAuto:
    case PrefillBf16Kernel::kAmxBf16:
      return amx ? PrefillBf16Kernel::kAmxBf16 : PrefillBf16Kernel::kNone;
    case PrefillBf16Kernel::kAvx512Bf16:
      return CpuHasAvx512Bf16() ? PrefillBf16Kernel::kAvx512Bf16 : PrefillBf16Kernel::kNone;
    case PrefillBf16Kernel::kNone:
      break;
  }
  return PrefillBf16Kernel::kNone;
}

const char* PrefillBf16KernelName(PrefillBf16Kernel kernel) {
  switch (kernel) {
    case PrefillBf16Kernel::kAuto:
      return "auto";
    case PrefillBf16Kernel::kNone:
      return "fp32";
    case PrefillBf16Kernel::kAvx512Bf16:
      return "avx512-bf16";
    case PrefillBf16Kernel::kAmxBf16:
      return "amx-bf16";
  }
  return "?";
}

void PrefillAttention(const PrefillAttentionArgs& a, at::Tensor& scratch) {
  if (ActiveKernelIsa() == KernelIsa::kAvx512 && BlockedKernelFits(a.head_dim)) {
    const PrefillBf16Kernel bf16 =
        a.bf16 ? ActivePrefillBf16Kernel(a.head_dim) : PrefillBf16Kernel::kNone;
    if (bf16 != PrefillBf16Kernel::kNone) return PrefillAttentionBf16(a, bf16, scratch);
    return PrefillAttentionAvx512(a, scratch);
  }
  const int64_t hd = a.head_dim, B = kPrefillQueryBlock;
  const int64_t rs = a.kv_row_stride > 0 ? a.kv_row_stride : hd;
  const int64_t max_keys = a.p0 + a.T;
  const int threads = std::max(1, at::get_num_threads());
  const int64_t per_thread = B * max_keys;
  if (!scratch.defined() || scratch.numel() < threads * per_thread)
    scratch = at::empty({threads * per_thread}, at::kFloat);
  float* buffers = scratch.data_ptr<float>();
  const KernelIsa isa = ActiveKernelIsa();
  ForEachBlockTask(a, threads, [&](int64_t w, int64_t kvh, int64_t t0, int64_t rows) {
    c10::InferenceMode guard;  // on the worker thread: libtorch's products below
    float* S = buffers + w * per_thread;
    const int64_t keys = a.p0 + t0 + rows;  // what the block's last row sees
    const at::Tensor K =
        at::from_blob(const_cast<float*>(a.k) + kvh * a.kv_head_stride, {keys, hd}, {rs, 1});
    const at::Tensor V =
        at::from_blob(const_cast<float*>(a.v) + kvh * a.kv_head_stride, {keys, hd}, {rs, 1});
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
  });
}

}  // namespace amoeba
