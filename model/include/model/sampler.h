// Next-token selection: penalties (repetition over the prompt and the output; OpenAI's presence and
// frequency over the output) and logit biases, then temperature → top-k → min-p → top-p.
// temperature == 0 means greedy. Buffers are sized once, so sampling does not allocate per token.
#pragma once
#include <cstdint>
#include <random>
#include <span>
#include <utility>
#include <vector>

namespace amoeba {

struct SamplingOptions {
  float temperature = 0.0f;         // 0 = greedy
  int64_t top_k = 0;                // 0 = off
  float top_p = 1.0f;               // 1 = off
  float repetition_penalty = 1.0f;  // 1 = off
  uint64_t seed = 0;
  float min_p = 0.0f;  // keep tokens with p >= min_p · p_max; 0 = off
  // OpenAI's: logit -= presence · [generated before] + frequency · (times generated).
  float presence_penalty = 0.0f, frequency_penalty = 0.0f;
  std::vector<std::pair<int32_t, float>> logit_bias = {};  // added to those tokens' logits
};

class Sampler {
 public:
  Sampler(const SamplingOptions& options, int64_t vocab_size);
  // Marks a token as seen (prompt and generated tokens) for the repetition penalty.
  void Observe(int32_t token);
  // A generated token: seen, and counted for the presence and frequency penalties.
  void ObserveGenerated(int32_t token);
  // Whether the penalties depend on the tokens observed (a draft sampler then follows them).
  bool UsesHistory() const;
  // Picks a token; `logits` (vocab_size floats) is modified in place. With `probs` (vocab_size
  // floats), also writes the distribution the token was drawn from (one-hot when greedy).
  int32_t Sample(float* logits, float* probs = nullptr);
  // Speculative decoding's check of a drafted token against these logits (the standard rule, so
  // the output is distributed as Sample's): greedy keeps `drafted` when it is the argmax;
  // sampling keeps it with probability min(1, p/q), where q = `draft_probs` (the distribution it
  // was drawn from; null = drawn deterministically, q one-hot), else draws from max(0, p - q)
  // renormalised. Returns the token chosen; `accepted` says whether it is `drafted`.
  int32_t Verify(float* logits, int32_t drafted, const float* draft_probs, bool* accepted);
  // Takes `other`'s seen tokens (not its random state): a draft sampler following its target.
  void CopyHistoryFrom(const Sampler& other);
  const SamplingOptions& options() const { return opt_; }
  int64_t vocab_size() const { return vocab_; }

 private:
  // The candidates after temperature, top-k, min-p and top-p, with unnormalised probabilities
  // summing to `sum`; returns their count n. Either every token (all_tokens_: token i has
  // weights_[i], 0 for those min-p or top-p drop; n = vocab size) or top-k's short list (token
  // idx_[i] has probs_[i]). Not for greedy.
  int64_t Candidates(const float* logits, double* sum);
  // The top_k tokens by logit (ties to the lower id) into idx_, in no order; returns how many.
  int64_t TopK(const float* logits, float max_logit);
  // Zeroes weights_ (every token's, total `sum`) outside the top-p nucleus; returns its mass.
  double KeepNucleus(const float* logits, double sum);
  int32_t CandidateId(int64_t i) const { return all_tokens_ ? static_cast<int32_t>(i) : idx_[i]; }
  float CandidateWeight(int64_t i) const { return all_tokens_ ? weights_[i] : probs_[i]; }
  void ApplyPenalty(float* logits) const;

  SamplingOptions opt_;
  int64_t vocab_;
  std::mt19937_64 rng_;
  std::vector<uint8_t> seen_mask_;
  std::vector<int32_t> seen_;
  std::vector<int32_t> generated_count_;  // per token
  std::vector<int32_t> generated_;        // the distinct generated tokens
  bool all_tokens_ = false;
  std::vector<float> weights_;  // exp((logit - max) / temperature) of every token
  std::vector<int32_t> idx_;
  std::vector<float> probs_;
  std::vector<float> dense_;  // Verify: the target's distribution over the vocabulary
};

}  // namespace amoeba
