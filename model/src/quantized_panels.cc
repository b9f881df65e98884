#include "model/quantized_panels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "model/kernels.h"
#include "model/packed_linear.h"
#include "model/step_profile.h"
#include "quantized_block.h"
#include "simd.h"
#include "stream_prefetch.h"

#define AMOEBA_AVX512_VNNI \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512vnni,avx2,fma,f16c")))
#define AMOEBA_AVX_VNNI __attribute__((target("avxvnni,avx2,fma,f16c")))
#define AMOEBA_AMX                                                              \
  __attribute__((                                                               \
      target("amx-tile,amx-int8,avx512f,avx512vl,avx512bw,avx512vnni,avx2,fma," \
             "f16c")))

namespace amoeba {
using namespace quant;

namespace {

// Rows [j0, j0 + J) of the activations against one panel: the first `valid` outputs at column
// `col` of y (row stride `out`; y points at row j0).
template <bool kQ4>
void PanelScalar(const uint8_t* panel, int64_t bb, const QuantActs& a, int64_t j0, int64_t J,
                 float* y, int64_t out, int64_t col, int64_t valid) {
  for (int64_t j = 0; j < J; ++j)
    for (int64_t c = 0; c < valid; ++c) {
      float s = 0.f;
      for (int64_t b = 0; b < a.nb; ++b) {
        const uint8_t* blk = panel + b * bb;
        const int8_t* xq = a.q + ((j0 + j) * a.nb + b) * kQuantBlock;
        int32_t acc = 0;
        for (int64_t k = 0; k < kQuantBlock; ++k) acc += WeightAt<kQ4>(blk, c, k) * xq[k];
        s += static_cast<float>(acc) * (ScaleAt(blk, c) * a.d[(j0 + j) * a.nb + b]);
      }
      y[j * out + col + c] = s;
    }
}

// The panel stream ahead of the block being computed: with 2-4x more instructions per byte than
// the fp32 panels, the hardware prefetcher alone left ~15% of the bandwidth unused (a Zen 3 VM:
// q4_0 at batch 1, 13.8 -> 16 GB/s with 4 KB). How far depends on the machine (stream_prefetch.h:
// a Xeon streamed q4_0 at 82% of its probe with 4 KB and 97% with 1 KB); kArm 0 none, 1 near
// (1 KB ahead), 2 far (4 KB ahead), a template parameter of the kernels.
template <int kArm>
inline void PrefetchAhead(const uint8_t* blk, int64_t bb) {
  constexpr int64_t kAhead = PrefetchAheadBytes(kArm);
  if constexpr (kArm > 0)
    for (int64_t o = 0; o < bb; o += 64)
      _mm_prefetch(reinterpret_cast<const char*>(blk + kAhead + o), _MM_HINT_T0);
}

// The stream of the kernels for several rows (tiles, VNNI pairs), at two distances: into L1 2 KB
// ahead of the block being computed and into the outer caches 8 KB ahead. 100m q8_0, 16 rows:
// Sapphire Rapids, tiles, 51-53% of the roofline with one prefetch 4 KB ahead into L1, 57-59% with
// these two (1 KB / 4 KB near and 12 / 16 / 32 KB far, or the far one into L2, no better); Zen 5,
// VNNI pairs, decode step 6.52 -> 5.99 ms (six interleaved rounds; 16 KB far, or these only in a
// panel's first pass over the rows, no better). Every pass issues them: a later pass's far
// prefetches run into the next panel.
inline void PrefetchTwoLevels(const uint8_t* blk, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(blk + 2048 + o), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(blk + 8192 + o), _MM_HINT_T2);
  }
}

inline int32_t Load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// AVX512-VNNI: one zmm of weights (16 rows × 4 inputs, unsigned) per dot-product step against 4
// broadcast int8 inputs of each row; unsigned weights u = q + offset (Q8_0: q ^ 0x80 = q + 128;
// Q4_0: the stored nibble = q + 8) give Σ u·x = Σ q·x + offset·Σ x, so the block's Σ x corrects it.
template <int J, bool kQ4, int kPrefetch>
AMOEBA_AVX512_VNNI void PanelVnni(const uint8_t* panel, int64_t bb, const QuantActs& a, int64_t j0,
                                  float* y, int64_t out, int64_t col, int64_t valid) {
  constexpr int32_t kOffset = kQ4 ? 8 : 128;
  __m512 acc[J];
  for (int j = 0; j < J; ++j) acc[j] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* blk = panel + b * bb;
    const uint8_t* data = blk + kScaleBytes;
    PrefetchAhead<kPrefetch>(blk, bb);
    // Two dot-product chains per row for one or two rows (even and odd groups): there one
    // chain's latency bounds a block.
    // With more rows the chains are independent anyway, and a second set would spill.
    __m512i dot[J], dot2[J];
    for (int j = 0; j < J; ++j) dot[j] = dot2[j] = _mm512_setzero_si512();
    __m512i(&odd)[J] = J <= 2 ? dot2 : dot;
    const int8_t* xb = a.q + (j0 * a.nb + b) * kQuantBlock;
    const int64_t xstride = a.nb * kQuantBlock;
    if constexpr (kQ4) {
      for (int g = 0; g < 4; ++g) {
        const __m512i v = _mm512_loadu_si512(data + g * kGroupBytes);
        const __m512i lo = _mm512_and_si512(v, low4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        for (int j = 0; j < J; ++j) {
          const int8_t* xj = xb + j * xstride;
          dot[j] = _mm512_dpbusd_epi32(dot[j], lo, _mm512_set1_epi32(Load4(xj + 4 * g)));
          odd[j] = _mm512_dpbusd_epi32(odd[j], hi, _mm512_set1_epi32(Load4(xj + 16 + 4 * g)));
        }
      }
    } else {
      for (int g = 0; g < 8; g += 2) {
        const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(data + g * kGroupBytes), flip);
        const __m512i v2 = _mm512_xor_si512(_mm512_loadu_si512(data + (g + 1) * kGroupBytes), flip);
        for (int j = 0; j < J; ++j) {
          const int8_t* xj = xb + j * xstride;
          dot[j] = _mm512_dpbusd_epi32(dot[j], v, _mm512_set1_epi32(Load4(xj + 4 * g)));
          odd[j] = _mm512_dpbusd_epi32(odd[j], v2, _mm512_set1_epi32(Load4(xj + 4 * g + 4)));
        }
      }
    }
    const __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
    for (int j = 0; j < J; ++j) {
      const int64_t i = (j0 + j) * a.nb + b;
      const __m512i corrected = _mm512_sub_epi32(_mm512_add_epi32(dot[j], dot2[j]),
                                                 _mm512_set1_epi32(kOffset * a.sum[i]));
      acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(corrected),
                               _mm512_mul_ps(ws, _mm512_set1_ps(a.d[i])), acc[j]);
    }
  }
  const __mmask16 m = static_cast<__mmask16>((1u << valid) - 1);
  for (int j = 0; j < J; ++j) _mm512_mask_storeu_ps(y + j * out + col, m, acc[j]);
}

