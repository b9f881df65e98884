#include "model/kv_cache.h"

#include <algorithm>
#include <memory>

#include "model/runtime.h"

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
  const size_t elem = at::elementSize(dtype_);
  size_t total = 0;
  for (int64_t l = 0; l < layers; ++l) total += 2 * kv_heads_[l] * cap * head_dim_ * elem;
  // A decode step reads every layer's keys and values as one short stream per KV head: on 4 KB
  // pages each stream starts with page walks (the weights' stream has evicted the page tables).
  // A slot big enough is one arena on 2 MB pages; small ones stay plain tensors (rounding up to
  // 2 MB would waste more than a quarter).
  std::shared_ptr<void> arena = total >= kHugePageMinBytes ? AllocateHugePages(total) : nullptr;
  size_t offset = 0;
  auto next = [&](int64_t l) {
    const std::vector<int64_t> sizes = {kv_heads_[l], cap, head_dim_};
    if (!arena) return at::empty(sizes, at::TensorOptions(dtype_));
    void* data = static_cast<char*>(arena.get()) + offset;
    offset += kv_heads_[l] * cap * head_dim_ * elem;
    return at::from_blob(
        data, sizes, [arena](void*) {}, at::TensorOptions(dtype_));
  };
  s.k.resize(layers);
  s.v.resize(layers);
  for (int64_t l = 0; l < layers; ++l) {
    for (at::Tensor* t : {&s.k[l], &s.v[l]}) {
      at::Tensor grown = next(l);
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
