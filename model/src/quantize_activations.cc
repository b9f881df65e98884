// Activation rows quantized to Q8_0 blocks, as the integer kernels consume them.
#include <immintrin.h>

#include <vector>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "model/quantized_panels.h"
#include "quantized_block.h"
#include "simd.h"

#define AMOEBA_AVX512_VNNI \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512vnni,avx2,fma,f16c")))

namespace amoeba {
namespace quant {

// GGML's Q8_0 rule (d = amax / 127, q = round(x / d)); the scale stays fp32 here, and rounding is
// to nearest even (what the SIMD conversions do), identical on every path.
__attribute__((target_clones("avx2", "default"))) void QuantizeRows(const float* x, int64_t n,
                                                                    int64_t in, int64_t nb,
                                                                    int8_t* q, float* d,
                                                                    int32_t* sum) {
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * in;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * kQuantBlock, valid = std::min(kQuantBlock, in - k0);
      float v[kQuantBlock] = {};
      std::memcpy(v, xr + k0, valid * sizeof(float));
      float amax = 0.f;
      for (int64_t k = 0; k < kQuantBlock; ++k) amax = std::max(amax, std::fabs(v[k]));
      const float scale = amax / 127.f, inv = scale != 0.f ? 1.f / scale : 0.f;
      int8_t* qb = q + (r * nb + b) * kQuantBlock;
      int32_t s = 0;
      for (int64_t k = 0; k < kQuantBlock; ++k) {
        const int32_t qi = static_cast<int32_t>(std::nearbyint(v[k] * inv));
        qb[k] = static_cast<int8_t>(qi);
        s += qi;
      }
      d[r * nb + b] = scale;
      sum[r * nb + b] = s;
    }
  }
}

// The same rule, 32 values per block in two zmm; bit for bit QuantizeRows (masked loads zero the
// tail, the conversion rounds to nearest even): decode quantizes ~4 activation rows per layer
// and token on one core while the other waits, so this serial step is worth the vectors.
AMOEBA_AVX512_VNNI void QuantizeRowsAvx512(const float* x, int64_t n, int64_t in, int64_t nb,
                                           int8_t* q, float* d, int32_t* sum) {
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * in;
    // Sixteen blocks at a time: their maxima and sums reduced across lanes together (one block at a
    // time, the two horizontal reductions and the scalar division were most of the work).
    for (int64_t b0 = 0; b0 < nb; b0 += 16) {
      const int64_t count = std::min<int64_t>(16, nb - b0);
      // The 32 input vectors are loaded again (from L1) for the second pass rather than kept:
      // kept, with the 16 reductions, they overflowed the registers onto the stack.
      __m512 red[16];
      __mmask16 m0[16], m1[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t k0 = (b0 + i) * kQuantBlock;
        const int64_t valid = i < count ? std::min(kQuantBlock, in - k0) : 0;
        m0[i] = static_cast<__mmask16>(valid >= 16 ? 0xFFFF : (1u << valid) - 1);
        m1[i] = static_cast<__mmask16>(valid >= 32  ? 0xFFFF
                                       : valid > 16 ? (1u << (valid - 16)) - 1
                                                    : 0);
        red[i] = simd::MaxPs::Apply(_mm512_abs_ps(_mm512_maskz_loadu_ps(m0[i], xr + k0)),
                                    _mm512_abs_ps(_mm512_maskz_loadu_ps(m1[i], xr + k0 + 16)));
      }
      const __m512 amax = simd::TransposeReduce16<simd::MaxPs>(red);
      const __m512 scale = _mm512_div_ps(amax, _mm512_set1_ps(127.f));
      const __mmask16 nonzero = _mm512_cmp_ps_mask(scale, _mm512_setzero_ps(), _CMP_NEQ_OQ);
      alignas(64) float inv[16];
      _mm512_store_ps(inv, _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(1.f), scale));
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t k0 = (b0 + i) * kQuantBlock;
        const __m512 vinv = _mm512_set1_ps(inv[i]);
        const __m512i q0 =
            _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m0[i], xr + k0), vinv));
        const __m512i q1 =
            _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m1[i], xr + k0 + 16), vinv));
        if (i < count) {
          int8_t* qb = q + (r * nb + b0 + i) * kQuantBlock;
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtepi32_epi8(q0));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtepi32_epi8(q1));
        }
        red[i] = _mm512_castsi512_ps(_mm512_add_epi32(q0, q1));
      }
      const __mmask16 lanes = static_cast<__mmask16>((1u << count) - 1);
      _mm512_mask_storeu_ps(d + r * nb + b0, lanes, scale);
      _mm512_mask_storeu_epi32(sum + r * nb + b0, lanes,
                               _mm512_castps_si512(simd::TransposeReduce16<simd::AddEpi32>(red)));
    }
  }
}

// One permute per pair and block: the two rows' 32 bytes (eight groups of 4) interleaved group by
// group into 64.
AMOEBA_AVX512_VNNI void PairRowsAvx512(const int8_t* q, const float* d, const int32_t* sum,
                                       int64_t nb, int64_t rows, int8_t* pair_q, float* pair_d,
                                       int32_t* pair_sum) {
  const __m512i interleave =
      _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const int64_t row_bytes = nb * kQuantBlock;
  for (int64_t p = 0; 2 * p < rows; ++p) {
    const int64_t r = 2 * p;
    const bool second = r + 1 < rows;
    for (int64_t b = 0; b < nb; ++b) {
      const int8_t* block = q + r * row_bytes + b * kQuantBlock;
      const __m512i lo =
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block)));
      const __m512i hi = second ? _mm512_castsi256_si512(_mm256_loadu_si256(
                                      reinterpret_cast<const __m256i*>(block + row_bytes)))
                                : _mm512_setzero_si512();
      _mm512_storeu_si512(pair_q + (p * nb + b) * 2 * kQuantBlock,
                          _mm512_permutex2var_epi32(lo, interleave, hi));
      const int64_t i = (p * nb + b) * 2;
      pair_d[i] = d[r * nb + b];
      pair_sum[i] = sum[r * nb + b];
      pair_d[i + 1] = second ? d[(r + 1) * nb + b] : 0.f;
      pair_sum[i + 1] = second ? sum[(r + 1) * nb + b] : 0;
    }
  }
}

}  // namespace quant

using namespace quant;

at::Tensor QuantizeDequantizeActivations(const at::Tensor& x) {
  const at::Tensor xc = x.to(at::kFloat).contiguous();
  const int64_t n = xc.size(0), in = xc.size(1), nb = (in + kQuantBlock - 1) / kQuantBlock;
  std::vector<int8_t> q(n * nb * kQuantBlock);
  std::vector<float> d(n * nb);
  std::vector<int32_t> s(n * nb);
  QuantizeRows(xc.data_ptr<float>(), n, in, nb, q.data(), d.data(), s.data());
  at::Tensor out = at::empty({n, in});
  float* o = out.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r)
    for (int64_t k = 0; k < in; ++k)
      o[r * in + k] = d[r * nb + k / kQuantBlock] * static_cast<float>(q[r * nb * kQuantBlock + k]);
  return out;
}

}  // namespace amoeba
