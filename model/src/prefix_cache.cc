#include "model/prefix_cache.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "model/file_util.h"
#include "model/status_macros.h"

namespace amoeba {

namespace {

// splitmix64's finaliser: a stable hash (persisted files must hash alike in every process).
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Bytes of one (layer, head) run of `tokens` positions.
int64_t RunBytes(int64_t tokens, int64_t head_dim, int64_t elem) {
  return tokens * head_dim * elem;
}

// Version 02: blocks position-major, as the KV cache (01 held each head's rows together).
constexpr char kPrefixCacheMagic[8] = {'A', 'M', 'B', 'P', 'C', 'C', '0', '2'};

}  // namespace

PrefixCache::PrefixCache(PrefixCacheOptions options) : opt_(options) {
  opt_.block_tokens = std::max<int64_t>(1, opt_.block_tokens);
}

PrefixCache::~PrefixCache() = default;

int64_t PrefixCache::Layout::BlockBytes(int64_t block_tokens) const {
  int64_t heads = 0;
  for (int64_t h : kv_heads) heads += h;
  return 2 * heads * RunBytes(block_tokens, head_dim, elem_bytes);
}

PrefixCache::Layout PrefixCache::LayoutOf(const KVCache& cache) {
  Layout l;
  for (int64_t i = 0; i < cache.num_layers(); ++i) l.kv_heads.push_back(cache.kv_heads(i));
  l.head_dim = cache.head_dim();
  l.elem_bytes = static_cast<int64_t>(at::elementSize(cache.dtype()));
  return l;
}

uint64_t PrefixCache::RootHash(std::string_view key) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (char c : key) h = Mix(h ^ static_cast<uint8_t>(c));
  return h;
}

uint64_t PrefixCache::ChainHash(uint64_t parent, std::span<const int32_t> tokens) {
  uint64_t h = parent;
  for (int32_t t : tokens) h = Mix(h ^ static_cast<uint32_t>(t));
  return h;
}

PrefixCache::Block* PrefixCache::Child(const Space& space, uint64_t root, const Block* parent,
                                       std::span<const int32_t> tokens) {
  const uint64_t h = ChainHash(parent ? parent->hash : root, tokens);
  auto it = space.blocks.find(h);
  if (it == space.blocks.end()) return nullptr;
  Block* b = it->second.get();
  // A hash is only a hint: the block must extend this very parent with these very tokens.
  if (b->parent != parent ||
      !std::equal(tokens.begin(), tokens.end(), b->tokens.begin(), b->tokens.end()))
    return nullptr;
  return b;
}

PrefixCache::Match PrefixCache::Find(const Space& space, std::string_view key,
                                     std::span<const int32_t> tokens, int64_t limit) const {
  Match m;
  const int64_t bt = opt_.block_tokens;
  limit = std::min<int64_t>(limit, static_cast<int64_t>(tokens.size()));
  const uint64_t root = RootHash(key);
  while (m.tokens + bt <= limit) {
    Block* b = Child(space, root, m.chain.empty() ? nullptr : m.chain.back(),
                     tokens.subspan(m.tokens, bt));
    if (!b) break;
    m.chain.push_back(b);
    m.tokens += bt;
  }
  // The next block continues the prefix in part, at most: the child sharing most leading tokens.
  const auto rest = tokens.subspan(m.tokens, limit - m.tokens);
  for (Block* c : m.chain.empty() ? space.roots : m.chain.back()->children) {
    const auto end = c->tokens.begin() +
                     static_cast<std::ptrdiff_t>(std::min<size_t>(rest.size(), c->tokens.size()));
    const int64_t common =
        std::mismatch(c->tokens.begin(), end, rest.begin()).first - c->tokens.begin();
    if (common > m.partial) {
      m.partial = common;
      m.tail = c;
    }
  }
  m.tokens += m.partial;
  return m;
}

int64_t PrefixCache::Cached(std::string_view key, std::span<const int32_t> tokens,
                            int64_t max_tokens) const {
  auto sp = spaces_.find(key);
  if (sp == spaces_.end()) return 0;
  return Find(sp->second, key, tokens, max_tokens).tokens;
}

