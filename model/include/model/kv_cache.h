// KV cache with per-slot storage that grows with the sequence: for each slot and each layer of the
// model it serves, K and V of shape [capacity, kv_heads_of_layer, head_dim], position-major, so
// the positions a sequence holds are one run of memory per layer whatever the capacity (decode
// attention streams it; decode_attention.h says why). A slot holds one
// sequence; `length(slot)` is how many positions are filled. Capacity grows by doubling (from
// kMinCapacity, up to max_len) when a call needs more, and Reset() releases it, so memory follows
// the tokens actually held, not slots × max_len. Layers a subnet skips have no cache at all.
// Released slot memory goes to a process-wide pool (up to a limit) that the next slot of the same
// size takes it from: growing then costs the copy, not fresh pages.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "model/weights.h"

namespace amoeba {

class KVCache {
 public:
  static constexpr int64_t kMinCapacity = 64;
  // A slot holding at least this many bytes lives on 2 MB pages (one arena for all its layers,
  // rounded up to 2 MB: at most a quarter more).
  static constexpr size_t kHugePageMinBytes = size_t{8} << 20;
  // From this size to kHugePageMinBytes the arena's whole 2 MB ranges are on 2 MB pages and its
  // end on 4 KB pages (AllocateMostlyHugePages: nothing rounded up). On 4 KB pages alone a
  // 100m-preset slot of 64 positions (4.7 MB) cost a batch-16 decode step ~8% (page walks).
  static constexpr size_t kMostlyHugePageMinBytes = size_t{2} << 20;
  static constexpr size_t kDefaultArenaPoolBytes = size_t{512} << 20;

  // The pool of released slot memory: its limit (lowering it frees the excess), freeing it down to
  // `keep_bytes`, largest arenas first (a server going idle), and what it holds.
  static void SetArenaPoolLimit(size_t bytes);
  static void ReleasePooledArenas(size_t keep_bytes = 0);
  static int64_t PooledArenaBytes();

  KVCache() = default;
  // dtype: kFloat, or kHalf (half the memory and attention reads; values rounded to fp16).
  KVCache(const Model& model, int64_t slots, int64_t max_len, at::ScalarType dtype = at::kFloat);

  int64_t slots() const { return static_cast<int64_t>(slots_.size()); }
  int64_t max_len() const { return max_len_; }
  at::ScalarType dtype() const { return dtype_; }
  int64_t length(int64_t slot) const { return slots_.at(slot).length; }
  void set_length(int64_t slot, int64_t len) { slots_.at(slot).length = len; }
  // Empties the slot and gives its memory back (to the pool).
  void Reset(int64_t slot);
  // Makes room for `len` positions in `slot` (keeping what it holds); len <= max_len.
  void Reserve(int64_t slot, int64_t len);
  int64_t capacity(int64_t slot) const { return slots_.at(slot).capacity; }
  int64_t num_layers() const { return static_cast<int64_t>(kv_heads_.size()); }
  // [capacity(slot), kv_heads, head_dim] of one layer.
  at::Tensor& k(int64_t layer, int64_t slot) { return slots_[slot].k[layer]; }
  at::Tensor& v(int64_t layer, int64_t slot) { return slots_[slot].v[layer]; }
  const at::Tensor& k(int64_t layer, int64_t slot) const { return slots_[slot].k[layer]; }
  const at::Tensor& v(int64_t layer, int64_t slot) const { return slots_[slot].v[layer]; }
  int64_t kv_heads(int64_t layer) const { return kv_heads_[layer]; }
  int64_t head_dim() const { return head_dim_; }
  // Bytes held now (grows and shrinks with the sequences).
  int64_t bytes() const;

 private:
  struct Slot {
    std::vector<at::Tensor> k, v;
    int64_t length = 0, capacity = 0;
  };
  std::vector<Slot> slots_;
  std::vector<int64_t> kv_heads_;
  int64_t head_dim_ = 0, max_len_ = 0;
  at::ScalarType dtype_ = at::kFloat;
};

}  // namespace amoeba