// One group of 4 inputs: two steps per pair of rows, w0 / w1 the weights of outputs 0-7 / 8-15.
template <int P>
AMOEBA_AVX512_VNNI __attribute__((always_inline)) inline void PairStep(__m512i (&dot)[2][P],
                                                                       __m512i w0, __m512i w1,
                                                                       const int8_t* xb,
                                                                       int64_t pair_stride, int g) {
  for (int p = 0; p < P; ++p) {
    int64_t two_rows;
    std::memcpy(&two_rows, xb + p * pair_stride + 8 * g, sizeof(two_rows));
    const __m512i x = _mm512_set1_epi64(two_rows);
    dot[0][p] = _mm512_dpbusd_epi32(dot[0][p], w0, x);
    dot[1][p] = _mm512_dpbusd_epi32(dot[1][p], w1, x);
  }
}

// AVX512-VNNI on pairs of rows (QuantActs::pair_q): each dot-product step multiplies 8 rows of
// weights, each row's 4 inputs twice over, by one 8-byte broadcast of two rows' 4 inputs, so a
// lane is (output 8h + l/2, row l%2). PanelVnni broadcasts 4 bytes per row and step, and on Zen 5
// those broadcast loads, not the dot products, bounded it (8 rows in L1 on one core: ~60% of
// `vpdpbusd`'s peak with them, ~75% in pairs). Same integer sums and the same scaling order per
// lane: the same bits. Rows [j0, j0 + rows), j0 even, at most 2P of them (a last odd row's partner
// is computed and not stored).
template <int P, bool kQ4>
AMOEBA_AVX512_VNNI void PanelVnniPairs(const uint8_t* panel, int64_t bb, const QuantActs& a,
                                       int64_t j0, float* y, int64_t out, int64_t col,
                                       int64_t valid, int64_t rows) {
  constexpr int kOffsetShift = kQ4 ? 3 : 7;  // the unsigned weights' offset, 8 or 128
  __m512 acc[2][P];
  for (int h = 0; h < 2; ++h)
    for (int p = 0; p < P; ++p) acc[h][p] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i spread0 = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i spread1 = _mm512_add_epi32(spread0, _mm512_set1_epi32(8));
  const int64_t pair_stride = a.nb * 2 * kQuantBlock;
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* blk = panel + b * bb;
    const uint8_t* data = blk + kScaleBytes;
    PrefetchTwoLevels(blk, bb);
    __m512i dot[2][P];
    for (int h = 0; h < 2; ++h)
      for (int p = 0; p < P; ++p) dot[h][p] = _mm512_setzero_si512();
    const int8_t* xb = a.pair_q + ((j0 / 2) * a.nb + b) * 2 * kQuantBlock;
    if constexpr (kQ4) {
      for (int g = 0; g < 4; ++g) {
        const __m512i v = _mm512_loadu_si512(data + g * kGroupBytes);
        const __m512i v0 = _mm512_permutexvar_epi32(spread0, v);
        const __m512i v1 = _mm512_permutexvar_epi32(spread1, v);
        PairStep<P>(dot, _mm512_and_si512(v0, low4), _mm512_and_si512(v1, low4), xb, pair_stride,
                    g);
        PairStep<P>(dot, _mm512_and_si512(_mm512_srli_epi16(v0, 4), low4),
                    _mm512_and_si512(_mm512_srli_epi16(v1, 4), low4), xb, pair_stride, g + 4);
      }
    } else {
      for (int g = 0; g < 8; ++g) {
        const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(data + g * kGroupBytes), flip);
        PairStep<P>(dot, _mm512_permutexvar_epi32(spread0, v), _mm512_permutexvar_epi32(spread1, v),
                    xb, pair_stride, g);
      }
    }
    const __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
    const __m512 ws0 = _mm512_permutexvar_ps(spread0, ws), ws1 = _mm512_permutexvar_ps(spread1, ws);
    for (int p = 0; p < P; ++p) {
      const int64_t i = ((j0 / 2 + p) * a.nb + b) * 2;
      double two_scales;
      int64_t two_sums;
      std::memcpy(&two_scales, a.pair_d + i, sizeof(two_scales));
      std::memcpy(&two_sums, a.pair_sum + i, sizeof(two_sums));
      const __m512 d = _mm512_castpd_ps(_mm512_set1_pd(two_scales));
      const __m512i offset = _mm512_slli_epi32(_mm512_set1_epi64(two_sums), kOffsetShift);
      acc[0][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot[0][p], offset)),
                                  _mm512_mul_ps(ws0, d), acc[0][p]);
      acc[1][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot[1][p], offset)),
                                  _mm512_mul_ps(ws1, d), acc[1][p]);
    }
  }
  // Lanes (output 8h + l/2, row l%2) back to rows of 16 outputs.
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __mmask16 m = static_cast<__mmask16>((1u << valid) - 1);
  for (int p = 0; p < P; ++p) {
    _mm512_mask_storeu_ps(y + 2 * p * out + col, m,
                          _mm512_permutex2var_ps(acc[0][p], even, acc[1][p]));
    if (2 * p + 1 < rows)
      _mm512_mask_storeu_ps(y + (2 * p + 1) * out + col, m,
                            _mm512_permutex2var_ps(acc[0][p], odd, acc[1][p]));
  }
}

