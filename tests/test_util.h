// Shared helpers for the tests: small models and scratch directories.
#pragma once
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/weights.h"

namespace amoeba::testing {

inline ModelConfig TinyConfig(int64_t kv_heads = 2, bool tie = false) {
  ModelConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 4;
  c.num_key_value_heads = kv_heads;
  c.head_dim = 16;
  c.vocab_size = 97;
  c.max_position_embeddings = 256;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = tie;
  return c;
}

// Larger weights than HF's 0.02 so that attention patterns and logits are far from uniform and
// the equivalence tests have something to compare.
inline Model TinyModel(uint64_t seed = 1, int64_t kv_heads = 2, bool tie = false) {
  Model m = RandomModel(TinyConfig(kv_heads, tie), seed, 0.15);
  // Non-trivial norm weights, so that a forgotten norm weight shows up.
  for (auto& l : m.layers) {
    l.attn_norm = 1 + 0.1 * at::randn_like(l.attn_norm);
    l.mlp_norm = 1 + 0.1 * at::randn_like(l.mlp_norm);
  }
  m.final_norm = 1 + 0.1 * at::randn_like(m.final_norm);
  return m;
}

class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() /
            ("amoeba-test-" + std::to_string(getpid()) + "-" + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string path() const { return path_.string(); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// For fixtures, which cannot ASSERT: a failed set-up step stops the test binary with the status
// instead of a later dereference of an empty result.
inline void MustOk(const absl::Status& s, const char* what) {
  if (s.ok()) return;
  std::fprintf(stderr, "fixture set-up failed: %s: %s\n", what, s.ToString().c_str());
  std::abort();
}
template <typename T>
T MustOk(absl::StatusOr<T> s, const char* what) {
  MustOk(s.status(), what);
  return std::move(*s);
}

// n token ids drawn uniformly from [0, vocab), reproducibly.
inline std::vector<int32_t> RandomTokens(int64_t n, int64_t vocab, uint64_t seed) {
  at::manual_seed(seed);
  at::Tensor t = at::randint(vocab, {n}, at::kInt);
  return std::vector<int32_t>(t.data_ptr<int32_t>(), t.data_ptr<int32_t>() + n);
}

inline double MaxAbsDiff(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

}  // namespace amoeba::testing
