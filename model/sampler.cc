#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace amoeba {

Sampler::Sampler(const SamplingOptions& options, int64_t vocab_size)
    : opt_(options), vocab_(vocab_size), rng_(options.seed) {
  seen_mask_.assign(vocab_size, 0);
  idx_.resize(vocab_size);
  probs_.resize(vocab_size);
}

void Sampler::Observe(int32_t token) {
  if (token < 0 || token >= vocab_ || seen_mask_[token]) return;
  seen_mask_[token] = 1;
  seen_.push_back(token);
}

int32_t Sampler::Sample(float* logits) {
  if (opt_.repetition_penalty != 1.0f) {
    for (int32_t t : seen_) {
      logits[t] =
          logits[t] < 0 ? logits[t] * opt_.repetition_penalty : logits[t] / opt_.repetition_penalty;
    }
  }
  if (opt_.temperature <= 0.0f) {
    return static_cast<int32_t>(std::max_element(logits, logits + vocab_) - logits);
  }
  const float inv_t = 1.0f / opt_.temperature;
  int64_t n = vocab_;
  std::iota(idx_.begin(), idx_.end(), 0);
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b]; };
  if (opt_.top_k > 0 && opt_.top_k < n) {
    std::nth_element(idx_.begin(), idx_.begin() + opt_.top_k, idx_.end(), by_logit);
    n = opt_.top_k;
  }
  const bool use_top_p = opt_.top_p < 1.0f;
  if (use_top_p) std::sort(idx_.begin(), idx_.begin() + n, by_logit);
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, logits[idx_[i]]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    probs_[i] = std::exp((logits[idx_[i]] - mx) * inv_t);
    sum += probs_[i];
  }
  if (use_top_p) {
    // Keep the smallest prefix whose mass reaches top_p (at least one token).
    double acc = 0;
    int64_t keep = 0;
    while (keep < n) {
      acc += probs_[keep] / sum;
      ++keep;
      if (acc >= opt_.top_p) break;
    }
    n = keep;
    sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += probs_[i];
  }
  std::uniform_real_distribution<double> u(0.0, sum);
  double r = u(rng_);
  for (int64_t i = 0; i < n; ++i) {
    r -= probs_[i];
    if (r <= 0) return idx_[i];
  }
  return idx_[n - 1];
}

}  // namespace amoeba