int64_t PrefixCache::Restore(std::string_view key, std::span<const int32_t> tokens,
                             int64_t max_tokens, KVCache& cache, int64_t slot, int64_t min_tokens) {
  auto sp = spaces_.find(key);
  if (sp == spaces_.end() || cache.length(slot) != 0) return 0;
  Space& space = sp->second;
  if (!(space.layout == LayoutOf(cache))) return 0;
  const Match m = Find(space, key, tokens, std::min(max_tokens, cache.max_len()));
  if (m.tokens == 0 || m.tokens < min_tokens) return 0;
  cache.Reserve(slot, m.tokens);
  const int64_t bt = opt_.block_tokens;
  const uint64_t stamp = ++clock_;
  auto copy_in = [&](Block* b, int64_t pos, int64_t rows) {
    b->last_used = stamp;
    CopyRows(space.layout, cache, slot, pos, rows, b->data.get(), /*into_cache=*/true);
  };
  for (size_t i = 0; i < m.chain.size(); ++i) copy_in(m.chain[i], static_cast<int64_t>(i) * bt, bt);
  if (m.tail) copy_in(m.tail, static_cast<int64_t>(m.chain.size()) * bt, m.partial);
  cache.set_length(slot, m.tokens);
  return m.tokens;
}

void PrefixCache::Unlink(Space& space, Block* b) {
  std::vector<Block*>& siblings = b->parent ? b->parent->children : space.roots;
  siblings.erase(std::find(siblings.begin(), siblings.end(), b));
  bytes_ -= space.layout.BlockBytes(opt_.block_tokens);
  --blocks_;
  space.blocks.erase(b->hash);
}

void PrefixCache::CopyRows(const Layout& layout, const KVCache& cache, int64_t slot, int64_t pos,
                           int64_t rows, std::byte* block, bool into_cache) const {
  // The cache is position-major ([capacity, kv_heads, head_dim] per layer), and so is a block's
  // run per layer and tensor: `rows` positions are one copy.
  for (int64_t l = 0; l < static_cast<int64_t>(layout.kv_heads.size()); ++l) {
    const int64_t position = layout.kv_heads[l] * RunBytes(1, layout.head_dim, layout.elem_bytes);
    for (const at::Tensor* t : {&cache.k(l, slot), &cache.v(l, slot)}) {
      // A tensor's storage is writable through a const handle: restoring writes the slot.
      std::byte* at = static_cast<std::byte*>(t->data_ptr()) + pos * position;
      if (into_cache)
        std::memcpy(at, block, static_cast<size_t>(rows * position));
      else
        std::memcpy(block, at, static_cast<size_t>(rows * position));
      block += opt_.block_tokens * position;
    }
  }
}

PrefixCache::Block* PrefixCache::AddBlock(Space& space, uint64_t hash, Block* parent,
                                          std::span<const int32_t> tokens) {
  auto b = std::make_unique<Block>();
  b->hash = hash;
  b->parent = parent;
  b->tokens.assign(tokens.begin(), tokens.end());
  b->data.reset(new std::byte[static_cast<size_t>(space.layout.BlockBytes(opt_.block_tokens))]);
  b->last_used = clock_;
  Block* raw = b.get();
  // Same hash, different chain (a collision, or a stale block): the newer one wins the slot.
  if (auto old = space.blocks.find(hash); old != space.blocks.end()) {
    if (!old->second->children.empty() || old->second.get() == parent)
      return nullptr;  // keep the chain it heads intact
    Unlink(space, old->second.get());
  }
  (parent ? parent->children : space.roots).push_back(raw);
  space.blocks[hash] = std::move(b);
  bytes_ += space.layout.BlockBytes(opt_.block_tokens);
  ++blocks_;
  ++inserted_;
  return raw;
}

