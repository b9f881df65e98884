#include "decode_attention.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "model/kernels.h"
#include "simd.h"

namespace amoeba {
namespace {

using simd::Load16;

// Softmax in place over scores[0, len): exp(s - max) / sum.
void SoftmaxInPlace(float* s, int64_t len) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < len; ++j) mx = std::max(mx, s[j]);
  float sum = 0.f;
  for (int64_t j = 0; j < len; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < len; ++j) s[j] *= inv;
}

float RowDot(const float* q, const float* k, int64_t hd) {
  return Dot(q, k, hd);
}
float RowDot(const float* q, const at::Half* k, int64_t hd) {
  float s = 0.f;
  for (int64_t i = 0; i < hd; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}
void RowAxpy(float a, const float* v, float* o, int64_t hd) {
  Axpy(a, v, o, hd);
}
void RowAxpy(float a, const at::Half* v, float* o, int64_t hd) {
  for (int64_t i = 0; i < hd; ++i) o[i] += a * static_cast<float>(v[i]);
}

// One query head at a time; scratch: len floats.
template <typename T>
void DecodeAttentionPortable(const float* q, int64_t nh, int64_t group, const T* keys,
                             const T* values, int64_t rs, int64_t len, int64_t hd, float scale,
                             float* scores, float* out) {
  for (int64_t h = 0; h < nh; ++h) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t qh = h * group + g;
      const float* qg = q + qh * hd;
      for (int64_t j = 0; j < len; ++j) scores[j] = RowDot(qg, keys + j * rs + h * hd, hd) * scale;
      SoftmaxInPlace(scores, len);
      float* o = out + qh * hd;
      std::memset(o, 0, hd * sizeof(float));
      for (int64_t j = 0; j < len; ++j) RowAxpy(scores[j], values + j * rs + h * hd, o, hd);
    }
  }
}

inline __mmask16 FirstLanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// NV = head_dim / 16 vectors per row. Scores window by window (16 positions, every head of the
// range), the softmax per query head, then the values window by window into the output rows.
template <int NV, typename T>
AMOEBA_AVX512 void DecodeAttentionAvx512(const float* q, int64_t nh, int64_t group, const T* keys,
                                         const T* values, int64_t rs, int64_t len, float scale,
                                         float* scratch, float* out) {
  constexpr int64_t hd = NV * 16;
  const int64_t nq = nh * group, lp = (len + 15) / 16 * 16;
  float* vmax = scratch;         // [nq][16]: lane-wise running maxima; then 1 / sum in lane 0
  float* s = scratch + nq * 16;  // [nq][lp]: scores, then exponentials
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t qh = 0; qh < nq; ++qh) _mm512_storeu_ps(vmax + qh * 16, ninf);

  for (int64_t j0 = 0; j0 < len; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, len - j0);
    const __mmask16 m = FirstLanes(n);
    for (int64_t h = 0; h < nh; ++h) {
      const T* kw = keys + j0 * rs + h * hd;
      for (int64_t g = 0; g < group; ++g) {
        const int64_t qh = h * group + g;
        __m512 qv[NV];
        for (int v = 0; v < NV; ++v)
          qv[v] = _mm512_mul_ps(_mm512_loadu_ps(q + qh * hd + v * 16), _mm512_set1_ps(scale));
        __m512 acc[16];
        for (int t = 0; t < 16; ++t) {
          if (t < n) {
            const T* kr = kw + t * rs;
            acc[t] = _mm512_mul_ps(qv[0], Load16(kr));
            for (int v = 1; v < NV; ++v)
              acc[t] = _mm512_fmadd_ps(qv[v], Load16(kr + v * 16), acc[t]);
          } else {
            acc[t] = _mm512_setzero_ps();
          }
        }
        const __m512 sc = simd::TransposeReduce16<simd::AddPs>(acc);
        _mm512_mask_storeu_ps(s + qh * lp + j0, m, sc);
        const __m512 vm = _mm512_loadu_ps(vmax + qh * 16);
        _mm512_storeu_ps(vmax + qh * 16, _mm512_mask_max_ps(vm, m, vm, sc));
      }
    }
  }

  // exp in vectors: a scalar std::exp per key and query head was most of the compute at long
  // contexts. Every score goes through the same lanes' code, whatever len is.
  for (int64_t qh = 0; qh < nq; ++qh) {
    const __m512 vmx = _mm512_set1_ps(simd::ReduceMax16(_mm512_loadu_ps(vmax + qh * 16)));
    float* sq = s + qh * lp;
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j += 16) {
      const __mmask16 m = FirstLanes(len - j);
      const __m512 e = simd::Exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sq + j), vmx));
      _mm512_mask_storeu_ps(sq + j, m, e);
      vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
    }
    vmax[qh * 16] = 1.0f / simd::ReduceAdd16(vsum);
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + qh * hd + v * 16, _mm512_setzero_ps());
  }

  // Output: two accumulator sets (even/odd keys) so the FMA chains hide their latency.
  for (int64_t j0 = 0; j0 < len; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, len - j0);
    for (int64_t h = 0; h < nh; ++h) {
      const T* vw = values + j0 * rs + h * hd;
      for (int64_t g = 0; g < group; ++g) {
        const int64_t qh = h * group + g;
        const float* p = s + qh * lp + j0;
        float* o = out + qh * hd;
        __m512 o0[NV], o1[NV];
        for (int v = 0; v < NV; ++v) {
          o0[v] = _mm512_loadu_ps(o + v * 16);
          o1[v] = _mm512_setzero_ps();
        }
        int64_t t = 0;
        for (; t + 2 <= n; t += 2) {
          const __m512 p0 = _mm512_set1_ps(p[t]), p1 = _mm512_set1_ps(p[t + 1]);
          const T* v0 = vw + t * rs;
          for (int v = 0; v < NV; ++v) {
            o0[v] = _mm512_fmadd_ps(p0, Load16(v0 + v * 16), o0[v]);
            o1[v] = _mm512_fmadd_ps(p1, Load16(v0 + rs + v * 16), o1[v]);
          }
        }
        if (t < n) {
          const __m512 p0 = _mm512_set1_ps(p[t]);
          for (int v = 0; v < NV; ++v)
            o0[v] = _mm512_fmadd_ps(p0, Load16(vw + t * rs + v * 16), o0[v]);
        }
        for (int v = 0; v < NV; ++v) _mm512_storeu_ps(o + v * 16, _mm512_add_ps(o0[v], o1[v]));
      }
    }
  }
  for (int64_t qh = 0; qh < nq; ++qh) {
    const __m512 inv = _mm512_set1_ps(vmax[qh * 16]);
    for (int v = 0; v < NV; ++v)
      _mm512_storeu_ps(out + qh * hd + v * 16,
                       _mm512_mul_ps(_mm512_loadu_ps(out + qh * hd + v * 16), inv));
  }
}

