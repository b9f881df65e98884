// Preallocated KV cache: per layer of the model it serves, K and V of shape
// [slots, kv_heads_of_layer, max_len, head_dim]. A slot holds one sequence; `length(slot)` is how
// many positions are filled. Layers a subnet skips have no cache at all.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "model/weights.h"

namespace amoeba {

class KVCache {
 public:
  KVCache() = default;
  KVCache(const Model& model, int64_t slots, int64_t max_len);

  int64_t slots() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t max_len() const { return max_len_; }
  int64_t length(int64_t slot) const { return lengths_.at(slot); }
  void set_length(int64_t slot, int64_t len) { lengths_.at(slot) = len; }
  void Reset(int64_t slot) { lengths_.at(slot) = 0; }
  int64_t num_layers() const { return static_cast<int64_t>(k_.size()); }
  at::Tensor& k(int64_t layer) { return k_[layer]; }
  at::Tensor& v(int64_t layer) { return v_[layer]; }
  int64_t bytes() const;

 private:
  std::vector<at::Tensor> k_, v_;
  std::vector<int64_t> lengths_;
  int64_t max_len_ = 0;
};

}  // namespace amoeba
