// A new token's log-probability under the model and the most likely alternatives at its position.
// Free of ATen: the front ends include it.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

namespace amoeba {

inline constexpr int32_t kMaxTopLogprobs = 20;

struct TokenLogprobs {
  int32_t token = -1;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;  // most likely first
};

}  // namespace amoeba