// 256-bit kernels, per block: acc[j][h] += dot[j][h] · the block's scales of rows 8h..8h+7 · row
// j's activation scale (dot already offset-corrected).
template <int J>
AMOEBA_AVX2 inline void ScaleBlockAvx2(const uint8_t* blk, const QuantActs& a, int64_t j0,
                                       int64_t b, const __m256i (&dot)[J][2], __m256 (&acc)[J][2]) {
  const __m256 ws0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
  const __m256 ws1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)));
  for (int j = 0; j < J; ++j) {
    const __m256 dx = _mm256_set1_ps(a.d[(j0 + j) * a.nb + b]);
    acc[j][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[j][0]), _mm256_mul_ps(ws0, dx), acc[j][0]);
    acc[j][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[j][1]), _mm256_mul_ps(ws1, dx), acc[j][1]);
  }
}

// The first `valid` of each row's 16 outputs, at column `col` of y (row stride `out`).
template <int J>
AMOEBA_AVX2 inline void StoreRowsAvx2(const __m256 (&acc)[J][2], float* y, int64_t out, int64_t col,
                                      int64_t valid) {
  for (int j = 0; j < J; ++j) {
    alignas(32) float tmp[kPanel];
    _mm256_store_ps(tmp, acc[j][0]);
    _mm256_store_ps(tmp + 8, acc[j][1]);
    std::copy(tmp, tmp + valid, y + j * out + col);
  }
}

// AVX2: a group is two ymm (rows 0-7, 8-15). Q8_0 dots signed × signed with maddubs(|w|,
// sign(x, w)) (|w|, |x| <= 127: the int16 pair sums cannot saturate); Q4_0 dots the unsigned
// nibbles directly and sums a whole block's 8 maddubs in int16 (8 · 2 · 15 · 127 < 32768).
template <int J, bool kQ4, int kPrefetch>
AMOEBA_AVX2 void PanelAvx2(const uint8_t* panel, int64_t bb, const QuantActs& a, int64_t j0,
                           float* y, int64_t out, int64_t col, int64_t valid) {
  __m256 acc[J][2];
  for (int j = 0; j < J; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0F);
  const int64_t xstride = a.nb * kQuantBlock;
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* blk = panel + b * bb;
    const uint8_t* data = blk + kScaleBytes;
    PrefetchAhead<kPrefetch>(blk, bb);
    const int8_t* xb = a.q + (j0 * a.nb + b) * kQuantBlock;
    __m256i dot[J][2];
    if constexpr (kQ4) {
      __m256i s16[J][2];
      for (int j = 0; j < J; ++j) s16[j][0] = s16[j][1] = _mm256_setzero_si256();
      for (int g = 0; g < 4; ++g) {
        for (int h = 0; h < 2; ++h) {
          const __m256i v =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + g * kGroupBytes + 32 * h));
          const __m256i lo = _mm256_and_si256(v, low4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
          for (int j = 0; j < J; ++j) {
            const int8_t* xj = xb + j * xstride;
            s16[j][h] = _mm256_add_epi16(
                s16[j][h], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(Load4(xj + 4 * g))));
            s16[j][h] = _mm256_add_epi16(
                s16[j][h], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(Load4(xj + 16 + 4 * g))));
          }
        }
      }
      for (int j = 0; j < J; ++j) {
        const __m256i corr = _mm256_set1_epi32(8 * a.sum[(j0 + j) * a.nb + b]);
        for (int h = 0; h < 2; ++h)
          dot[j][h] = _mm256_sub_epi32(_mm256_madd_epi16(s16[j][h], ones), corr);
      }
    } else {
      for (int j = 0; j < J; ++j) dot[j][0] = dot[j][1] = _mm256_setzero_si256();
      for (int g = 0; g < 8; ++g) {
        for (int h = 0; h < 2; ++h) {
          const __m256i w =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + g * kGroupBytes + 32 * h));
          const __m256i wabs = _mm256_abs_epi8(w);
          for (int j = 0; j < J; ++j) {
            const __m256i x = _mm256_set1_epi32(Load4(xb + j * xstride + 4 * g));
            const __m256i p = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w));
            dot[j][h] = _mm256_add_epi32(dot[j][h], _mm256_madd_epi16(p, ones));
          }
        }
      }
    }
    ScaleBlockAvx2<J>(blk, a, j0, b, dot, acc);
  }
  StoreRowsAvx2<J>(acc, y, out, col, valid);
}