void PrefixCache::Insert(std::string_view key, std::span<const int32_t> tokens, int64_t n,
                         const KVCache& cache, int64_t slot) {
  const int64_t bt = opt_.block_tokens;
  n = std::min({n, static_cast<int64_t>(tokens.size()), cache.length(slot)});
  if (n < bt || opt_.max_bytes <= 0) return;
  const Layout layout = LayoutOf(cache);
  auto sp = spaces_.find(key);
  if (sp != spaces_.end() && !(sp->second.layout == layout)) {
    DropSpace(sp->second);
    spaces_.erase(sp);
    sp = spaces_.end();
  }
  if (sp == spaces_.end()) {
    sp = spaces_.emplace(std::string(key), Space{}).first;
    sp->second.layout = layout;
  }
  Space& space = sp->second;
  const int64_t block_bytes = layout.BlockBytes(bt);
  if (block_bytes > opt_.max_bytes) return;
  const uint64_t root = RootHash(key);
  const uint64_t stamp = ++clock_;
  Block* parent = nullptr;
  for (int64_t pos = 0; pos + bt <= n; pos += bt) {
    const auto block_tokens = tokens.subspan(pos, bt);
    Block* b = Child(space, root, parent, block_tokens);
    if (!b) {
      // Blocks touched by this call carry `stamp`: eviction leaves them (and so this chain) be.
      if (!MakeRoom(block_bytes, stamp)) return;
      b = AddBlock(space, ChainHash(parent ? parent->hash : root, block_tokens), parent,
                   block_tokens);
      if (!b) return;
      CopyRows(layout, cache, slot, pos, bt, b->data.get(), /*into_cache=*/false);
    }
    b->last_used = stamp;
    parent = b;
  }
}

bool PrefixCache::MakeRoom(int64_t extra, uint64_t protect_from) {
  while (bytes_ + extra > opt_.max_bytes) {
    Space* victim_space = nullptr;
    Block* victim = nullptr;
    for (auto& [k, space] : spaces_)
      for (auto& [h, b] : space.blocks)
        if (b->children.empty() && b->last_used < protect_from &&
            (!victim || b->last_used < victim->last_used)) {
          victim = b.get();
          victim_space = &space;
        }
    if (!victim) return false;
    ++evicted_;
    Unlink(*victim_space, victim);
  }
  return true;
}

void PrefixCache::DropSpace(Space& space) {
  bytes_ -= static_cast<int64_t>(space.blocks.size()) * space.layout.BlockBytes(opt_.block_tokens);
  blocks_ -= static_cast<int64_t>(space.blocks.size());
  space.blocks.clear();
  space.roots.clear();
}

std::vector<std::string> PrefixCache::keys() const {
  std::vector<std::string> k;
  for (const auto& [key, space] : spaces_)
    if (!space.blocks.empty()) k.push_back(key);
  return k;
}

PrefixCacheStats PrefixCache::stats() const {
  PrefixCacheStats s;
  s.bytes = bytes_;
  s.blocks = blocks_;
  s.inserted_blocks = inserted_;
  s.evicted_blocks = evicted_;
  return s;
}

