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

void DecodeAttentionPortable(const float* q, int64_t group, const float* keys, const float* values,
                             int64_t len, int64_t hd, float scale, float* scores, float* out) {
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * hd;
    for (int64_t j = 0; j < len; ++j) scores[j] = Dot(qg, keys + j * hd, hd) * scale;
    SoftmaxInPlace(scores, len);
    float* o = out + g * hd;
    std::memset(o, 0, hd * sizeof(float));
    for (int64_t j = 0; j < len; ++j) Axpy(scores[j], values + j * hd, o, hd);
  }
}

void DecodeAttentionPortable(const float* q, int64_t group, const at::Half* keys,
                             const at::Half* values, int64_t len, int64_t hd, float scale,
                             float* scores, float* out) {
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * hd;
    for (int64_t j = 0; j < len; ++j) {
      float s = 0.f;
      for (int64_t i = 0; i < hd; ++i) s += qg[i] * static_cast<float>(keys[j * hd + i]);
      scores[j] = s * scale;
    }
    SoftmaxInPlace(scores, len);
    float* o = out + g * hd;
    std::memset(o, 0, hd * sizeof(float));
    for (int64_t j = 0; j < len; ++j)
      for (int64_t i = 0; i < hd; ++i) o[i] += scores[j] * static_cast<float>(values[j * hd + i]);
  }
}

// NV = head_dim / 16 vectors per row.
template <int NV, typename T>
AMOEBA_AVX512 void DecodeAttentionAvx512(const float* q, int64_t group, const T* keys,
                                         const T* values, int64_t len, float scale, float* scores,
                                         float* out) {
  constexpr int64_t hd = NV * 16;
  for (int64_t g = 0; g < group; ++g) {
    __m512 qv[NV];
    for (int v = 0; v < NV; ++v)
      qv[v] = _mm512_mul_ps(_mm512_loadu_ps(q + g * hd + v * 16), _mm512_set1_ps(scale));
    // Scores, 16 keys per block.
    int64_t j = 0;
    __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (; j + 16 <= len; j += 16) {
      __m512 acc[16];
      for (int t = 0; t < 16; ++t) {
        const T* kr = keys + (j + t) * hd;
        acc[t] = _mm512_mul_ps(qv[0], Load16(kr));
        for (int v = 1; v < NV; ++v) acc[t] = _mm512_fmadd_ps(qv[v], Load16(kr + v * 16), acc[t]);
      }
      const __m512 s = simd::TransposeReduce16<simd::AddPs>(acc);
      _mm512_storeu_ps(scores + j, s);
      vmax = _mm512_max_ps(vmax, s);
    }
    float mx = _mm512_reduce_max_ps(vmax);
    for (; j < len; ++j) {
      const T* kr = keys + j * hd;
      __m512 acc = _mm512_mul_ps(qv[0], Load16(kr));
      for (int v = 1; v < NV; ++v) acc = _mm512_fmadd_ps(qv[v], Load16(kr + v * 16), acc);
      scores[j] = _mm512_reduce_add_ps(acc);
      mx = std::max(mx, scores[j]);
    }
    // exp in vectors: a scalar std::exp per key and query head was most of the compute at long
    // contexts. Every score goes through the same lanes' code, whatever len is.
    const __m512 vmx = _mm512_set1_ps(mx);
    __m512 vsum = _mm512_setzero_ps();
    for (j = 0; j < len; j += 16) {
      const __mmask16 m = len - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - j)) - 1);
      const __m512 e = simd::Exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + j), vmx));
      _mm512_mask_storeu_ps(scores + j, m, e);
      vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
    }
    const float sum = _mm512_reduce_add_ps(vsum);
    // Output: two accumulator sets (even/odd keys) so the FMA chains hide their latency.
    __m512 o0[NV], o1[NV];
    for (int v = 0; v < NV; ++v) o0[v] = o1[v] = _mm512_setzero_ps();
    for (j = 0; j + 2 <= len; j += 2) {
      const __m512 p0 = _mm512_set1_ps(scores[j]), p1 = _mm512_set1_ps(scores[j + 1]);
      const T* v0 = values + j * hd;
      for (int v = 0; v < NV; ++v) {
        o0[v] = _mm512_fmadd_ps(p0, Load16(v0 + v * 16), o0[v]);
        o1[v] = _mm512_fmadd_ps(p1, Load16(v0 + hd + v * 16), o1[v]);
      }
    }
    if (j < len) {
      const __m512 p0 = _mm512_set1_ps(scores[j]);
      for (int v = 0; v < NV; ++v)
        o0[v] = _mm512_fmadd_ps(p0, Load16(values + j * hd + v * 16), o0[v]);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sum);
    for (int v = 0; v < NV; ++v)
      _mm512_storeu_ps(out + g * hd + v * 16, _mm512_mul_ps(_mm512_add_ps(o0[v], o1[v]), inv));
  }
}

template <typename T>
void Dispatch(const float* q, int64_t group, const T* keys, const T* values, int64_t len,
              int64_t hd, float scale, float* scores, float* out) {
  if (ActiveKernelIsa() == KernelIsa::kAvx512 && hd % 16 == 0) {
    switch (hd / 16) {
      case 1:
        return DecodeAttentionAvx512<1>(q, group, keys, values, len, scale, scores, out);
      case 2:
        return DecodeAttentionAvx512<2>(q, group, keys, values, len, scale, scores, out);
      case 4:
        return DecodeAttentionAvx512<4>(q, group, keys, values, len, scale, scores, out);
      case 6:
        return DecodeAttentionAvx512<6>(q, group, keys, values, len, scale, scores, out);
      case 8:
        return DecodeAttentionAvx512<8>(q, group, keys, values, len, scale, scores, out);
      default:
        break;
    }
  }
  DecodeAttentionPortable(q, group, keys, values, len, hd, scale, scores, out);
}

}  // namespace

void DecodeAttention(const float* q, int64_t group, const float* keys, const float* values,
                     int64_t len, int64_t hd, float scale, float* scores, float* out) {
  Dispatch(q, group, keys, values, len, hd, scale, scores, out);
}

void DecodeAttention(const float* q, int64_t group, const at::Half* keys, const at::Half* values,
                     int64_t len, int64_t hd, float scale, float* scores, float* out) {
  Dispatch(q, group, keys, values, len, hd, scale, scores, out);
}

}  // namespace amoeba