// AVX-VNNI (256-bit `vpdpbusd`, CPUs with AVX2 but no AVX-512 VNNI, e.g. Intel's hybrid cores):
// the AVX-512 kernel's arithmetic on two ymm per group (rows 0-7, 8-15), with the same offset
// correction; 16 registers hold the accumulators of 2 input rows.
template <int J, bool kQ4, int kPrefetch>
AMOEBA_AVX_VNNI void PanelAvxVnni(const uint8_t* panel, int64_t bb, const QuantActs& a, int64_t j0,
                                  float* y, int64_t out, int64_t col, int64_t valid) {
  constexpr int32_t kOffset = kQ4 ? 8 : 128;
  __m256 acc[J][2];
  for (int j = 0; j < J; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const int64_t xstride = a.nb * kQuantBlock;
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* blk = panel + b * bb;
    const uint8_t* data = blk + kScaleBytes;
    PrefetchAhead<kPrefetch>(blk, bb);
    const int8_t* xb = a.q + (j0 * a.nb + b) * kQuantBlock;
    __m256i dot[J][2];
    for (int j = 0; j < J; ++j) dot[j][0] = dot[j][1] = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
      if constexpr (kQ4) {
        for (int g = 0; g < 4; ++g) {
          const __m256i v =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + g * kGroupBytes + 32 * h));
          const __m256i lo = _mm256_and_si256(v, low4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
          for (int j = 0; j < J; ++j) {
            const int8_t* xj = xb + j * xstride;
            dot[j][h] =
                _mm256_dpbusd_avx_epi32(dot[j][h], lo, _mm256_set1_epi32(Load4(xj + 4 * g)));
            dot[j][h] =
                _mm256_dpbusd_avx_epi32(dot[j][h], hi, _mm256_set1_epi32(Load4(xj + 16 + 4 * g)));
          }
        }
      } else {
        for (int g = 0; g < 8; ++g) {
          const __m256i v = _mm256_xor_si256(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + g * kGroupBytes + 32 * h)),
              flip);
          for (int j = 0; j < J; ++j)
            dot[j][h] = _mm256_dpbusd_avx_epi32(dot[j][h], v,
                                                _mm256_set1_epi32(Load4(xb + j * xstride + 4 * g)));
        }
      }
    }
    for (int j = 0; j < J; ++j) {
      const __m256i corr = _mm256_set1_epi32(kOffset * a.sum[(j0 + j) * a.nb + b]);
      for (int h = 0; h < 2; ++h) dot[j][h] = _mm256_sub_epi32(dot[j][h], corr);
    }
    ScaleBlockAvx2<J>(blk, a, j0, b, dot, acc);
  }
  StoreRowsAvx2<J>(acc, y, out, col, valid);
}

// AMX-int8: 16 rows of activations against one panel, a block at a time: tile 1 holds the 16
// rows' 32 int8 inputs, tile 2 the block's weights as they lie in the panel (8 groups of 16 rows ×
// 4 inputs is the B-tile layout; Q4_0 is widened to signed int8 first), tile 0 their 16 × 16
// int32 dot products: the same integers the VNNI kernel sums, scaled per block in the same
// order, so the two agree bit for bit. The per-block scales keep K at 32 per tile product.
struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
constexpr int64_t kAmxRows = 16;

constexpr TileConfig MakeTileConfig() {
  TileConfig c;
  c.rows[0] = kAmxRows, c.colsb[0] = 64;           // C: 16 rows × 16 int32
  c.rows[1] = kAmxRows, c.colsb[1] = kQuantBlock;  // A: 16 rows × 32 int8
  c.rows[2] = 8, c.colsb[2] = kGroupBytes;         // B: 8 groups × (16 rows × 4 int8)
  for (int t = 3; t < 6; ++t) {                    // the second block in flight
    c.rows[t] = c.rows[t - 3];
    c.colsb[t] = c.colsb[t - 3];
  }
  return c;
}
// In static memory: gcc 12 drops stores to a local config that only ldtilecfg reads.
alignas(64) constexpr TileConfig kTileConfig = MakeTileConfig();

// Once per thread and QuantizedLinearMany call (`call`: that call's number). Not across calls:
// other code on the thread (prefill attention, a library's kernels) may load its own tile
// configuration or release the tiles in between. Per panel, the loads cost ~7% of the kernel's
// time at 16 rows.
std::atomic<uint64_t> next_linear_call{1};
thread_local uint64_t tiles_configured_for_call = 0;

AMOEBA_AMX void ConfigureTiles(uint64_t call) {
  if (tiles_configured_for_call == call) return;
  _tile_loadconfig(&kTileConfig);
  tiles_configured_for_call = call;
}

