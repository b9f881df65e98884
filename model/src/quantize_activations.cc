// Activation rows quantized to Q8_0 blocks, as the integer kernels consume them.
#include <immintrin.h>

#include <vector>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "quantized_block.h"
#include "simd.h"
#include "model/quantized_panels.h"

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
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * kQuantBlock, valid = std::min(kQuantBlock, in - k0);
      const __mmask16 m0 = static_cast<__mmask16>(valid >= 16 ? 0xFFFF : (1u << valid) - 1);
      const __mmask16 m1 = static_cast<__mmask16>(valid >= 32  ? 0xFFFF
                                                  : valid > 16 ? (1u << (valid - 16)) - 1
                                                               : 0);
      const __m512 v0 = _mm512_maskz_loadu_ps(m0, xr + k0);
      const __m512 v1 = _mm512_maskz_loadu_ps(m1, xr + k0 + 16);
      const float amax = simd::ReduceMax16(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float scale = amax / 127.f, inv = scale != 0.f ? 1.f / scale : 0.f;
      const __m512 vinv = _mm512_set1_ps(inv);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vinv));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vinv));
      int8_t* qb = q + (r * nb + b) * kQuantBlock;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtepi32_epi8(q1));
      d[r * nb + b] = scale;
      sum[r * nb + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
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
