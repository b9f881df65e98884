#include "model/kv_cache.h"

#include <algorithm>

namespace amoeba {

KVCache::KVCache(const Model& model, int64_t slots, int64_t max_len, at::ScalarType dtype)
    : head_dim_(model.config.head_dim), max_len_(max_len), dtype_(dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf, "KVCache: fp32 or fp16");
  for (const auto& l : model.layers) kv_heads_.push_back(l.kv_heads(head_dim_));
  slots_.resize(slots);
}

void KVCache::Reset(int64_t slot) {
  Slot& s = slots_.at(slot);
  s = Slot{};
}

void KVCache::Reserve(int64_t slot, int64_t len) {
  Slot& s = slots_.at(slot);
  if (len <= s.capacity) return;
  int64_t cap = std::max(kMinCapacity, s.capacity);
  while (cap < len) cap *= 2;
  cap = std::min(cap, std::max(max_len_, len));
  const int64_t layers = num_layers();
  s.k.resize(layers);
  s.v.resize(layers);
  for (int64_t l = 0; l < layers; ++l) {
    for (at::Tensor* t : {&s.k[l], &s.v[l]}) {
      at::Tensor grown = at::empty({kv_heads_[l], cap, head_dim_}, at::TensorOptions(dtype_));
      if (s.length > 0) grown.narrow(1, 0, s.length).copy_(t->narrow(1, 0, s.length));
      *t = std::move(grown);
    }
  }
  s.capacity = cap;
}

int64_t KVCache::bytes() const {
  int64_t b = 0;
  for (const Slot& s : slots_)
    for (size_t l = 0; l < s.k.size(); ++l)
      b += (s.k[l].numel() + s.v[l].numel()) * at::elementSize(dtype_);
  return b;
}

}  // namespace amoeba
