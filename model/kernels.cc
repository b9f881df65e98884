#include "model/kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>

namespace amoeba {

bool CpuHasAvx2Fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

namespace {

#define AMOEBA_AVX2 __attribute__((target("avx2,fma")))

AMOEBA_AVX2 inline float HSum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  return _mm_cvtss_f32(_mm_add_ss(s, sh));
}

// Rows [r0, r1) of y = W x.
AMOEBA_AVX2 void GemvAvx2(const float* W, int64_t ld, int64_t in, const float* x, float* y,
                          int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const float* w0 = W + r * ld;
    const float* w1 = w0 + ld;
    const float* w2 = w1 + ld;
    const float* w3 = w2 + ld;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= in; i += 8) {
      const __m256 xv = _mm256_loadu_ps(x + i);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), xv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), xv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), xv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), xv, a3);
    }
    float s0 = HSum(a0), s1 = HSum(a1), s2 = HSum(a2), s3 = HSum(a3);
    for (; i < in; ++i) {
      s0 += w0[i] * x[i];
      s1 += w1[i] * x[i];
      s2 += w2[i] * x[i];
      s3 += w3[i] * x[i];
    }
    y[r] = s0;
    y[r + 1] = s1;
    y[r + 2] = s2;
    y[r + 3] = s3;
  }
  for (; r < r1; ++r) {
    const float* w = W + r * ld;
    __m256 a = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= in; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a);
    float s = HSum(a);
    for (; i < in; ++i) s += w[i] * x[i];
    y[r] = s;
  }
}

// Two weight rows against NB inputs: 2*NB accumulators stay in registers.
template <int NB>
AMOEBA_AVX2 inline void Skinny2xNB(const float* w0, const float* w1, int64_t in, const float* x,
                                   int64_t n0, float* y, int64_t out, int64_t r, bool two) {
  __m256 a[2][NB];
  for (int j = 0; j < NB; ++j) a[0][j] = a[1][j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    const __m256 wv0 = _mm256_loadu_ps(w0 + i);
    const __m256 wv1 = _mm256_loadu_ps(w1 + i);
    for (int j = 0; j < NB; ++j) {
      const __m256 xv = _mm256_loadu_ps(x + (n0 + j) * in + i);
      a[0][j] = _mm256_fmadd_ps(wv0, xv, a[0][j]);
      a[1][j] = _mm256_fmadd_ps(wv1, xv, a[1][j]);
    }
  }
  for (int j = 0; j < NB; ++j) {
    const float* xr = x + (n0 + j) * in;
    float s0 = HSum(a[0][j]), s1 = HSum(a[1][j]);
    for (int64_t t = i; t < in; ++t) {
      s0 += w0[t] * xr[t];
      s1 += w1[t] * xr[t];
    }
    y[(n0 + j) * out + r] = s0;
    if (two) y[(n0 + j) * out + r + 1] = s1;
  }
}

AMOEBA_AVX2 void SkinnyAvx2(const float* W, int64_t ld, int64_t in, const float* x, int64_t n,
                            float* y, int64_t out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r += 2) {
    const bool two = r + 1 < r1;
    const float* w0 = W + r * ld;
    const float* w1 = two ? w0 + ld : w0;
    int64_t n0 = 0;
    for (; n0 + 4 <= n; n0 += 4) Skinny2xNB<4>(w0, w1, in, x, n0, y, out, r, two);
    switch (n - n0) {
      case 3: Skinny2xNB<3>(w0, w1, in, x, n0, y, out, r, two); break;
      case 2: Skinny2xNB<2>(w0, w1, in, x, n0, y, out, r, two); break;
      case 1: Skinny2xNB<1>(w0, w1, in, x, n0, y, out, r, two); break;
      default: break;
    }
  }
}

void SkinnyScalar(const float* W, int64_t ld, int64_t in, const float* x, int64_t n, float* y,
                  int64_t out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* w = W + r * ld;
    for (int64_t j = 0; j < n; ++j) {
      const float* xr = x + j * in;
      float s = 0.f;
      for (int64_t i = 0; i < in; ++i) s += w[i] * xr[i];
      y[j * out + r] = s;
    }
  }
}

// Rows per parallel task: large enough to amortise scheduling, multiple of 4 for the GEMV.
int64_t GrainRows(int64_t out) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t g = (out + threads * 4 - 1) / (threads * 4);
  return std::max<int64_t>(16, (g + 3) / 4 * 4);
}

}  // namespace

void Linear(const float* x, int64_t n, const at::Tensor& W, const float* bias, float* y,
            LinearPath path) {
  const int64_t out = W.size(0), in = W.size(1);
  if (n == 0 || out == 0) return;
  TORCH_CHECK(W.scalar_type() == at::kFloat && W.stride(1) == 1, "Linear: fp32 weight with unit column stride");
  const float* w = W.data_ptr<float>();
  const int64_t ld = W.stride(0);
  if (path == LinearPath::kTorch) {
    at::Tensor xt = at::from_blob(const_cast<float*>(x), {n, in});
    at::Tensor yt = at::from_blob(y, {n, out});
    yt.copy_(at::linear(xt, W));
  } else if (n > kSkinnyMaxRows || !CpuHasAvx2Fma()) {
    if (n > kSkinnyMaxRows) {
      at::Tensor xt = at::from_blob(const_cast<float*>(x), {n, in});
      at::Tensor yt = at::from_blob(y, {n, out});
      at::mm_out(yt, xt, W.t());
    } else {
      at::parallel_for(0, out, GrainRows(out), [&](int64_t r0, int64_t r1) {
        SkinnyScalar(w, ld, in, x, n, y, out, r0, r1);
      });
    }
  } else if (n == 1) {
    at::parallel_for(0, out, GrainRows(out),
                     [&](int64_t r0, int64_t r1) { GemvAvx2(w, ld, in, x, y, r0, r1); });
  } else {
    at::parallel_for(0, out, GrainRows(out), [&](int64_t r0, int64_t r1) {
      SkinnyAvx2(w, ld, in, x, n, y, out, r0, r1);
    });
  }
  if (bias) {
    for (int64_t j = 0; j < n; ++j) AddInPlace(y + j * out, bias, out);
  }
}

void RmsNorm(const float* x, const float* w, int64_t rows, int64_t dim, double eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* o = out + r * dim;
    float ss = 0.f;
    for (int64_t i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + static_cast<float>(eps));
    for (int64_t i = 0; i < dim; ++i) o[i] = w[i] * (xr[i] * inv);
  }
}

void SiluMul(float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = a[i] / (1.0f + std::exp(-a[i])) * b[i];
}

void AddInPlace(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

float Dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void Axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace amoeba