// One Q4_0 block widened to signed int8 in the B-tile layout (8 groups of 16 rows × 4 inputs).
AMOEBA_AMX __attribute__((always_inline)) inline void WidenQ4Block(const uint8_t* blk, int8_t* w) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  const uint8_t* data = blk + kScaleBytes;
  for (int g = 0; g < 4; ++g) {  // low nibbles: inputs 4g.., high nibbles: inputs 16 + 4g..
    const __m512i v = _mm512_loadu_si512(data + g * kGroupBytes);
    const __m512i lo = _mm512_sub_epi8(_mm512_and_si512(v, low4), eight);
    const __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4), eight);
    _mm512_store_si512(w + g * kGroupBytes, lo);
    _mm512_store_si512(w + (4 + g) * kGroupBytes, hi);
  }
}

// The tile kernel's 16 accumulators, indexed only by constants (fold expressions over AmxRows):
// indexed in loops, gcc 12 kept the array on the stack, a load and a store around every FMA
// (~8% of a 16-row block in isolation).
using AmxRows = std::make_index_sequence<kAmxRows>;
using AmxAcc = __m512[kAmxRows];

// acc[j] += block b's 16 × 16 dot products (row j of `d`) · the panel's scales · row j's
// activation scale (ds[j * nb]: row j's scale of block b), as the VNNI kernel scales a block.
template <size_t... J>
AMOEBA_AMX __attribute__((always_inline)) inline void ScaleTile(std::index_sequence<J...>,
                                                                const uint8_t* blk,
                                                                const int32_t* d, const float* ds,
                                                                int64_t nb, AmxAcc& acc) {
  // The masked form: gcc 12 warns of the plain one's undefined source once inlined here.
  const __m512 ws = _mm512_mask_cvtph_ps(_mm512_setzero_ps(), 0xFFFF,
                                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
  ((acc[J] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(d + J * kPanel)),
                             _mm512_mul_ps(ws, _mm512_set1_ps(ds[J * nb])), acc[J])),
   ...);
}

template <size_t... J>
AMOEBA_AMX __attribute__((always_inline)) inline void ZeroTileAcc(std::index_sequence<J...>,
                                                                  AmxAcc& acc) {
  ((acc[J] = _mm512_setzero_ps()), ...);
}

// Rows [0, rows) of acc, the first `valid` outputs of each, at column `col` of y.
template <size_t... J>
AMOEBA_AMX __attribute__((always_inline)) inline void StoreTileAcc(std::index_sequence<J...>,
                                                                   const AmxAcc& acc, int64_t rows,
                                                                   float* y, int64_t out,
                                                                   int64_t col, int64_t valid) {
  const __mmask16 m = static_cast<__mmask16>((1u << valid) - 1);
  ((static_cast<int64_t>(J) < rows ? _mm512_mask_storeu_ps(y + J * out + col, m, acc[J]) : void()),
   ...);
}

// Rows [j0, j0 + 16) against one panel, its weights and scales block by block (Q4_0: each pair of
// blocks widened to int8 in L1 one iteration before its tile loads read it; widening whole
// panels first spilled L1 from 2048 inputs on and lost to VNNI at 16 rows). The first group of rows
// (`stream`) prefetches the panel ahead of its blocks (PrefetchTwoLevels): without it the kernel's
// compute and the weights' arrival from DRAM added up instead of overlapping (100m q8_0, 16 rows:
// 14 GB/s of weights in a decode step against 27 in L3 and a 30 GB/s probe). Blocks go in pairs (C
// tiles 0 and 3, A tiles 1 and 4, B tiles 2 and 5), software-pipelined: a pair's products are
// stored while the pair before it is scaled from its own buffer (scaling a pair right after its
// tile stores made the loads wait for them). Lambdas here carry the target attribute: without it
// ScaleTile became a call with the 16 accumulators in memory.
template <bool kQ4>
AMOEBA_AMX void PanelAmx(const uint8_t* panel, int64_t bb, const QuantActs& a, int64_t j0,
                         bool stream, float* y, int64_t out, int64_t col, int64_t valid,
                         int64_t store_rows) {
  alignas(64) int32_t dots[2][2][kAmxRows * kPanel];  // [pair parity][block of the pair]
  alignas(64) int8_t widened[kQ4 ? 2 : 1][2][8 * kGroupBytes];
  auto widen_pair = [&](int64_t b, int parity) AMOEBA_AMX {
    if constexpr (kQ4) {
      if (stream) PrefetchTwoLevels(panel + b * bb, 2 * bb);
      WidenQ4Block(panel + b * bb, widened[parity][0]);
      if (b + 1 < a.nb) WidenQ4Block(panel + (b + 1) * bb, widened[parity][1]);
    }
  };
  auto weights = [&](int64_t b, int parity, int which) AMOEBA_AMX -> const void* {
    if constexpr (kQ4) return widened[parity][which];
    return panel + (b + which) * bb + kScaleBytes;
  };
  if (a.nb > 0) widen_pair(0, 0);
  AmxAcc acc;
  ZeroTileAcc(AmxRows(), acc);
  const int64_t xstride = a.nb * kQuantBlock;
  const int8_t* x = a.q + j0 * xstride;
  for (int64_t b = 0; b < a.nb + 2; b += 2) {
    const int parity = static_cast<int>((b / 2) & 1);
    if (b < a.nb) {  // the products of blocks b and b + 1
      const bool two = b + 1 < a.nb;
      // Tile loads alone left the weights' DRAM latency exposed.
      if (!kQ4 && stream) PrefetchTwoLevels(panel + b * bb, 2 * bb);
      _tile_zero(0);
      _tile_loadd(1, x + b * kQuantBlock, xstride);
      _tile_loadd(2, weights(b, parity, 0), kGroupBytes);
      if (two) {
        _tile_zero(3);
        _tile_loadd(4, x + (b + 1) * kQuantBlock, xstride);
        _tile_loadd(5, weights(b, parity, 1), kGroupBytes);
      }
      _tile_dpbssd(0, 1, 2);
      if (two) _tile_dpbssd(3, 4, 5);
      _tile_stored(0, dots[parity][0], kPanel * sizeof(int32_t));
      if (two) _tile_stored(3, dots[parity][1], kPanel * sizeof(int32_t));
      if (b + 2 < a.nb) widen_pair(b + 2, parity ^ 1);
    }
    if (b >= 2) {  // the pair before, in block order: the same sums as the VNNI kernel
      const int64_t p = b - 2;
      const float* ds = a.d + j0 * a.nb + p;
      ScaleTile(AmxRows(), panel + p * bb, dots[parity ^ 1][0], ds, a.nb, acc);
      if (p + 1 < a.nb)
        ScaleTile(AmxRows(), panel + (p + 1) * bb, dots[parity ^ 1][1], ds + 1, a.nb, acc);
    }
  }
  StoreTileAcc(AmxRows(), acc, store_rows, y, out, col, valid);
}

