#include "bench/bench_util.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>

namespace amoeba::bench {
namespace {

__attribute__((target("avx2"))) float SumAvx2(const float* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
         a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
  }
  float out[8];
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float s = 0;
  for (float v : out) s += v;
  for (; i < n; ++i) s += p[i];
  return s;
}

}  // namespace

double MeasureReadBandwidthGBs(double buffer_mib, int repeats) {
  const int64_t n = static_cast<int64_t>(buffer_mib * 1024 * 1024 / sizeof(float));
  at::Tensor buf = at::ones({n});
  const float* p = buf.data_ptr<float>();
  double best = 0;
  volatile float sink = 0;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<float> partial(at::get_num_threads() * 16, 0.f);
    at::parallel_for(0, n, n / at::get_num_threads() + 1, [&](int64_t b, int64_t e) {
      partial[at::get_thread_num() * 16] += SumAvx2(p + b, e - b);
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (float v : partial) sink = sink + v;
    best = std::max(best, n * sizeof(float) / s / 1e9);
  }
  return best;
}

namespace {
using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
}  // namespace

double DecodeRate(Engine& e, int batch, int steps) {
  KVCache cache = e.NewCache(batch);
  std::vector<int32_t> prompt = {1, 5, 9, 13, 17, 21, 25, 29};
  std::vector<SeqInput> seqs;
  for (int b = 0; b < batch; ++b) seqs.push_back({b, prompt});
  (void)e.Forward(cache, seqs);
  std::vector<int32_t> next(batch, 7);
  for (int b = 0; b < batch; ++b) seqs[b].tokens = {&next[b], 1};
  (void)e.Forward(cache, seqs);  // warm-up step
  const auto t0 = Clock::now();
  for (int s = 0; s < steps; ++s) {
    auto l = e.Forward(cache, seqs);
    for (int b = 0; b < batch; ++b) next[b] = static_cast<int32_t>(l->select(0, b).argmax().item<int64_t>());
  }
  return batch * steps / Seconds(t0);
}

double PrefillRate(Engine& e, int len) {
  KVCache cache = e.NewCache(1);
  std::vector<int32_t> prompt(len);
  for (int i = 0; i < len; ++i) prompt[i] = (i * 7 + 3) % 200;
  SeqInput in{0, prompt};
  (void)e.Forward(cache, {&in, 1});
  cache.Reset(0);
  const auto t0 = Clock::now();
  (void)e.Forward(cache, {&in, 1});
  return len / Seconds(t0);
}

}  // namespace amoeba::bench