// File: magic, block_tokens, layer count, head_dim, elem_bytes, kv_heads[layers], block count,
// then per block (parents before children): parent index (-1: root), tokens, data. Integers are
// int64 in host byte order (the file is a cache of this machine's server, not an interchange
// format).
absl::Status PrefixCache::Save(std::string_view key, const std::string& path) const {
  auto sp = spaces_.find(key);
  std::vector<const Block*> order;
  std::unordered_map<const Block*, int64_t> index;
  Layout layout;
  if (sp != spaces_.end()) {
    layout = sp->second.layout;
    // Parents first: by chain depth.
    std::vector<std::pair<int64_t, const Block*>> by_depth;
    for (const auto& [h, b] : sp->second.blocks) {
      int64_t depth = 0;
      for (const Block* p = b->parent; p; p = p->parent) ++depth;
      by_depth.emplace_back(depth, b.get());
    }
    std::sort(by_depth.begin(), by_depth.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    for (const auto& [d, b] : by_depth) {
      index[b] = static_cast<int64_t>(order.size());
      order.push_back(b);
    }
  }
  const int64_t block_bytes = layout.BlockBytes(opt_.block_tokens);
  return WriteFileAtomicWith(path, [&](int fd) -> absl::Status {
    auto put = [&](int64_t v) { return WriteAll(fd, &v, sizeof v, path); };
    RETURN_IF_ERROR(WriteAll(fd, kPrefixCacheMagic, sizeof kPrefixCacheMagic, path));
    for (int64_t v : {opt_.block_tokens, static_cast<int64_t>(layout.kv_heads.size()),
                      layout.head_dim, layout.elem_bytes})
      RETURN_IF_ERROR(put(v));
    for (int64_t h : layout.kv_heads) RETURN_IF_ERROR(put(h));
    RETURN_IF_ERROR(put(static_cast<int64_t>(order.size())));
    for (const Block* b : order) {
      RETURN_IF_ERROR(put(b->parent ? index.at(b->parent) : -1));
      RETURN_IF_ERROR(WriteAll(fd, b->tokens.data(), b->tokens.size() * sizeof(int32_t), path));
      RETURN_IF_ERROR(WriteAll(fd, b->data.get(), static_cast<size_t>(block_bytes), path));
    }
    return absl::OkStatus();
  });
}

absl::Status PrefixCache::Load(std::string_view key, const std::string& path,
                               const KVCache& layout_of) {
  ASSIGN_OR_RETURN(std::string bytes, ReadFile(path));
  size_t at = 0;
  auto take = [&](void* dst, size_t n) {
    if (bytes.size() - at < n) return false;
    std::memcpy(dst, bytes.data() + at, n);
    at += n;
    return true;
  };
  auto bad = [&](std::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not a prompt cache file (", std::string(why), ")"));
  };
  char magic[sizeof kPrefixCacheMagic];
  if (!take(magic, sizeof magic) || std::memcmp(magic, kPrefixCacheMagic, 6) != 0)
    return bad("bad magic");
  if (std::memcmp(magic, kPrefixCacheMagic, sizeof magic) != 0)
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": prompt cache file of format ", absl::string_view(magic + 6, 2),
                     ", this build reads format ", absl::string_view(kPrefixCacheMagic + 6, 2)));
  int64_t bt = 0, layers = 0;
  Layout layout;
  if (!take(&bt, 8) || !take(&layers, 8) || !take(&layout.head_dim, 8) ||
      !take(&layout.elem_bytes, 8) || layers < 0 || layers > 4096)
    return bad("truncated header");
  layout.kv_heads.resize(static_cast<size_t>(layers));
  for (int64_t& h : layout.kv_heads)
    if (!take(&h, 8)) return bad("truncated header");
  if (bt != opt_.block_tokens)
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": written with blocks of ", bt, " tokens, this cache uses ", opt_.block_tokens));
  if (!(layout == LayoutOf(layout_of)))
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": its KV layout is not this model's (another shape or KV dtype)"));
  int64_t count = 0;
  if (!take(&count, 8) || count < 0) return bad("truncated block count");
  // The whole file is checked before anything is added: a bad file loads nothing.
  const int64_t block_bytes = layout.BlockBytes(bt);
  const size_t record = 8 + static_cast<size_t>(bt) * sizeof(int32_t) + block_bytes;
  if ((bytes.size() - at) / record != static_cast<size_t>(count) ||
      (bytes.size() - at) % record != 0)
    return bad(absl::StrCat("truncated: ", count, " blocks announced, ", bytes.size() - at,
                            " bytes of blocks"));
  for (int64_t i = 0; i < count; ++i) {
    int64_t parent_index = 0;
    std::memcpy(&parent_index, bytes.data() + at + static_cast<size_t>(i) * record, 8);
    if (parent_index < -1 || parent_index >= i)
      return bad(absl::StrCat("block ", i, " names parent ", parent_index));
  }
  auto sp = spaces_.find(key);
  if (sp == spaces_.end()) {
    sp = spaces_.emplace(std::string(key), Space{}).first;
    sp->second.layout = layout;
  } else if (!(sp->second.layout == layout)) {
    DropSpace(sp->second);
    sp->second.layout = layout;
  }
  Space& space = sp->second;
  const uint64_t root = RootHash(key);
  std::vector<Block*> loaded;
  std::vector<int32_t> tokens(static_cast<size_t>(bt));
  const uint64_t stamp = ++clock_;
  for (int64_t i = 0; i < count; ++i) {
    int64_t parent_index = 0;
    take(&parent_index, 8);
    take(tokens.data(), tokens.size() * sizeof(int32_t));
    Block* parent = parent_index < 0 ? nullptr : loaded[static_cast<size_t>(parent_index)];
    Block* b = nullptr;
    if (parent_index < 0 || parent) {  // a block whose parent did not fit is dropped
      b = Child(space, root, parent, tokens);
      if (!b && MakeRoom(block_bytes, stamp)) {
        b = AddBlock(space, ChainHash(parent ? parent->hash : root, tokens), parent, tokens);
        if (b) std::memcpy(b->data.get(), bytes.data() + at, static_cast<size_t>(block_bytes));
      }
      if (b) b->last_used = stamp;
    }
    at += static_cast<size_t>(block_bytes);
    loaded.push_back(b);
  }
  return absl::OkStatus();
}

}  // namespace amoeba
