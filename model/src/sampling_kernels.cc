#include "sampling_kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "model/kernels.h"
#include "simd.h"

namespace amoeba {
namespace {

constexpr int64_t kFlush = 1024;  // elements per float partial sum
// Below this exp() is denormal or 0; the vector exp clamps there, the passes write exactly 0.
constexpr float kExpFloor = simd::exp_constants::kLo;

// ---- Scalar: the rules, and the tails of the vector passes. ----

float RowMaxScalar(const float* x, int64_t n) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, x[i]);
  return mx;
}
double SumExpScalar(const float* x, int64_t n, float mx) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(x[i] - mx);
  return sum;
}
double ExpScaledScalar(const float* x, int64_t n, float mx, float scale, float* p) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = (x[i] - mx) * scale;
    p[i] = v >= kExpFloor ? std::exp(v) : 0.f;  // and 0 for NaN
    sum += p[i];
  }
  return sum;
}
double MassAtLeastScalar(const float* p, int64_t n, float at_least, int64_t* count) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] >= at_least) {
      sum += p[i];
      ++*count;
    }
  }
  return sum;
}
double ZeroBelowScalar(float* p, int64_t n, float at_least) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] < at_least) p[i] = 0.f;
    sum += p[i];
  }
  return sum;
}
// The indices of [from, n) (a vector pass's tail) with lo <= x[i] < hi, into out.
int64_t IndicesInRangeScalar(const float* x, int64_t from, int64_t n, float lo, float hi,
                             int32_t* out) {
  int64_t c = 0;
  for (int64_t i = from; i < n; ++i)
    if (x[i] >= lo && x[i] < hi) out[c++] = static_cast<int32_t>(i);
  return c;
}
// Walks p[i, end) from `r` left: the index where it is reached, or -1 with r updated.
int64_t WalkMass(const float* p, int64_t i, int64_t end, double* r) {
  for (; i < end; ++i) {
    *r -= p[i];
    if (*r <= 0 && p[i] > 0) return i;
  }
  return -1;
}
int64_t LastPositive(const float* p, int64_t n) {
  for (int64_t i = n; i-- > 0;)
    if (p[i] > 0) return i;
  return 0;
}
int64_t FirstReachingMassScalar(const float* p, int64_t n, double r) {
  const int64_t i = WalkMass(p, 0, n, &r);
  return i >= 0 ? i : LastPositive(p, n);
}
// The same walk, skipping whole kFlush-element chunks whose sum (sum_of(begin, end), in vectors)
// r passes.
template <typename SumOf>
int64_t FirstReachingMassChunked(const float* p, int64_t n, double r, const SumOf& sum_of) {
  for (int64_t i = 0; i < n; i += kFlush) {
    const int64_t end = std::min(n, i + kFlush);
    if (const double s = sum_of(i, end); r - s > 0) {
      r -= s;
      continue;
    }
    if (const int64_t at = WalkMass(p, i, end, &r); at >= 0) return at;
  }
  return LastPositive(p, n);
}

// ---- AVX2 ----

AMOEBA_AVX2 double ReduceToDouble(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  double s = 0;
  for (float l : lanes) s += l;
  return s;
}

AMOEBA_AVX2 float RowMaxAvx2(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  // max_ps returns its second operand when the first is NaN: NaNs never win.
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(_mm256_loadu_ps(x + i), m);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float mx = RowMaxScalar(x + i, n - i);
  for (float v : lanes) mx = std::max(mx, v);
  return mx;
}

// sum(f(i)) over the whole vectors of [0, n) in float partial sums flushed to a double every
// kFlush elements; *done: where the vectors stopped.
template <typename F>
AMOEBA_AVX2 double ChunkedSumAvx2(int64_t n, int64_t* done, const F& f) {
  double sum = 0;
  int64_t i = 0;
  while (i + 8 <= n) {
    __m256 acc = _mm256_setzero_ps();
    for (const int64_t end = std::min(n - 7, i + kFlush); i < end; i += 8)
      acc = _mm256_add_ps(acc, f(i));
    sum += ReduceToDouble(acc);
  }
  *done = i;
  return sum;
}

AMOEBA_AVX2 double SumExpAvx2(const float* x, int64_t n, float mx) {
  const __m256 vmx = _mm256_set1_ps(mx);
  int64_t i = 0;
  const double sum = ChunkedSumAvx2(n, &i, [&](int64_t j) AMOEBA_AVX2 {
    return simd::Exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), vmx));
  });
  return sum + SumExpScalar(x + i, n - i, mx);
}

AMOEBA_AVX2 double ExpScaledAvx2(const float* x, int64_t n, float mx, float scale, float* p) {
  const __m256 vmx = _mm256_set1_ps(mx), vs = _mm256_set1_ps(scale);
  const __m256 floor = _mm256_set1_ps(kExpFloor);
  int64_t i = 0;
  const double sum = ChunkedSumAvx2(n, &i, [&](int64_t j) AMOEBA_AVX2 {
    const __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vmx), vs);
    const __m256 e = _mm256_and_ps(_mm256_cmp_ps(v, floor, _CMP_GE_OQ), simd::Exp8(v));
    _mm256_storeu_ps(p + j, e);
    return e;
  });
  return sum + ExpScaledScalar(x + i, n - i, mx, scale, p + i);
}

