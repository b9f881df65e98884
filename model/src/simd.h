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

// Lane-wise operations for TransposeReduce16, as functors: a target-attributed lambda returning a
// vector also gets a function-pointer thunk without the attribute, which GCC 12 warns about
// (-Wpsabi). Max in its zero-masked form: GCC 12 flags the plain form's undefined source as
// uninitialized once inlined.
struct AddPs {
  AMOEBA_AVX512 static __m512 Apply(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
};
struct MaxPs {
  AMOEBA_AVX512 static __m512 Apply(__m512 a, __m512 b) {
    return _mm512_maskz_max_ps(0xFFFF, a, b);
  }
};
struct AddEpi32 {  // integer lanes carried in float vectors
  AMOEBA_AVX512 static __m512 Apply(__m512 a, __m512 b) {
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  }
};

// Sixteen vectors in, one out: lane t holds a[t]'s 16 lanes combined by Op (one of the above).
// Data movement only besides Op, so integer lanes pass through the float shuffles intact.
template <typename Op>
AMOEBA_AVX512 inline __m512 TransposeReduce16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: two partial results of each of a pair
    b[i] = Op::Apply(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                     _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: partial results of 4 vectors, in order
    const __m512d lo =
        _mm512_unpacklo_pd(_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]));
    const __m512d hi =
        _mm512_unpackhi_pd(_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]));
    c[i] = Op::Apply(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  // Combine the four 128-bit lanes of each c while gathering them into one vector.
  const __m512 e01 =
      Op::Apply(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 e23 =
      Op::Apply(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return Op::Apply(_mm512_shuffle_f32x4(e01, e23, 0x88), _mm512_shuffle_f32x4(e01, e23, 0xDD));
}

// Lane sums and maxima through memory: GCC 12 flags the undefined start vectors inside
// _mm512_reduce_*_ps (and the shuffles it is made of) as uninitialized in some inlining contexts.
AMOEBA_AVX512 inline float ReduceAdd16(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  float s = 0.f;
  for (float x : lanes) s += x;
  return s;
}
AMOEBA_AVX512 inline float ReduceMax16(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  float m = lanes[0];
  for (float x : lanes) m = x > m ? x : m;
  return m;
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

// exp(x) for fp32 lanes: Cephes' expf (range reduction by ln 2 in two parts, a degree-5
// polynomial, the exponent built in the integer unit), within ~2 ulp of std::exp; x is clamped
// to [-87.3, 88.4], where the result stays a normal number.
namespace exp_constants {
inline constexpr float kHi = 88.3762626647949f, kLo = -87.3365447504019f;
inline constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f,
                       kLn2Lo = -2.12194440e-4f;
inline constexpr float kP[6] = {1.9875691500E-4f, 1.3981999507E-3f, 8.3334519073E-3f,
                                4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f};
}  // namespace exp_constants

AMOEBA_AVX2 inline __m256 Exp8(__m256 x) {
  using namespace exp_constants;
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kLo)), _mm256_set1_ps(kHi));
  const __m256 fx =
      _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), _mm256_set1_ps(.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kLn2Hi), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kLn2Lo), x);
  __m256 y = _mm256_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kP[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

AMOEBA_AVX512 inline __m512 Exp16(__m512 x) {
  using namespace exp_constants;
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kLo)), _mm512_set1_ps(kHi));
  const __m512 fx =
      _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), _mm512_set1_ps(.5f)),
                           _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kLn2Hi), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kLn2Lo), x);
  __m512 y = _mm512_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kP[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  const __m512i e =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

}  // namespace amoeba::simd
