#include "model/kv_cache.h"

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "model/runtime.h"

namespace amoeba {

namespace {

// Slot arenas freed by Reset and by growth, kept for the next slot that needs the same size.
// A fresh arena costs its page faults (zeroing, and on 2 MB pages the kernel's compaction): on a
// 2-core Zen 5 VM sixteen 100m-preset slots growing from 64 to 128 positions stalled one decode
// step for 371 ms, every sequence in it waiting. Sizes repeat (capacities double from
// kMinCapacity, per model), so exact sizes are reused.
class ArenaPool {
 public:
  static ArenaPool& Get() {
    static ArenaPool* pool = new ArenaPool;  // outlives every arena (never destroyed)
    return *pool;
  }

  std::shared_ptr<void> Acquire(size_t bytes) {
    const bool huge = bytes >= KVCache::kHugePageMinBytes;
    const size_t unit = huge ? size_t{2} << 20 : size_t{64} << 10;
    const size_t size = (std::max<size_t>(bytes, 1) + unit - 1) / unit * unit;
    std::shared_ptr<void> owner;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (auto it = free_.find(size); it != free_.end()) {
        owner = std::move(it->second);
        free_.erase(it);
        pooled_ -= size;
      }
    }
    if (!owner) {
      // 2 MB pages where a slot has whole 2 MB ranges: a decode step reads every layer's keys
      // and values as one short stream per layer, and on 4 KB pages each costs page walks.
      if (huge) {
        owner = AllocateHugePages(size);
      } else if (size >= KVCache::kMostlyHugePageMinBytes) {
        owner = AllocateMostlyHugePages(size);
      } else {
        owner = std::shared_ptr<void>(std::aligned_alloc(4096, size), std::free);
      }
      if (!owner.get()) return nullptr;
    }
    // The slot's handle: when its last tensor goes, the memory comes back here.
    void* data = owner.get();
    return std::shared_ptr<void>(data, [owner = std::move(owner), size](void*) mutable {
      Get().Release(std::move(owner), size);
    });
  }

  void Release(std::shared_ptr<void> owner, size_t size) {
    std::lock_guard<std::mutex> l(mu_);
    if (pooled_ + size > limit_) return;  // freed by `owner` going out of scope
    free_.emplace(size, std::move(owner));
    pooled_ += size;
  }

  void Trim(size_t keep) {
    std::vector<std::shared_ptr<void>> dropped;  // freed outside the lock
    std::lock_guard<std::mutex> l(mu_);
    while (pooled_ > keep && !free_.empty()) {
      auto it = std::prev(free_.end());  // largest first
      pooled_ -= it->first;
      dropped.push_back(std::move(it->second));
      free_.erase(it);
    }
  }

  void SetLimit(size_t bytes) {
    {
      std::lock_guard<std::mutex> l(mu_);
      limit_ = bytes;
    }
    Trim(bytes);
  }

  size_t pooled() {
    std::lock_guard<std::mutex> l(mu_);
    return pooled_;
  }

 private:
  std::mutex mu_;
  std::multimap<size_t, std::shared_ptr<void>> free_;
  size_t pooled_ = 0;
  size_t limit_ = KVCache::kDefaultArenaPoolBytes;
};

}  // namespace

void KVCache::SetArenaPoolLimit(size_t bytes) {
  ArenaPool::Get().SetLimit(bytes);
}
void KVCache::ReleasePooledArenas(size_t keep_bytes) {
  ArenaPool::Get().Trim(keep_bytes);
}
int64_t KVCache::PooledArenaBytes() {
  return static_cast<int64_t>(ArenaPool::Get().pooled());
}

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
  // One arena per slot (on 2 MB pages when big enough; small ones are not rounded up that far,
  // which would waste more than a quarter), from the pool of freed ones when it has the size.
  std::shared_ptr<void> arena = ArenaPool::Get().Acquire(total);
  TORCH_CHECK(arena, "KVCache: out of memory for ", total, " bytes");
  size_t offset = 0;
  auto next = [&](int64_t l) {
    const std::vector<int64_t> sizes = {cap, kv_heads_[l], head_dim_};
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
      if (s.length > 0) grown.narrow(0, 0, s.length).copy_(t->narrow(0, 0, s.length));
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