using PanelFn = void (*)(const uint8_t*, int64_t, const QuantActs&, int64_t, float*, int64_t,
                         int64_t, int64_t);
using PairFn = void (*)(const uint8_t*, int64_t, const QuantActs&, int64_t, float*, int64_t,
                        int64_t, int64_t, int64_t);

// The fewest rows that run in pairs. bench/kernels, Zen 5, 2 threads, pairs / rows alone side by
// side: 16 and 64 rows 1.10-1.25x, 4 rows 0.96-1.15x; below 4 (one pass of PanelVnni, its
// chains two per row) pairs measured slower. A call with fewer rows does not build the layout.
constexpr int64_t kMinPairRows = 4;

// The fewest rows of a group of 16 that run faster in tiles (the group padded with zero rows)
// than in VNNI: 100m, bench/decode on a Sapphire Rapids VM, % of the roofline VNNI -> tiles: q8_0
// 4 rows 72 -> 74%, 6 rows 67 -> 70%, 9 rows 59 -> 67%, 14 rows 48 -> 64%; q4_0, whose tiles also
// widen every block, 6 rows 62 -> 50%, 9 rows 49 -> 49%, 10 rows 46 -> 48%, 12 rows 42 -> 47%.
// With the tile kernel's accumulators in registers, two pairs later: q8_0 2 rows 82 / 81 -> 84 /
// 81%, 3 rows 74 / 75 -> 81 / 79%, 4 rows 73 / 73 -> 77 / 79%, 5 rows 68 / 69 -> 75 / 77%; q4_0 6
// rows 65 / 62 -> 55 / 56%, 8 rows 60 / 57 -> 53 / 54%, 9 rows 54 / 50 -> 52 / 54%.
constexpr int64_t MinTileRows(bool q4) {
  return q4 ? 10 : 3;
}

// Rows [r0, r0 + rows) against one panel, in register-sized groups of rows.
template <bool kQ4, int kPf>
void RunPanel(QuantKernel kernel, uint64_t call, const uint8_t* panel, int64_t bb,
              const QuantActs& a, int64_t r0, int64_t rows, float* y, int64_t out, int64_t col,
              int64_t valid) {
  static constexpr PanelFn kVnni[8] = {PanelVnni<1, kQ4, kPf>, PanelVnni<2, kQ4, kPf>,
                                       PanelVnni<3, kQ4, kPf>, PanelVnni<4, kQ4, kPf>,
                                       PanelVnni<5, kQ4, kPf>, PanelVnni<6, kQ4, kPf>,
                                       PanelVnni<7, kQ4, kPf>, PanelVnni<8, kQ4, kPf>};
  static constexpr PanelFn kAvxVnni[2] = {PanelAvxVnni<1, kQ4, kPf>, PanelAvxVnni<2, kQ4, kPf>};
  static constexpr PanelFn kAvx2[2] = {PanelAvx2<1, kQ4, kPf>, PanelAvx2<2, kQ4, kPf>};
  if (kernel == QuantKernel::kScalar) {
    PanelScalar<kQ4>(panel, bb, a, r0, rows, y + r0 * out, out, col, valid);
    return;
  }
  if (kernel == QuantKernel::kAmxInt8) {
    // Whole groups of 16 rows in tiles; a last partial group of at least MinTileRows rows in
    // tiles too when the activations are padded to 16 rows (its extra rows computed, not
    // stored), else in VNNI.
    int64_t tiled = rows / kAmxRows * kAmxRows;
    const int64_t rest = rows - tiled;
    const bool partial = rest >= MinTileRows(kQ4) && r0 + tiled + kAmxRows <= a.rows;
    if (tiled > 0 || partial) {
      ConfigureTiles(call);
      for (int64_t j0 = r0; j0 < r0 + tiled; j0 += kAmxRows)
        PanelAmx<kQ4>(panel, bb, a, j0, j0 == r0, y + j0 * out, out, col, valid, kAmxRows);
      if (partial) {
        PanelAmx<kQ4>(panel, bb, a, r0 + tiled, tiled == 0, y + (r0 + tiled) * out, out, col, valid,
                      rest);
        tiled = rows;
      }
    }
    r0 += tiled;
    rows -= tiled;
  }
  const bool vnni = kernel == QuantKernel::kAvx512Vnni || kernel == QuantKernel::kAmxInt8;
  if (vnni && a.pair_q) {
    // Eight rows at a time in pairs; a last pass of fewer than kMinPairRows in PanelVnni.
    static constexpr PairFn kPairs[4] = {PanelVnniPairs<1, kQ4>, PanelVnniPairs<2, kQ4>,
                                         PanelVnniPairs<3, kQ4>, PanelVnniPairs<4, kQ4>};
    for (int64_t j0 = r0; j0 < r0 + rows; j0 += 8) {
      const int64_t J = std::min<int64_t>(8, r0 + rows - j0);
      if (J >= kMinPairRows)
        kPairs[(J + 1) / 2 - 1](panel, bb, a, j0, y + j0 * out, out, col, valid, J);
      else
        kVnni[J - 1](panel, bb, a, j0, y + j0 * out, out, col, valid);
    }
    return;
  }
  const PanelFn* fns = vnni ? kVnni : kernel == QuantKernel::kAvxVnni ? kAvxVnni : kAvx2;
  const int64_t step = vnni ? 8 : 2;
  for (int64_t j0 = r0; j0 < r0 + rows; j0 += step) {
    const int64_t J = std::min(step, r0 + rows - j0);
    fns[J - 1](panel, bb, a, j0, y + j0 * out, out, col, valid);
  }
}

