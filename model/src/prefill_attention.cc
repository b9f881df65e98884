#include "prefill_attention.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "model/kernels.h"
#include "simd.h"

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

AMOEBA_AVX512 void SoftmaxRowAvx512(float* s, int64_t len, float scale) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 m = len - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - j)) - 1);
    vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, s + j));
  }
  const __m512 vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax)), vscale = _mm512_set1_ps(scale);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 m = len - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - j)) - 1);
    const __m512 e =
        simd::Exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vmx), vscale));
    _mm512_mask_storeu_ps(s + j, m, e);
    vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
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

}  // namespace

void PrefillAttention(const PrefillAttentionArgs& a, at::Tensor& scratch) {
  const int64_t hd = a.head_dim, B = kPrefillQueryBlock;
  const int64_t blocks = (a.T + B - 1) / B;
  const int64_t tasks = blocks * a.kv_heads;
  const int64_t max_keys = a.p0 + a.T;
  const int threads = std::max(1, at::get_num_threads());
  const int64_t per_thread = B * max_keys;
  if (!scratch.defined() || scratch.numel() < threads * per_thread)
    scratch = at::empty({threads * per_thread}, at::kFloat);
  float* buffers = scratch.data_ptr<float>();
  const KernelIsa isa = ActiveKernelIsa();
  // Tasks are taken in order of decreasing work (the last query blocks see the most keys), from
  // a shared counter: causal blocks differ in cost, so a static split would leave a thread idle.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard;
    for (int64_t w = begin; w < end; ++w) {
      float* S = buffers + w * per_thread;
      for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
        const int64_t block = blocks - 1 - t / a.kv_heads, kvh = t % a.kv_heads;
        const int64_t t0 = block * B, rows = std::min(B, a.T - t0);
        const int64_t keys = a.p0 + t0 + rows;  // what the block's last row sees
        const at::Tensor K =
            at::from_blob(const_cast<float*>(a.k) + kvh * a.kv_head_stride, {keys, hd});
        const at::Tensor V =
            at::from_blob(const_cast<float*>(a.v) + kvh * a.kv_head_stride, {keys, hd});
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
      }
    }
  });
}

}  // namespace amoeba
