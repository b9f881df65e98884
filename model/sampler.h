// Next-token selection with Hugging Face's order: repetition penalty → temperature → top-k → top-p.
// temperature == 0 means greedy. Buffers are sized once, so sampling does not allocate per token.
#pragma once
#include <cstdint>
#include <random>
#include <span>
#include <vector>

namespace amoeba {

struct SamplingOptions {
  float temperature = 0.0f;         // 0 = greedy
  int64_t top_k = 0;                // 0 = off
  float top_p = 1.0f;               // 1 = off
  float repetition_penalty = 1.0f;  // 1 = off
  uint64_t seed = 0;
};

class Sampler {
 public:
  Sampler(const SamplingOptions& options, int64_t vocab_size);
  // Marks a token as seen (prompt and generated tokens) for the repetition penalty.
  void Observe(int32_t token);
  // Picks a token; `logits` (vocab_size floats) is modified in place.
  int32_t Sample(float* logits);

 private:
  SamplingOptions opt_;
  int64_t vocab_;
  std::mt19937_64 rng_;
  std::vector<uint8_t> seen_mask_;
  std::vector<int32_t> seen_;
  std::vector<int32_t> idx_;
  std::vector<float> probs_;
};

}  // namespace amoeba
