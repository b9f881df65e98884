#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "model/kernels.h"
#include "sampling_kernels.h"

namespace amoeba {
namespace {

// The order of the candidates: by logit, ties to the lower id.
auto ByLogitThenId(const float* logits) {
  return [logits](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
}

}  // namespace

Sampler::Sampler(const SamplingOptions& options, int64_t vocab_size)
    : opt_(options), vocab_(vocab_size), rng_(options.seed) {
  seen_mask_.assign(vocab_size, 0);
  generated_count_.assign(vocab_size, 0);
  if (options.temperature > 0.0f) {  // greedy needs none of these
    weights_.resize(vocab_size);
    idx_.resize(vocab_size);
    probs_.resize(vocab_size);
  }
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

int64_t Sampler::Candidates(const float* logits, double* sum_out) {
  const float inv_t = 1.0f / opt_.temperature;
  const float mx = RowMax(logits, vocab_);
  const bool use_top_p = opt_.top_p < 1.0f;
  if (opt_.top_k <= 0 || opt_.top_k >= vocab_) {
    // Every token, in one vector pass; min-p zeroes the weights under min_p of the best (1), and
    // top-p all outside the nucleus.
    all_tokens_ = true;
    double sum = ExpScaled(logits, vocab_, mx, inv_t, weights_.data());
    if (opt_.min_p > 0.0f) sum = ZeroBelow(weights_.data(), vocab_, opt_.min_p);
    if (use_top_p) sum = KeepNucleus(logits, sum);
    *sum_out = sum;
    return vocab_;
  }
  all_tokens_ = false;
  int64_t n = TopK(logits, mx);
  if (use_top_p) std::sort(idx_.begin(), idx_.begin() + n, ByLogitThenId(logits));
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

int64_t Sampler::TopK(const float* logits, float max_logit) {
  // The tokens within `below` of the best, doubling it until there are top_k of them (a vector
  // pass each, a few per row), then the top_k of those (at most about twice as many when the
  // logits are spread evenly). A full nth_element over the vocabulary took ~100 µs a token.
  const int64_t k = opt_.top_k;
  int64_t found = 0;
  for (float below = 0.5f;; below *= 2.0f) {
    const float lo = below > 1e5f ? -INFINITY : max_logit - below;
    found = IndicesInRange(logits, vocab_, lo, INFINITY, idx_.data());
    if (found >= k || lo == -INFINITY) break;
  }
  if (found > k) {
    std::nth_element(idx_.begin(), idx_.begin() + k, idx_.begin() + found, ByLogitThenId(logits));
  }
  return std::min(found, k);  // fewer only when NaN logits (never candidates) leave fewer
}

double Sampler::KeepNucleus(const float* logits, double sum) {
  // The nucleus: the tokens by logit (ties to the lower id) until their mass reaches top_p.
  // Weights follow logits, so it is every token above some weight and part of the tokens at it.
  // Find a band [lo, hi) of weights holding that boundary and few tokens (vector passes that
  // sum the mass at or above a weight), sort only the band, and zero every weight outside the
  // nucleus: drawing then walks the whole row in vectors. Sorting the vocabulary took ~2 ms a
  // token. Weights are at most 1 (the best token's) and 0 or at least FLT_MIN (ExpScaled).
  const double target = opt_.top_p * sum;
  constexpr int64_t kBandTokens = 256;
  float lo = std::numeric_limits<float>::min(), hi = 2.0f;  // mass(>= lo) >= target > mass(>= hi)
  int64_t count_lo = vocab_, count_hi = 0;
  for (const float w : {0.5f, 0.0625f, 1.0f / 256, 1.0f / 65536, 1e-12f}) {  // peaked rows: early
    int64_t count = 0;
    if (MassAtLeast(weights_.data(), vocab_, w, &count) >= target) {
      lo = w, count_lo = count;
      break;
    }
    hi = w, count_hi = count;
  }
  while (count_lo - count_hi > kBandTokens) {  // halve the band (in float order) until it is small
    uint32_t lo_bits, hi_bits;
    std::memcpy(&lo_bits, &lo, 4);
    std::memcpy(&hi_bits, &hi, 4);
    if (hi_bits - lo_bits < 2) break;  // one weight: ties, sorted below
    const uint32_t mid_bits = lo_bits + (hi_bits - lo_bits) / 2;
    float mid;
    std::memcpy(&mid, &mid_bits, 4);
    int64_t count = 0;
    if (MassAtLeast(weights_.data(), vocab_, mid, &count) >= target) {
      lo = mid, count_lo = count;
    } else {
      hi = mid, count_hi = count;
    }
  }
  // Above the band every token is in; the band's, best first, until the mass is reached.
  int64_t above_count = 0;
  double kept = MassAtLeast(weights_.data(), vocab_, hi, &above_count);
  const int64_t band = IndicesInRange(weights_.data(), vocab_, lo, hi, idx_.data());
  std::sort(idx_.begin(), idx_.begin() + band, ByLogitThenId(logits));
  int64_t keep = 0;
  while (keep < band && (kept < target || above_count + keep == 0)) {
    probs_[keep] = weights_[idx_[keep]];
    kept += probs_[keep++];
  }
  ZeroBelow(weights_.data(), vocab_, hi);
  for (int64_t i = 0; i < keep; ++i) weights_[idx_[i]] = probs_[i];
  return kept;
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
    if (all_tokens_) {
      const float inv = static_cast<float>(1.0 / sum);
      for (int64_t i = 0; i < vocab_; ++i) probs[i] = weights_[i] * inv;
    } else {
      std::fill(probs, probs + vocab_, 0.0f);
      for (int64_t i = 0; i < n; ++i) probs[idx_[i]] = static_cast<float>(probs_[i] / sum);
    }
  }
  std::uniform_real_distribution<double> u(0.0, sum);
  double r = u(rng_);
  if (all_tokens_) return static_cast<int32_t>(FirstReachingMass(weights_.data(), vocab_, r));
  for (int64_t i = 0; i < n; ++i) {
    r -= probs_[i];
    if (r <= 0 && probs_[i] > 0) return idx_[i];
  }
  for (int64_t i = n; i-- > 0;)
    if (probs_[i] > 0) return idx_[i];
  return idx_[0];
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
  dense_.resize(vocab_);
  if (all_tokens_) {  // every token: whole-row loops the compiler vectorises
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t t = 0; t < vocab_; ++t) dense_[t] = weights_[t] * inv;
  } else {
    std::fill(dense_.begin(), dense_.end(), 0.0f);
    for (int64_t i = 0; i < n; ++i) dense_[idx_[i]] = static_cast<float>(probs_[i] / sum);
  }
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
  if (all_tokens_) {
    if (draft_probs) {
      for (int64_t t = 0; t < vocab_; ++t) dense_[t] = std::max(0.0f, dense_[t] - draft_probs[t]);
    } else {
      dense_[drafted] = std::max(0.0f, dense_[drafted] - 1.0f);
    }
    residual = ZeroBelow(dense_.data(), vocab_, 0.0f);  // the sum, in vectors (all are >= 0)
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const int32_t t = CandidateId(i);
      const float qt = draft_probs ? draft_probs[t] : (t == drafted ? 1.0f : 0.0f);
      dense_[t] = std::max(0.0f, dense_[t] - qt);
      residual += dense_[t];
    }
  }
  if (residual <= 0) {  // p == q up to rounding: any draw from p is right
    for (int64_t i = 0; i < n; ++i) dense_[CandidateId(i)] = CandidateWeight(i);
    residual = sum;
  }
  std::uniform_real_distribution<double> u(0.0, residual);
  double r = u(rng_);
  if (all_tokens_) return static_cast<int32_t>(FirstReachingMass(dense_.data(), vocab_, r));
  for (int64_t i = 0; i < n; ++i) {
    r -= dense_[idx_[i]];
    if (r <= 0 && dense_[idx_[i]] > 0) return idx_[i];
  }
  for (int64_t i = n; i-- > 0;)
    if (dense_[idx_[i]] > 0) return idx_[i];
  return idx_[0];
}

}  // namespace amoeba
