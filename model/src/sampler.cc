#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "model/kernels.h"

namespace amoeba {

Sampler::Sampler(const SamplingOptions& options, int64_t vocab_size)
    : opt_(options), vocab_(vocab_size), rng_(options.seed) {
  seen_mask_.assign(vocab_size, 0);
  generated_count_.assign(vocab_size, 0);
  idx_.resize(vocab_size);
  probs_.resize(vocab_size);
}

void Sampler::Observe(int32_t token) {
  if (token < 0 || token >= vocab_ || seen_mask_[token]) return;
  seen_mask_[token] = 1;
  seen_.push_back(token);
}

void Sampler::ObserveGenerated(int32_t token) {
  Observe(token);
  if (token < 0 || token >= vocab_) return;
  if (generated_count_[token]++ == 0) generated_.push_back(token);
}

bool Sampler::UsesHistory() const {
  return opt_.repetition_penalty != 1.0f || opt_.presence_penalty != 0.0f ||
         opt_.frequency_penalty != 0.0f;
}

void Sampler::CopyHistoryFrom(const Sampler& other) {
  seen_mask_ = other.seen_mask_;  // assignment reuses the capacity: no allocation once warm
  seen_ = other.seen_;
  generated_count_ = other.generated_count_;
  generated_ = other.generated_;
}

void Sampler::ApplyPenalty(float* logits) const {
  if (opt_.repetition_penalty != 1.0f) {
    for (int32_t t : seen_) {
      logits[t] =
          logits[t] < 0 ? logits[t] * opt_.repetition_penalty : logits[t] / opt_.repetition_penalty;
    }
  }
  if (opt_.presence_penalty != 0.0f || opt_.frequency_penalty != 0.0f) {
    for (int32_t t : generated_)
      logits[t] -= opt_.presence_penalty + opt_.frequency_penalty * generated_count_[t];
  }
  for (const auto& [t, bias] : opt_.logit_bias)
    if (t >= 0 && t < vocab_) logits[t] += bias;
}

int64_t Sampler::Candidates(float* logits, double* sum_out) {
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
  if (opt_.min_p > 0.0f) {
    // probs_ are relative to the most likely candidate's (1): keep those at >= min_p of it.
    int64_t kept = 0;
    sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (probs_[i] < opt_.min_p) continue;
      idx_[kept] = idx_[i];
      probs_[kept] = probs_[i];
      sum += probs_[kept++];
    }
    n = kept;
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
  *sum_out = sum;
  return n;
}

int32_t Sampler::Sample(float* logits, float* probs) {
  ApplyPenalty(logits);
  if (opt_.temperature <= 0.0f) {
    const auto tok = static_cast<int32_t>(Argmax(logits, vocab_));
    if (probs) {
      std::fill(probs, probs + vocab_, 0.0f);
      probs[tok] = 1.0f;
    }
    return tok;
  }
  double sum = 0;
  const int64_t n = Candidates(logits, &sum);
  if (probs) {
    std::fill(probs, probs + vocab_, 0.0f);
    for (int64_t i = 0; i < n; ++i) probs[idx_[i]] = static_cast<float>(probs_[i] / sum);
  }
  std::uniform_real_distribution<double> u(0.0, sum);
  double r = u(rng_);
  for (int64_t i = 0; i < n; ++i) {
    r -= probs_[i];
    if (r <= 0) return idx_[i];
  }
  return idx_[n - 1];
}

int32_t Sampler::Verify(float* logits, int32_t drafted, const float* draft_probs, bool* accepted) {
  if (opt_.temperature <= 0.0f) {
    const int32_t tok = Sample(logits);
    *accepted = tok == drafted;
    return tok;
  }
  ApplyPenalty(logits);
  double sum = 0;
  const int64_t n = Candidates(logits, &sum);
  dense_.assign(vocab_, 0.0f);
  for (int64_t i = 0; i < n; ++i) dense_[idx_[i]] = static_cast<float>(probs_[i] / sum);
  const double p = dense_[drafted];
  const double q = draft_probs ? draft_probs[drafted] : 1.0;
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  if (q > 0 && u01(rng_) * q < p) {  // u < p / q
    *accepted = true;
    return drafted;
  }
  *accepted = false;
  // The residual max(0, p - q): where the target wants more than the draft offered.
  double residual = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t t = idx_[i];
    const float qt = draft_probs ? draft_probs[t] : (t == drafted ? 1.0f : 0.0f);
    dense_[t] = std::max(0.0f, dense_[t] - qt);
    residual += dense_[t];
  }
  if (residual <= 0) {  // p == q up to rounding: any draw from p is right
    for (int64_t i = 0; i < n; ++i) dense_[idx_[i]] = probs_[i];
    residual = sum;
  }
  std::uniform_real_distribution<double> u(0.0, residual);
  double r = u(rng_);
  for (int64_t i = 0; i < n; ++i) {
    r -= dense_[idx_[i]];
    if (r <= 0 && dense_[idx_[i]] > 0) return idx_[i];
  }
  for (int64_t i = n; i-- > 0;)
    if (dense_[idx_[i]] > 0) return idx_[i];
  return idx_[0];
}

}  // namespace amoeba