AMOEBA_AVX2 double MassAtLeastAvx2(const float* p, int64_t n, float at_least, int64_t* count) {
  const __m256 t = _mm256_set1_ps(at_least);
  int64_t i = 0, c = 0;
  const double sum = ChunkedSumAvx2(n, &i, [&](int64_t j) AMOEBA_AVX2 {
    const __m256 v = _mm256_loadu_ps(p + j);
    const __m256 ge = _mm256_cmp_ps(v, t, _CMP_GE_OQ);
    c += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(ge)));
    return _mm256_and_ps(ge, v);
  });
  *count = c;
  return sum + MassAtLeastScalar(p + i, n - i, at_least, count);
}

AMOEBA_AVX2 double ZeroBelowAvx2(float* p, int64_t n, float at_least) {
  const __m256 t = _mm256_set1_ps(at_least);
  int64_t i = 0;
  const double sum = ChunkedSumAvx2(n, &i, [&](int64_t j) AMOEBA_AVX2 {
    const __m256 v = _mm256_loadu_ps(p + j);
    const __m256 kept = _mm256_andnot_ps(_mm256_cmp_ps(v, t, _CMP_LT_OQ), v);
    _mm256_storeu_ps(p + j, kept);
    return kept;
  });
  return sum + ZeroBelowScalar(p + i, n - i, at_least);
}

AMOEBA_AVX2 int64_t IndicesInRangeAvx2(const float* x, int64_t n, float lo, float hi,
                                       int32_t* out) {
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  int64_t c = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    auto mask = static_cast<unsigned>(_mm256_movemask_ps(
        _mm256_and_ps(_mm256_cmp_ps(v, vlo, _CMP_GE_OQ), _mm256_cmp_ps(v, vhi, _CMP_LT_OQ))));
    for (; mask; mask &= mask - 1) out[c++] = static_cast<int32_t>(i + __builtin_ctz(mask));
  }
  return c + IndicesInRangeScalar(x, i, n, lo, hi, out + c);
}

AMOEBA_AVX2 int64_t FirstReachingMassAvx2(const float* p, int64_t n, double r) {
  return FirstReachingMassChunked(p, n, r, [p](int64_t begin, int64_t end) AMOEBA_AVX2 {
    int64_t done = 0;
    const double s = ChunkedSumAvx2(
        end - begin, &done, [&](int64_t j) AMOEBA_AVX2 { return _mm256_loadu_ps(p + begin + j); });
    return s + std::accumulate(p + begin + done, p + end, 0.0);
  });
}

// ---- AVX-512 ----

AMOEBA_AVX512 double ReduceToDouble(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  double s = 0;
  for (float l : lanes) s += l;
  return s;
}

AMOEBA_AVX512 float RowMaxAvx512(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(_mm512_loadu_ps(x + i), m);  // NaNs never win
  return std::max(simd::ReduceMax16(m), RowMaxScalar(x + i, n - i));
}

template <typename F>
AMOEBA_AVX512 double ChunkedSumAvx512(int64_t n, int64_t* done, const F& f) {
  double sum = 0;
  int64_t i = 0;
  while (i + 16 <= n) {
    __m512 acc = _mm512_setzero_ps();
    for (const int64_t end = std::min(n - 15, i + kFlush); i < end; i += 16)
      acc = _mm512_add_ps(acc, f(i));
    sum += ReduceToDouble(acc);
  }
  *done = i;
  return sum;
}

AMOEBA_AVX512 double SumExpAvx512(const float* x, int64_t n, float mx) {
  const __m512 vmx = _mm512_set1_ps(mx);
  int64_t i = 0;
  const double sum = ChunkedSumAvx512(n, &i, [&](int64_t j) AMOEBA_AVX512 {
    return simd::Exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j), vmx));
  });
  return sum + SumExpScalar(x + i, n - i, mx);
}

AMOEBA_AVX512 double ExpScaledAvx512(const float* x, int64_t n, float mx, float scale, float* p) {
  const __m512 vmx = _mm512_set1_ps(mx), vs = _mm512_set1_ps(scale);
  const __m512 floor = _mm512_set1_ps(kExpFloor);
  int64_t i = 0;
  const double sum = ChunkedSumAvx512(n, &i, [&](int64_t j) AMOEBA_AVX512 {
    const __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + j), vmx), vs);
    const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, floor, _CMP_GE_OQ), simd::Exp16(v));
    _mm512_storeu_ps(p + j, e);
    return e;
  });
  return sum + ExpScaledScalar(x + i, n - i, mx, scale, p + i);
}