// Panel p of output `o` for rows [r0, r0 + rows) (those within the panel's rows, if it has a
// limit).
void RunOutputPanel(bool q4, int prefetch, QuantKernel kernel, uint64_t call, const QuantActs& acts,
                    int64_t r0, int64_t rows, const PackedOutput& o, int64_t p, int64_t valid) {
  const int64_t bb = o.panels->size(2);
  const auto* panel =
      static_cast<const uint8_t*>(o.panels->data_ptr()) + p * o.panels->size(1) * bb;
  static constexpr decltype(&RunPanel<true, 0>) kRuns[2][3] = {
      {RunPanel<false, 0>, RunPanel<false, 1>, RunPanel<false, 2>},
      {RunPanel<true, 0>, RunPanel<true, 1>, RunPanel<true, 2>}};
  auto run = kRuns[q4][prefetch];
  const int64_t here = o.panel_rows ? std::clamp<int64_t>(o.panel_rows[p] - r0, 0, rows) : rows;
  if (here > 0) run(kernel, call, panel, bb, acts, r0, here, o.y, o.out, p * kPanel, valid);
}

std::atomic<bool> g_row_pairs{true};  // ForceRowPairs

// Where a call's activations are quantized to: rows, then (for the pair kernel) pairs of rows.
struct ActBuffers {
  int8_t* q;
  float* d;
  int32_t* sum;
};

// Rows per team member from which the members quantize a share each (QuantizedLinearMany).
constexpr int64_t kSharedQuantMinRowsPerThread = 2;

}  // namespace

void ForceRowPairs(bool on) {
  g_row_pairs.store(on);
}

