// The prompt cache: restored KV is byte for byte what was stored, a restored prefix continues to
// the same logits as a full prefill, the cap holds, and a saved cache loads back.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <vector>

#include "model/engine.h"
#include "model/file_util.h"
#include "model/prefix_cache.h"
#include "tests/test_util.h"

namespace amoeba {
namespace prefix_cache_test {  // named: a unity build joins test files
using testing::MaxAbsDiff;
using testing::RandomTokens;
using testing::TinyModel;

// Prefills `ids` into `slot`, returns the last position's logits.
at::Tensor Prefill(Engine& e, KVCache& c, int64_t slot, std::span<const int32_t> ids) {
  SeqInput in{slot, ids};
  return testing::MustOk(e.Forward(c, {&in, 1}), "forward").clone();
}

// Positions [0, n) of every layer's K and V in `slot` are identical in both caches.
void ExpectSameKV(KVCache& a, int64_t sa, KVCache& b, int64_t sb, int64_t n) {
  for (int64_t l = 0; l < a.num_layers(); ++l) {
    EXPECT_TRUE(at::equal(a.k(l, sa).narrow(0, 0, n), b.k(l, sb).narrow(0, 0, n))) << "K " << l;
    EXPECT_TRUE(at::equal(a.v(l, sa).narrow(0, 0, n), b.v(l, sb).narrow(0, 0, n))) << "V " << l;
  }
}

TEST(PrefixCacheTest, RestoredPrefixContinuesLikeAFullPrefill) {
  at::InferenceMode guard;
  auto m = std::make_shared<const Model>(TinyModel(3, 2));
  for (at::ScalarType kv : {at::kFloat, at::kHalf}) {
    Engine engine(m, {.max_len = 256, .kv_dtype = kv});
    KVCache cache = engine.NewCache(3);
    PrefixCache pc({.block_tokens = 16, .max_bytes = 64 << 20});
    auto prompt = RandomTokens(70, m->config.vocab_size, 5);
    at::Tensor full = Prefill(engine, cache, 0, prompt);
    pc.Insert("m", prompt, cache.length(0), cache, 0);
    EXPECT_EQ(pc.stats().blocks, 4);  // 64 of 70 tokens: whole blocks only
    EXPECT_EQ(pc.Cached("m", prompt, 70), 64);
    EXPECT_EQ(pc.Cached("m", prompt, 63), 63);     // 3 blocks and 15 tokens of the fourth
    EXPECT_EQ(pc.Cached("other", prompt, 70), 0);  // keys never mix

    // Less than `min_tokens` matched: nothing restored, the slot stays empty.
    EXPECT_EQ(pc.Restore("m", prompt, 69, cache, 1, /*min_tokens=*/65), 0);
    EXPECT_EQ(cache.length(1), 0);
    // Another slot restores 64 tokens and prefills the other 6: its KV and logits match.
    ASSERT_EQ(pc.Restore("m", prompt, 69, cache, 1, /*min_tokens=*/64), 64);
    EXPECT_EQ(cache.length(1), 64);
    ExpectSameKV(cache, 0, cache, 1, 64);
    at::Tensor resumed = Prefill(engine, cache, 1, std::span(prompt).subspan(64));
    EXPECT_LT(MaxAbsDiff(resumed, full), 1e-4) << "kv dtype " << kv;
    EXPECT_EQ(resumed.argmax().item<int64_t>(), full.argmax().item<int64_t>());

    // A prompt that diverges inside its third block reuses two blocks and 8 tokens of the third,
    // continues like its own full prefill, and adds only its own blocks.
    auto other = prompt;
    other[40] = (other[40] + 1) % static_cast<int32_t>(m->config.vocab_size);
    EXPECT_EQ(pc.Cached("m", other, 70), 40);
    cache.Reset(2);
    ASSERT_EQ(pc.Restore("m", other, 69, cache, 2), 40);
    ExpectSameKV(cache, 0, cache, 2, 40);
    at::Tensor other_resumed = Prefill(engine, cache, 2, std::span(other).subspan(40));
    KVCache fresh = engine.NewCache(1);
    at::Tensor other_full = Prefill(engine, fresh, 0, other);
    EXPECT_LT(MaxAbsDiff(other_resumed, other_full), 1e-4) << "kv dtype " << kv;
    const int64_t inserted = pc.stats().inserted_blocks;
    pc.Insert("m", other, cache.length(2), cache, 2);
    EXPECT_EQ(pc.stats().inserted_blocks, inserted + 2);
    EXPECT_EQ(pc.Cached("m", other, 70), 64);
    EXPECT_EQ(pc.Cached("m", prompt, 70), 64);  // the first chain is intact
  }
}

TEST(PrefixCacheTest, RestoreNeedsAnEmptySlotOfTheSameLayout) {
  at::InferenceMode guard;
  auto m = std::make_shared<const Model>(TinyModel(3, 2));
  auto gqa = std::make_shared<const Model>(TinyModel(3, 1));  // fewer KV heads per layer
  Engine engine(m, {.max_len = 128}), other(gqa, {.max_len = 128});
  KVCache cache = engine.NewCache(2), other_cache = other.NewCache(1);
  PrefixCache pc({.block_tokens = 16});
  auto prompt = RandomTokens(40, m->config.vocab_size, 6);
  Prefill(engine, cache, 0, prompt);
  pc.Insert("m", prompt, 40, cache, 0);
  EXPECT_EQ(pc.Restore("m", prompt, 40, other_cache, 0), 0);
  EXPECT_EQ(other_cache.length(0), 0);
  EXPECT_EQ(pc.Restore("m", prompt, 40, cache, 0), 0);  // slot 0 is not empty
  // The same key stored from another layout replaces the old blocks.
  Prefill(other, other_cache, 0, prompt);
  pc.Insert("m", prompt, 40, other_cache, 0);
  EXPECT_EQ(pc.stats().blocks, 2);
  EXPECT_EQ(pc.Restore("m", prompt, 40, cache, 1), 0);
}

TEST(PrefixCacheTest, CapEvictsLeastRecentlyUsedLeaves) {
  at::InferenceMode guard;
  auto m = std::make_shared<const Model>(TinyModel(3, 2));
  Engine engine(m, {.max_len = 256});
  KVCache cache = engine.NewCache(1);
  auto a = RandomTokens(80, m->config.vocab_size, 1), b = RandomTokens(48, m->config.vocab_size, 2);
  Prefill(engine, cache, 0, a);
  PrefixCache probe({.block_tokens = 16});
  probe.Insert("m", a, 16, cache, 0);
  const int64_t block = probe.stats().bytes;
  ASSERT_GT(block, 0);

  PrefixCache pc({.block_tokens = 16, .max_bytes = 3 * block});
  pc.Insert("m", a, 80, cache, 0);  // five blocks, three fit: the chain's first three
  EXPECT_EQ(pc.stats().blocks, 3);
  EXPECT_EQ(pc.Cached("m", a, 80), 48);
  EXPECT_LE(pc.stats().bytes, 3 * block);
  cache.Reset(0);
  Prefill(engine, cache, 0, b);
  pc.Insert("m", b, 48, cache, 0);  // needs three: a's chain goes leaf first
  EXPECT_EQ(pc.stats().blocks, 3);
  EXPECT_EQ(pc.stats().evicted_blocks, 3);
  EXPECT_EQ(pc.Cached("m", b, 48), 48);
  EXPECT_EQ(pc.Cached("m", a, 80), 0);
  EXPECT_LE(pc.stats().bytes, 3 * block);

  PrefixCache off({.block_tokens = 16, .max_bytes = 0});
  off.Insert("m", b, 48, cache, 0);
  EXPECT_EQ(off.stats().blocks, 0);
}

TEST(PrefixCacheTest, SavedCacheLoadsBackAndBadFilesAreRefused) {
  at::InferenceMode guard;
  auto m = std::make_shared<const Model>(TinyModel(3, 2));
  Engine engine(m, {.max_len = 128, .kv_dtype = at::kHalf});
  KVCache cache = engine.NewCache(2);
  auto prompt = RandomTokens(50, m->config.vocab_size, 3);
  Prefill(engine, cache, 0, prompt);
  PrefixCache pc({.block_tokens = 16});
  pc.Insert("m", prompt, 50, cache, 0);
  const std::string dir = ::testing::TempDir() + "/prefix_cache_" + std::to_string(getpid());
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/m.cache";
  ASSERT_TRUE(pc.Save("m", path).ok());

  PrefixCache loaded({.block_tokens = 16});
  ASSERT_TRUE(loaded.Load("m", path, cache).ok());
  EXPECT_EQ(loaded.stats().blocks, 3);
  ASSERT_EQ(loaded.Restore("m", prompt, 49, cache, 1), 48);
  ExpectSameKV(cache, 0, cache, 1, 48);

  // Another block size, another layout, a truncated file: clear errors, nothing loaded.
  PrefixCache other_blocks({.block_tokens = 32});
  EXPECT_EQ(other_blocks.Load("m", path, cache).code(), absl::StatusCode::kFailedPrecondition);
  Engine f32(m, {.max_len = 128});
  KVCache f32_cache = f32.NewCache(1);
  PrefixCache wrong_layout({.block_tokens = 16});
  EXPECT_EQ(wrong_layout.Load("m", path, f32_cache).code(), absl::StatusCode::kFailedPrecondition);
  auto bytes = testing::MustOk(ReadFile(path), "read");
  // A file of the head-major format before (01): refused by its format, not misread.
  std::string old_format = bytes;
  old_format[7] = '1';
  ASSERT_TRUE(WriteFileAtomic(path, old_format).ok());
  PrefixCache older({.block_tokens = 16});
  absl::Status old_st = older.Load("m", path, cache);
  EXPECT_EQ(old_st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(old_st.message().find("format 01"), std::string_view::npos) << old_st;
  EXPECT_EQ(older.stats().blocks, 0);
  ASSERT_TRUE(WriteFileAtomic(path, bytes.substr(0, bytes.size() - 100)).ok());
  PrefixCache truncated({.block_tokens = 16});
  absl::Status st = truncated.Load("m", path, cache);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("truncated"), std::string_view::npos) << st;
  ASSERT_TRUE(WriteFileAtomic(path, "not a cache").ok());
  EXPECT_EQ(truncated.Load("m", path, cache).code(), absl::StatusCode::kInvalidArgument);
  std::filesystem::remove_all(dir);
}

}  // namespace prefix_cache_test
}  // namespace amoeba
