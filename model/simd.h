// SIMD helpers shared by the CPU kernels: target attributes and weight loads that widen fp16 to
// fp32 in registers (F16C). Functions carry their own target attribute, so the rest of the build
// stays portable; callers dispatch at run time (kernels.h: ActiveKernelIsa).
#pragma once
#include <ATen/ATen.h>
#include <immintrin.h>

// GCC 12's _mm512_undefined_ps (inside _mm512_cvtph_ps, _mm512_reduce_add_ps) trips
// -Wmaybe-uninitialized by design; the value is never read.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define AMOEBA_AVX2 __attribute__((target("avx2,fma,f16c")))
#define AMOEBA_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx2,fma,f16c")))

namespace amoeba::simd {

// Eight weights as fp32: plain load, or IEEE half converted in registers.
AMOEBA_AVX2 inline __m256 Load8(const float* p) {
  return _mm256_loadu_ps(p);
}
AMOEBA_AVX2 inline __m256 Load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Sixteen weights as fp32 (all, or those in mask `m` with the rest zero).
AMOEBA_AVX512 inline __m512 Load16(const float* p) {
  return _mm512_loadu_ps(p);
}
AMOEBA_AVX512 inline __m512 Load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
AMOEBA_AVX512 inline __m512 Load16(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
AMOEBA_AVX512 inline __m512 Load16(const at::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

}  // namespace amoeba::simd
