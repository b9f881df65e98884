// A prompt cache: the KV of token prefixes that were already computed, kept in blocks of
// `block_tokens` tokens so a later sequence that starts with the same tokens skips their prefill.
//
// Blocks are content-addressed: a block's identity is a hash chain over the token ids of every
// block before it and its own, under a caller-chosen key (the KV of a prefix depends on the model
// that computed it, so each model gets its own key; the cache never mixes keys). Each block knows
// its parent, so a lookup walks the chain block by block and verifies tokens, not just hashes.
// Reuse is token-granular: after the whole blocks that match, a lookup also takes the leading
// tokens of the cached block that shares most with what follows (a shared system prompt ends
// inside a block whose tail is another client's question).
// Cached blocks are immutable and owned by the cache alone: Restore copies them into a slot of a
// KVCache (contiguous per sequence, as the attention kernels read it) and Insert copies a slot's
// finished blocks out, so nothing a running sequence does (rollback, cancellation, errors) can
// touch a cached block. Copying is cheap next to recomputing: a block costs one memcpy per
// (layer, KV head) where its prefill costs a pass over every weight.
//
// Memory is capped: inserting past `max_bytes` evicts least-recently-used blocks that no cached
// block extends (leaves first, so a chain never loses its middle). Not thread-safe: one owner
// thread; stats() may be read from any thread.
#pragma once
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "model/kv_cache.h"

namespace amoeba {

struct PrefixCacheOptions {
  int64_t block_tokens = 16;               // reuse is in whole blocks of this many tokens
  int64_t max_bytes = int64_t{256} << 20;  // cap on the blocks held (0: cache nothing)
};

struct PrefixCacheStats {
  int64_t bytes = 0, blocks = 0;
  int64_t inserted_blocks = 0, evicted_blocks = 0;  // since start
};

class PrefixCache {
 public:
  explicit PrefixCache(PrefixCacheOptions options = {});
  ~PrefixCache();
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  const PrefixCacheOptions& options() const { return opt_; }

  // How many leading tokens of `tokens` (at most `max_tokens`) are cached under `key`. Touches
  // nothing.
  int64_t Cached(std::string_view key, std::span<const int32_t> tokens, int64_t max_tokens) const;

  // Copies the KV of the longest cached prefix of `tokens` (at most `max_tokens`) into `slot` of
  // `cache`, which must be empty, and sets its length; returns the tokens restored (0 on a miss).
  // The blocks become most recently used. The cache's layout (layers, KV heads per layer, head_dim,
  // dtype) must be the one the key's blocks were stored with, else nothing is restored. A match
  // shorter than `min_tokens` restores nothing either (too little to be worth a copy).
  int64_t Restore(std::string_view key, std::span<const int32_t> tokens, int64_t max_tokens,
                  KVCache& cache, int64_t slot, int64_t min_tokens = 1);

  // Stores the whole blocks of tokens[0, n) not cached yet under `key`, copying their KV from
  // `slot` of `cache` (n <= cache.length(slot); positions [0, n) hold those tokens' KV). Blocks
  // already cached become most recently used. Evicts to stay under the cap; a block that cannot fit
  // is not stored (nor any after it). A key whose layout changed drops its old blocks.
  void Insert(std::string_view key, std::span<const int32_t> tokens, int64_t n,
              const KVCache& cache, int64_t slot);

  // Writes every block under `key` to `path` (atomically) / reads blocks of `key` back from a file
  // written by Save, keeping what fits under the cap. Load checks the layout against `cache`.
  absl::Status Save(std::string_view key, const std::string& path) const;
  absl::Status Load(std::string_view key, const std::string& path, const KVCache& layout_of);

  PrefixCacheStats stats() const;
  // The keys that hold blocks now.
  std::vector<std::string> keys() const;

 private:
  struct Layout {
    std::vector<int64_t> kv_heads;  // per layer
    int64_t head_dim = 0;
    int64_t elem_bytes = 0;
    bool operator==(const Layout&) const = default;
    int64_t BlockBytes(int64_t block_tokens) const;
  };
  struct Block {
    uint64_t hash = 0;
    Block* parent = nullptr;
    std::vector<Block*> children;  // cached blocks that extend this one
    uint64_t last_used = 0;
    std::vector<int32_t> tokens;
    std::unique_ptr<std::byte[]> data;  // per layer: K [kv_heads, block, head_dim], then V
  };
  struct Space {
    Layout layout;
    std::unordered_map<uint64_t, std::unique_ptr<Block>> blocks;
    std::vector<Block*> roots;  // first blocks of chains
  };
  // The longest cached prefix of `tokens` (at most `limit`): its whole blocks, and the block (a
  // child of the last) whose leading `partial` tokens continue it, if any.
  struct Match {
    std::vector<Block*> chain;
    Block* tail = nullptr;
    int64_t partial = 0;
    int64_t tokens = 0;
  };
  Match Find(const Space& space, std::string_view key, std::span<const int32_t> tokens,
             int64_t limit) const;
  void Unlink(Space& space, Block* b);
  // Rows [0, rows) of every (layer, K/V, head) run of a block's data and positions
  // [pos, pos + rows) of `slot`: into the cache (restore) or out of it (insert).
  void CopyRows(const Layout& layout, const KVCache& cache, int64_t slot, int64_t pos, int64_t rows,
                std::byte* block, bool into_cache) const;

  static Layout LayoutOf(const KVCache& cache);
  // The cached block that follows `parent` (null: the key's root) with `tokens`, or null.
  static Block* Child(const Space& space, uint64_t root, const Block* parent,
                      std::span<const int32_t> tokens);
  static uint64_t ChainHash(uint64_t parent, std::span<const int32_t> tokens);
  static uint64_t RootHash(std::string_view key);
  Block* AddBlock(Space& space, uint64_t hash, Block* parent, std::span<const int32_t> tokens);
  // Frees least-recently-used leaves until `extra` more bytes fit; never a block used at or after
  // `protect_from` (the chain the caller is walking).
  bool MakeRoom(int64_t extra, uint64_t protect_from);
  void DropSpace(Space& space);

  PrefixCacheOptions opt_;
  std::map<std::string, Space, std::less<>> spaces_;
  uint64_t clock_ = 0;
  std::atomic<int64_t> bytes_{0}, blocks_{0}, inserted_{0}, evicted_{0};
};

}  // namespace amoeba