template <typename T>
void Dispatch(const float* q, int64_t nh, int64_t group, const T* keys, const T* values, int64_t rs,
              int64_t len, int64_t hd, float scale, float* scratch, float* out) {
  if (ActiveKernelIsa() == KernelIsa::kAvx512 && hd % 16 == 0) {
    switch (hd / 16) {
      case 1:
        return DecodeAttentionAvx512<1>(q, nh, group, keys, values, rs, len, scale, scratch, out);
      case 2:
        return DecodeAttentionAvx512<2>(q, nh, group, keys, values, rs, len, scale, scratch, out);
      case 4:
        return DecodeAttentionAvx512<4>(q, nh, group, keys, values, rs, len, scale, scratch, out);
      case 6:
        return DecodeAttentionAvx512<6>(q, nh, group, keys, values, rs, len, scale, scratch, out);
      case 8:
        return DecodeAttentionAvx512<8>(q, nh, group, keys, values, rs, len, scale, scratch, out);
      default:
        break;
    }
  }
  DecodeAttentionPortable(q, nh, group, keys, values, rs, len, hd, scale, scratch, out);
}

}  // namespace

int64_t DecodeAttentionScratchPerHead(int64_t max_len) {
  return 16 + (max_len + 15) / 16 * 16;
}

void DecodeAttention(const float* q, int64_t kv_heads, int64_t group, const float* keys,
                     const float* values, int64_t row_stride, int64_t len, int64_t hd, float scale,
                     float* scratch, float* out) {
  Dispatch(q, kv_heads, group, keys, values, row_stride, len, hd, scale, scratch, out);
}

void DecodeAttention(const float* q, int64_t kv_heads, int64_t group, const at::Half* keys,
                     const at::Half* values, int64_t row_stride, int64_t len, int64_t hd,
                     float scale, float* scratch, float* out) {
  Dispatch(q, kv_heads, group, keys, values, row_stride, len, hd, scale, scratch, out);
}

}  // namespace amoeba