AMOEBA_AVX512 double MassAtLeastAvx512(const float* p, int64_t n, float at_least, int64_t* count) {
  const __m512 t = _mm512_set1_ps(at_least);
  int64_t i = 0, c = 0;
  const double sum = ChunkedSumAvx512(n, &i, [&](int64_t j) AMOEBA_AVX512 {
    const __m512 v = _mm512_loadu_ps(p + j);
    const __mmask16 ge = _mm512_cmp_ps_mask(v, t, _CMP_GE_OQ);
    c += __builtin_popcount(ge);
    return _mm512_maskz_mov_ps(ge, v);
  });
  *count = c;
  return sum + MassAtLeastScalar(p + i, n - i, at_least, count);
}

AMOEBA_AVX512 double ZeroBelowAvx512(float* p, int64_t n, float at_least) {
  const __m512 t = _mm512_set1_ps(at_least);
  int64_t i = 0;
  const double sum = ChunkedSumAvx512(n, &i, [&](int64_t j) AMOEBA_AVX512 {
    const __m512 v = _mm512_loadu_ps(p + j);
    const __m512 kept = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, t, _CMP_NLT_UQ), v);
    _mm512_storeu_ps(p + j, kept);
    return kept;
  });
  return sum + ZeroBelowScalar(p + i, n - i, at_least);
}

AMOEBA_AVX512 int64_t IndicesInRangeAvx512(const float* x, int64_t n, float lo, float hi,
                                           int32_t* out) {
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  int64_t c = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    unsigned mask =
        _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(v, vlo, _CMP_GE_OQ), v, vhi, _CMP_LT_OQ);
    for (; mask; mask &= mask - 1) out[c++] = static_cast<int32_t>(i + __builtin_ctz(mask));
  }
  return c + IndicesInRangeScalar(x, i, n, lo, hi, out + c);
}

AMOEBA_AVX512 int64_t FirstReachingMassAvx512(const float* p, int64_t n, double r) {
  return FirstReachingMassChunked(p, n, r, [p](int64_t begin, int64_t end) AMOEBA_AVX512 {
    int64_t done = 0;
    const double s = ChunkedSumAvx512(end - begin, &done, [&](int64_t j) AMOEBA_AVX512 {
      return _mm512_loadu_ps(p + begin + j);
    });
    return s + std::accumulate(p + begin + done, p + end, 0.0);
  });
}

}  // namespace

float RowMax(const float* x, int64_t n) {
  switch (ActiveKernelIsa()) {
    case KernelIsa::kAvx512:
      return RowMaxAvx512(x, n);
    case KernelIsa::kAvx2:
      return RowMaxAvx2(x, n);
    default:
      return RowMaxScalar(x, n);
  }
}

double SumExp(const float* x, int64_t n, float mx) {
  switch (ActiveKernelIsa()) {
    case KernelIsa::kAvx512:
      return SumExpAvx512(x, n, mx);
    case KernelIsa::kAvx2:
      return SumExpAvx2(x, n, mx);
    default:
      return SumExpScalar(x, n, mx);
  }
}

double ExpScaled(const float* x, int64_t n, float mx, float scale, float* p) {
  switch (ActiveKernelIsa()) {
    case KernelIsa::kAvx512:
      return ExpScaledAvx512(x, n, mx, scale, p);
    case KernelIsa::kAvx2:
      return ExpScaledAvx2(x, n, mx, scale, p);
    default:
      return ExpScaledScalar(x, n, mx, scale, p);
  }
}

double MassAtLeast(const float* p, int64_t n, float at_least, int64_t* count) {
  *count = 0;
  switch (ActiveKernelIsa()) {
    case KernelIsa::kAvx512:
      return MassAtLeastAvx512(p, n, at_least, count);
    case KernelIsa::kAvx2:
      return MassAtLeastAvx2(p, n, at_least, count);
    default:
      return MassAtLeastScalar(p, n, at_least, count);
  }
}

double ZeroBelow(float* p, int64_t n, float at_least) {
  switch (ActiveKernelIsa()) {
    case KernelIsa::kAvx512:
      return ZeroBelowAvx512(p, n, at_least);
    case KernelIsa::kAvx2:
      return ZeroBelowAvx2(p, n, at_least);
    default:
      return ZeroBelowScalar(p, n, at_least);
  }
}

int64_t IndicesInRange(const float* x, int64_t n, float lo, float hi, int32_t* out) {
  switch (ActiveKernelIsa()) {
    case KernelIsa::kAvx512:
      return IndicesInRangeAvx512(x, n, lo, hi, out);
    case KernelIsa::kAvx2:
      return IndicesInRangeAvx2(x, n, lo, hi, out);
    default:
      return IndicesInRangeScalar(x, 0, n, lo, hi, out);
  }
}

int64_t FirstReachingMass(const float* p, int64_t n, double r) {
  switch (ActiveKernelIsa()) {
    case KernelIsa::kAvx512:
      return FirstReachingMassAvx512(p, n, r);
    case KernelIsa::kAvx2:
      return FirstReachingMassAvx2(p, n, r);
    default:
      return FirstReachingMassScalar(p, n, r);
  }
}

}  // namespace amoeba