void QuantizedLinearMany(const float* x, int64_t n, int64_t in,
                         std::span<const PackedOutput> outs) {
  const bool q4 = PanelsFormat(*outs[0].panels) == WeightFormat::kQ4_0;
  const int64_t nb = (in + kQuantBlock - 1) / kQuantBlock;
  const QuantKernel kernel = ActiveQuantKernel();
  // The tile kernel's last partial group of rows runs in tiles from MinTileRows rows on: the
  // activations then get zero rows up to a whole group.
  const int64_t padded_n = kernel == QuantKernel::kAmxInt8 && n % kAmxRows >= MinTileRows(q4)
                               ? (n + kAmxRows - 1) / kAmxRows * kAmxRows
                               : n;
  thread_local std::vector<int8_t> xq;  // grown once, reused: no allocation per decode step
  thread_local std::vector<float> xd;
  thread_local std::vector<int32_t> xs;
  const bool avx512 = kernel == QuantKernel::kAvx512Vnni || kernel == QuantKernel::kAmxInt8;
  // Twice over with enough rows for the pair kernel: rows, then pairs of rows (one odd row
  // padded), one after the other in each buffer.
  const bool pairs = avx512 && n >= kMinPairRows && g_row_pairs.load(std::memory_order_relaxed);
  const int64_t pair_rows = pairs ? (padded_n + 1) / 2 * 2 : 0;
  const int64_t all_rows = padded_n + pair_rows;
  if (static_cast<int64_t>(xq.size()) < all_rows * nb * kQuantBlock)
    xq.resize(all_rows * nb * kQuantBlock);
  if (static_cast<int64_t>(xd.size()) < all_rows * nb) {
    xd.resize(all_rows * nb);
    xs.resize(all_rows * nb);
  }
  const int prefetch = n > kPrefetchChoiceMaxRows ? kDefaultPrefetchArm : StreamPrefetchArm();
  // The activations in buffers of all_rows rows: rows, then (with pairs) the pair layout.
  auto acts_in = [&](ActBuffers buf) {
    QuantActs a{buf.q, buf.d, buf.sum, nb, padded_n};
    if (pairs) {
      a.pair_q = buf.q + padded_n * nb * kQuantBlock;
      a.pair_d = buf.d + padded_n * nb;
      a.pair_sum = buf.sum + padded_n * nb;
    }
    return a;
  };
  // The caller's buffers by pointer: inside a lambda on another thread, `xq` would name that
  // thread's own (thread_local) vector.
  const ActBuffers own{xq.data(), xd.data(), xs.data()};
  QuantActs acts = acts_in(own);
  // Rows [n, padded_n) and pairs past the call's rows: zero values and scales (their products
  // are computed, never stored).
  auto zero_padding = [&](ActBuffers buf) {
    auto zero = [&](int64_t from, int64_t to) {
      std::fill(buf.q + from * nb * kQuantBlock, buf.q + to * nb * kQuantBlock, int8_t{0});
      std::fill(buf.d + from * nb, buf.d + to * nb, 0.f);
      std::fill(buf.sum + from * nb, buf.sum + to * nb, 0);
    };
    zero(n, padded_n);
    if (pairs) zero(padded_n + (n + 1) / 2 * 2, all_rows);  // whole pairs past the call's rows
  };
  // Rows [r0, r0 + rows) of x, r0 even, into `buf` (both layouts).
  auto quantize_into = [&](ActBuffers buf, int64_t r0, int64_t rows) {
    int8_t* q = buf.q + r0 * nb * kQuantBlock;
    float* d = buf.d + r0 * nb;
    int32_t* sum = buf.sum + r0 * nb;
    if (avx512)
      QuantizeRowsAvx512(x + r0 * in, rows, in, nb, q, d, sum);
    else
      QuantizeRows(x + r0 * in, rows, in, nb, q, d, sum);
    if (pairs)
      PairRowsAvx512(q, d, sum, nb, rows, buf.q + (padded_n + r0) * nb * kQuantBlock,
                     buf.d + (padded_n + r0) * nb, buf.sum + (padded_n + r0) * nb);
  };
  const uint64_t call = next_linear_call.fetch_add(1, std::memory_order_relaxed);
  // Rows in chunks whose int8 activations stay in L2 while every panel streams past them once.
  // A long prompt is quantized a few chunks at a time, just before their panels run (all at once,
  // its activations would leave L2 before the panels read them), on every thread (on one, the
  // others would wait: quantizing is memory-bound and as long as a fifth of the panels' time).
  constexpr int64_t kRowChunk = 64, kQuantRows = 4 * kRowChunk;
  StepProfile* const profile = AttachedStepProfile();  // this thread's share, when profiled
  // In a team every member runs the panels over all rows; with a few rows each it quantizes its
  // share into a buffer they all read (100m, 16 rows, 2 threads: ~3% of a decode step; each
  // member quantizing every row read all the float rows from the other core). One row or so
  // each, the barrier costs more than the rows.
  Team* const team = CurrentTeam();
  if (team && team->size() > 1 && n <= kRowChunk &&
      n >= kSharedQuantMinRowsPerThread * team->size()) {
    const int64_t qbytes = all_rows * nb * kQuantBlock,
                  sbytes = all_rows * nb * static_cast<int64_t>(sizeof(float));
    std::byte* shared = team->SharedScratch(qbytes + 2 * sbytes);
    if (shared) {
      const auto started =
          profile ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
      const ActBuffers team_buf{reinterpret_cast<int8_t*>(shared),
                                reinterpret_cast<float*>(shared + qbytes),
                                reinterpret_cast<int32_t*>(shared + qbytes + sbytes)};
      acts = acts_in(team_buf);
      if (team->tid() == 0) zero_padding(team_buf);
      // Whole pairs of rows per member (each pairs its own).
      int64_t b, e;
      ParallelChunk(0, (n + 1) / 2, 1, team->tid(), team->size(), &b, &e);
      if (b < e) quantize_into(team_buf, 2 * b, std::min(2 * e, n) - 2 * b);
      team->Barrier();
      if (profile)
        profile->quantize_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(
                                    std::chrono::steady_clock::now() - started)
                                    .count();
      ForEachPanel(outs, [&](const PackedOutput& o, int64_t p, int64_t valid) {
        RunOutputPanel(q4, prefetch, kernel, call, acts, 0, n, o, p, valid);
      });
      return;
    }
  }
  zero_padding(own);
  for (int64_t r0 = 0; r0 < n; r0 += kRowChunk) {
    const int64_t rows = std::min(kRowChunk, n - r0);
    if (r0 % kQuantRows == 0) {
      const auto started =
          profile ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
      const int64_t qrows = std::min(kQuantRows, n - r0);
      if (qrows > kRowChunk && !at::in_parallel_region()) {  // a prefill, outside a team
        at::parallel_for(r0 / 2, (r0 + qrows + 1) / 2, 8, [&](int64_t b, int64_t e) {
          quantize_into(own, 2 * b, std::min(2 * e, r0 + qrows) - 2 * b);  // whole pairs
        });
      } else {
        quantize_into(own, r0, qrows);
      }
      if (profile)
        profile->quantize_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(
                                    std::chrono::steady_clock::now() - started)
                                    .count();
    }
    ForEachPanel(outs, [&](const PackedOutput& o, int64_t p, int64_t valid) {
      RunOutputPanel(q4, prefetch, kernel, call, acts, r0, rows, o, p, valid);
    });
  }
}

}  // namespace amoeba
