// Equivalence tests of the inference engine against the plain-libtorch reference forward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "model/engine.h"
#include "model/kernels.h"
#include "model/packed_linear.h"
#include "model/quantized_panels.h"
#include "model/src/prefill_attention.h"
#include "model/src/stream_prefetch.h"
#include "model/step_profile.h"
#include "model/team.h"
#include "model/torch_forward.h"
#include "tests/test_util.h"

namespace amoeba {
namespace model_forward_test {  // named: a unity build joins test files
using testing::MaxAbsDiff;
using testing::RandomTokens;
using testing::TinyConfig;
using testing::TinyModel;

at::Tensor Reference(const Model& m, const std::vector<int32_t>& ids) {
  at::Tensor t = at::tensor(std::vector<int64_t>(ids.begin(), ids.end())).unsqueeze(0);
  return TorchForward(m, t)[0];  // [T, V]
}

TEST(EngineTest, PrefillMatchesReferenceForAllPositions) {
  at::InferenceMode guard;
  auto m = std::make_shared<const Model>(TinyModel());
  Engine engine(m, {.max_len = 64});
  KVCache cache = engine.NewCache(1);
  auto ids = RandomTokens(20, m->config.vocab_size, 7);
  SeqInput in{0, ids};
  auto logits = engine.Forward(cache, {&in, 1}, /*all_logits=*/true);
  ASSERT_TRUE(logits.ok()) << logits.status();
  at::Tensor ref = Reference(*m, ids);
  EXPECT_LT(MaxAbsDiff(*logits, ref), 1e-5);
  EXPECT_GT(ref.abs().max().item<double>(), 0.1);  // the comparison is not trivially small
}

// A prompt of several query blocks in one call, with GQA, in fp32 and fp16 KV: every position's
// logits equal the reference forward's, and continuing in chunks (p0 > 0) gives the same.
TEST(EngineTest, LongPrefillInBlocksMatchesReference) {
  at::InferenceMode guard;
  auto m = std::make_shared<const Model>(TinyModel(3, 2));
  auto ids = RandomTokens(3 * kPrefillQueryBlock + 11, m->config.vocab_size, 9);
  at::Tensor ref = Reference(*m, ids);
  for (at::ScalarType kv : {at::kFloat, at::kHalf}) {
    Engine engine(m, {.max_len = 512, .kv_dtype = kv});
    KVCache cache = engine.NewCache(2);
    SeqInput whole{0, ids};
    auto logits = engine.Forward(cache, {&whole, 1}, /*all_logits=*/true);
    ASSERT_TRUE(logits.ok()) << logits.status();
    const double tol = kv == at::kFloat ? 1e-4 : 2e-2;
    EXPECT_LT(MaxAbsDiff(*logits, ref), tol);
    // The same prompt as a 100-token chunk and then the rest (attending to the cached 100).
    const size_t cut = 100;
    std::vector<int32_t> first(ids.begin(), ids.begin() + cut), rest(ids.begin() + cut, ids.end());
    SeqInput a{1, first};
    ASSERT_TRUE(engine.Forward(cache, {&a, 1}).ok());
    SeqInput b{1, rest};
    auto tail = engine.Forward(cache, {&b, 1}, /*all_logits=*/true);
    ASSERT_TRUE(tail.ok()) << tail.status();
    EXPECT_LT(MaxAbsDiff(*tail, ref.narrow(0, cut, ids.size() - cut)), tol);
  }
}

TEST(EngineTest, KvCacheDecodeMatchesFullForward) {
  at::InferenceMode guard;
  for (int64_t kv : {1, 2, 4}) {
    auto m = std::make_shared<const Model>(TinyModel(3, kv));
    Engine engine(m, {.max_len = 64});
    KVCache cache = engine.NewCache(2);
    auto ids = RandomTokens(24, m->config.vocab_size, 11);
    at::Tensor ref = Reference(*m, ids);
    // Prefill 5 tokens, then decode one at a time in slot 1.
    std::vector<int32_t> prompt(ids.begin(), ids.begin() + 5);
    SeqInput in{1, prompt};
    auto l = engine.Forward(cache, {&in, 1});
    ASSERT_TRUE(l.ok());
    EXPECT_LT(MaxAbsDiff((*l)[0], ref[4]), 1e-5) << "kv=" << kv;
    for (size_t t = 5; t < ids.size(); ++t) {
      SeqInput step{1, std::span<const int32_t>(&ids[t], 1)};
      auto d = engine.Forward(cache, {&step, 1});
      ASSERT_TRUE(d.ok());
      EXPECT_LT(MaxAbsDiff((*d)[0], ref[t]), 1e-5) << "kv=" << kv << " position " << t;
    }
    EXPECT_EQ(cache.length(1), 24);
    EXPECT_EQ(cache.length(0), 0);
  }
}

// Prefill attention with bf16 products (where a bf16 kernel runs; head dimension 64) keeps every
// position's logits within bf16's rounding of the fp32 reference, and the decode steps after it
// (fp32 attention over the cache it wrote) too; with the option off, prefill equals the
// reference at fp32's scale.
TEST(EngineTest, Bf16PrefillAttentionStaysWithinItsRoundingOfTheReference) {
  at::InferenceMode guard;
  ModelConfig c = testing::TinyConfig();
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  c.max_position_embeddings = 256;
  auto m = std::make_shared<const Model>(RandomModel(c, 9, 0.15));
  const bool bf16 = ActivePrefillBf16Kernel(64) != PrefillBf16Kernel::kNone;
  auto ids = RandomTokens(200, c.vocab_size, 13);
  at::Tensor ref = Reference(*m, ids);
  for (bool option : {true, false}) {
    Engine engine(m, {.max_len = 256, .bf16_prefill_attention = option});
    KVCache cache = engine.NewCache(1);
    std::vector<int32_t> prompt(ids.begin(), ids.begin() + 190);
    SeqInput in{0, prompt};
    auto l = engine.Forward(cache, {&in, 1}, /*all_logits=*/true);
    ASSERT_TRUE(l.ok());
    const double prefill = MaxAbsDiff(*l, ref.narrow(0, 0, 190));
    double decode = 0;
    for (size_t t = 190; t < ids.size(); ++t) {
      SeqInput step{0, std::span<const int32_t>(&ids[t], 1)};
      auto d = engine.Forward(cache, {&step, 1});
      ASSERT_TRUE(d.ok());
      decode = std::max(decode, MaxAbsDiff((*d)[0], ref[t]));
    }
    const std::string what = std::string(option ? "bf16 option on, " : "off, ") +
                             PrefillBf16KernelName(ActivePrefillBf16Kernel(64));
    if (option && bf16) {
      EXPECT_LT(prefill, 0.05) << what;
      EXPECT_GT(prefill, 1e-5) << what << ": no bf16 rounding, did the bf16 kernel run?";
      EXPECT_LT(decode, 0.05) << what;
    } else {
      EXPECT_LT(prefill, 1e-4) << what;
      EXPECT_LT(decode, 1e-4) << what;
    }
  }
}

// A slot of 8 MB or more lives in an arena on 2 MB pages, one of 2-8 MB in an arena whose whole
// 2 MB ranges are: decoding across the growth from such arenas into one on 2 MB pages, and from
// that into a bigger one, keeps every cached position.
TEST(EngineTest, KvCacheGrowsIntoHugePageArenasAndDecodesAsTheFullForward) {
  at::InferenceMode guard;
  ModelConfig c = testing::TinyConfig();
  c.num_attention_heads = c.num_key_value_heads = 32;  // 48 KB of K/V per position
  c.head_dim = 64;
  c.max_position_embeddings = 600;
  auto m = std::make_shared<const Model>(RandomModel(c, 5, 0.15));
  // fp32 prefill attention: the cached positions must equal the reference's.
  Engine engine(m, {.max_len = 600, .bf16_prefill_attention = false});
  KVCache cache = engine.NewCache(1);
  const int64_t per_position = m->KvBytesPerPosition(4);
  ASSERT_LT(per_position * 128, static_cast<int64_t>(KVCache::kHugePageMinBytes));
  ASSERT_GE(per_position * 256, static_cast<int64_t>(KVCache::kHugePageMinBytes));
  ASSERT_GE(per_position * 64, static_cast<int64_t>(KVCache::kMostlyHugePageMinBytes));
  auto ids = RandomTokens(300, c.vocab_size, 12);
  at::Tensor ref = Reference(*m, ids);
  std::vector<int32_t> prompt(ids.begin(), ids.begin() + 40);
  SeqInput in{0, prompt};
  ASSERT_TRUE(engine.Forward(cache, {&in, 1}).ok());
  for (size_t t = 40; t < ids.size(); ++t) {
    SeqInput step{0, std::span<const int32_t>(&ids[t], 1)};
    auto d = engine.Forward(cache, {&step, 1});
    ASSERT_TRUE(d.ok());
    EXPECT_LT(MaxAbsDiff((*d)[0], ref[t]), 1e-4) << "position " << t;
  }
  EXPECT_EQ(cache.capacity(0), 512);  // 64 -> 128 -> 256 (arena) -> 512 (arena)
  EXPECT_EQ(cache.bytes(), per_position * 512);
}

// Freed slot memory is pooled: the next slot of the same size takes it (no fresh pages), what the
// freed slot held never shows in what the next sequence reads, and the pool keeps to its limit.
TEST(EngineTest, KvCacheReusesFreedSlotMemory) {
  at::InferenceMode guard;
  KVCache::ReleasePooledArenas();
  auto m = std::make_shared<const Model>(TinyModel(8));
  Engine engine(m, {.max_len = 64});
  KVCache cache = engine.NewCache(2);
  const auto ids = RandomTokens(20, m->config.vocab_size, 51);
  SeqInput first{0, ids};
  ASSERT_TRUE(engine.Forward(cache, {&first, 1}).ok());
  const void* arena = cache.k(0, 0).data_ptr();
  for (int64_t l = 0; l < cache.num_layers(); ++l) {  // poison what the next sequence must not see
    cache.k(l, 0).fill_(std::numeric_limits<float>::quiet_NaN());
    cache.v(l, 0).fill_(std::numeric_limits<float>::quiet_NaN());
  }
  const int64_t held = cache.bytes();
  EXPECT_EQ(KVCache::PooledArenaBytes(), 0);
  cache.Reset(0);
  EXPECT_GE(KVCache::PooledArenaBytes(), held);
  std::vector<int32_t> prompt(ids.begin(), ids.begin() + 12);
  SeqInput second{1, prompt};
  auto got = engine.Forward(cache, {&second, 1}, /*all_logits=*/true);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(cache.k(0, 1).data_ptr(), arena) << "the freed arena, reused";
  EXPECT_EQ(KVCache::PooledArenaBytes(), 0);
  EXPECT_LT(MaxAbsDiff(*got, Reference(*m, prompt)), 1e-4);
  const at::Tensor ref = Reference(*m, ids);
  for (size_t t = 12; t < ids.size(); ++t) {  // decode over the reused memory
    SeqInput step{1, std::span<const int32_t>(&ids[t], 1)};
    auto d = engine.Forward(cache, {&step, 1});
    ASSERT_TRUE(d.ok());
    EXPECT_LT(MaxAbsDiff((*d)[0], ref[t]), 1e-4) << "position " << t;
  }
  KVCache::SetArenaPoolLimit(0);  // nothing kept: freed memory goes back at once
  cache.Reset(1);
  EXPECT_EQ(KVCache::PooledArenaBytes(), 0);
  KVCache::SetArenaPoolLimit(KVCache::kDefaultArenaPoolBytes);
}

// Releasing the pool down to a budget (a server going idle) frees the largest arenas first and
// keeps the smaller ones for the next sequences.
TEST(EngineTest, KvArenaPoolReleasesLargestArenasFirst) {
  at::InferenceMode guard;
  KVCache::ReleasePooledArenas();
  auto m = std::make_shared<const Model>(TinyModel(8));
  Engine engine(m, {.max_len = 512});
  KVCache cache = engine.NewCache(2);
  const auto ids = RandomTokens(200, m->config.vocab_size, 52);
  SeqInput small{0, std::span<const int32_t>(ids.data(), 10)};
  SeqInput large{1, ids};
  ASSERT_TRUE(engine.Forward(cache, {&small, 1}).ok());
  ASSERT_TRUE(engine.Forward(cache, {&large, 1}).ok());
  ASSERT_GT(cache.capacity(1), cache.capacity(0));
  cache.Reset(0);
  const int64_t small_pooled = KVCache::PooledArenaBytes();
  ASSERT_GT(small_pooled, 0);
  cache.Reset(1);
  const int64_t all_pooled = KVCache::PooledArenaBytes();
  ASSERT_GT(all_pooled, small_pooled);
  // A budget that holds the small slot's arena and not the large one's.
  KVCache::ReleasePooledArenas(static_cast<size_t>(small_pooled));
  EXPECT_EQ(KVCache::PooledArenaBytes(), small_pooled) << "the small arena was not the one kept";
  KVCache::ReleasePooledArenas(static_cast<size_t>(small_pooled) - 1);
  EXPECT_EQ(KVCache::PooledArenaBytes(), 0);
}

// A decode step in one parallel region (the kernels split by a team, serial pieces between spin
// barriers) gives the same bits as one region per kernel: every format and ISA, with biases,
// decode steps next to a 5-token check in one call, and pure decode steps.
// Batch-1 decode steps of a model too large for the cache decide the prefetch trial for its
// format (stream_prefetch.h); multi-token steps and a model that fits in the cache do not take
// part, and the logits do not depend on the arm.
TEST(EngineTest, BatchOneDecodeStepsOfALargeModelRunThePrefetchTrial) {
  at::InferenceMode guard;
  ModelConfig big = TinyConfig();
  big.hidden_size = 512;
  big.intermediate_size = 1536;
  big.num_hidden_layers = 4;
  big.num_attention_heads = 8;
  big.num_key_value_heads = 4;
  big.head_dim = 64;
  big.vocab_size = 4000;  // ~15.6M parameters: 62 MB of f32 panels
  Model m = RandomModel(big, 3);
  PackWeights(m, WeightFormat::kF32);
  auto model = std::make_shared<const Model>(std::move(m));
  Model small = TinyModel(4);
  PackWeights(small, WeightFormat::kQ8_0);
  auto tiny = std::make_shared<const Model>(std::move(small));
  const int key = PrefetchTrialKey(WeightFormat::kF32, size_t{62} << 20);
  const int tiny_key = PrefetchTrialKey(WeightFormat::kQ8_0, size_t{62} << 20);
  ResetPrefetchTrial(key);
  ResetPrefetchTrial(tiny_key);
  Engine e(model, {.max_len = 96}), reference(model, {.max_len = 96}), t(tiny, {.max_len = 96});
  KVCache c = e.NewCache(2), rc = reference.NewCache(2), tc = t.NewCache(1);
  const auto prompt = RandomTokens(8, 4000, 5);
  for (int slot = 0; slot < 2; ++slot) {
    SeqInput p{slot, prompt};
    ASSERT_TRUE(e.Forward(c, {&p, 1}).ok());
  }
  const auto tiny_prompt = RandomTokens(8, 97, 5);
  SeqInput tp{0, tiny_prompt};
  ForceStreamPrefetch(StreamPrefetch::kFar);
  for (int slot = 0; slot < 2; ++slot) {
    SeqInput p{slot, prompt};
    ASSERT_TRUE(reference.Forward(rc, {&p, 1}).ok());
  }
  ForceStreamPrefetch(StreamPrefetch::kAuto);
  ASSERT_TRUE(t.Forward(tc, {&tp, 1}).ok());
  for (int step = 0; step < 2 * kPrefetchTrialSteps + 2; ++step) {
    const int32_t a = 11 + step, b = 17 + step;
    SeqInput two[2] = {{0, {&a, 1}}, {1, {&b, 1}}};
    if (step < 4) {  // two sequences: not batch 1
      ASSERT_TRUE(e.Forward(c, two).ok());
      ASSERT_TRUE(reference.Forward(rc, two).ok());
      EXPECT_EQ(PrefetchTrialChoice(key), -1);
      continue;
    }
    // Batch 1 with the other slot idle: each call is a trial step.
    const at::Tensor got = e.Forward(c, {&two[0], 1}).value().clone();
    ASSERT_TRUE(e.Forward(c, {&two[1], 1}).ok());
    ForceStreamPrefetch(StreamPrefetch::kFar);
    SeqInput r{0, {&a, 1}};
    const at::Tensor want = reference.Forward(rc, {&r, 1}).value();
    ForceStreamPrefetch(StreamPrefetch::kAuto);
    EXPECT_EQ(MaxAbsDiff(got, want), 0.0) << "step " << step;
    for (int32_t token : {a, b}) {  // as many batch-1 steps as `e` takes
      SeqInput ts{0, {&token, 1}};
      ASSERT_TRUE(t.Forward(tc, {&ts, 1}).ok());
    }
  }
  EXPECT_GE(PrefetchTrialChoice(key), 0) << "the trial decided";
  EXPECT_EQ(PrefetchTrialChoice(tiny_key), -1) << "a model in the cache stays out";
  ResetPrefetchTrial(key);
}

TEST(EngineTest, OneRegionDecodeGivesTheSameBitsAsARegionPerKernel) {
  at::InferenceMode guard;
  const int threads = at::get_num_threads();
  at::set_num_threads(std::max(threads, 2));  // a team of at least two, whatever the CPU count
  const auto prompt = RandomTokens(12, 97, 31), drafted = RandomTokens(5, 97, 32);
  std::vector<KernelIsa> isas = {KernelIsa::kScalar};
  if (CpuHasAvx2Fma()) isas.push_back(KernelIsa::kAvx2);
  if (CpuHasAvx512()) isas.push_back(KernelIsa::kAvx512);
  for (KernelIsa isa : isas)
    for (WeightFormat format :
         {WeightFormat::kF32, WeightFormat::kF16, WeightFormat::kQ8_0, WeightFormat::kQ4_0}) {
      ForceKernelIsa(isa);
      Model base = TinyModel(8);
      for (LayerWeights& l : base.layers) {  // compensation biases, as a sliced subnet has
        l.o_bias = 0.1 * at::randn({base.config.hidden_size});
        l.down_bias = 0.1 * at::randn({base.config.hidden_size});
        l.q_bias = 0.1 * at::randn({l.q.size(0)});
      }
      PackWeights(base, format);
      auto m = std::make_shared<const Model>(std::move(base));
      Engine one(m, {.max_len = 64}), many(m, {.max_len = 64, .one_region_decode = false});
      const std::string what = std::string(KernelIsaName(isa)) + " " + WeightFormatName(format);
      KVCache c1 = one.NewCache(3), c2 = many.NewCache(3);
      for (int slot = 0; slot < 3; ++slot) {
        SeqInput p{slot, prompt};
        ASSERT_TRUE(one.Forward(c1, {&p, 1}).ok());
        ASSERT_TRUE(many.Forward(c2, {&p, 1}).ok());
      }
      for (int step = 0; step < 3; ++step) {
        const int32_t a = 5 + step, b = 40 + step;
        SeqInput seqs[3] = {{0, {&a, 1}}, {1, drafted, /*all_logits=*/true}, {2, {&b, 1}}};
        const int64_t runs = TeamRuns();
        const at::Tensor want = many.Forward(c2, seqs).value().clone();
        EXPECT_EQ(TeamRuns(), runs);
        auto got = one.Forward(c1, seqs);
        ASSERT_TRUE(got.ok());
        EXPECT_EQ(TeamRuns(), runs + 1) << "the step ran as one team";
        ASSERT_EQ(got->size(0), 7);
        EXPECT_EQ(MaxAbsDiff(*got, want), 0.0) << what << " step " << step;
        c1.set_length(1, c1.length(1) - 5);  // the check's tokens again next step
        c2.set_length(1, c2.length(1) - 5);
        // A pure decode step (one token each: RoPE and the append run in attention's tasks).
        SeqInput steps[3] = {{0, {&b, 1}}, {1, {&a, 1}}, {2, {&a, 1}}};
        const at::Tensor want_step = many.Forward(c2, steps).value().clone();
        auto got_step = one.Forward(c1, steps);
        ASSERT_TRUE(got_step.ok());
        EXPECT_EQ(TeamRuns(), runs + 2);
        EXPECT_EQ(MaxAbsDiff(*got_step, want_step), 0.0) << what << " decode step " << step;
      }
    }
  ForceKernelIsa(KernelIsa::kAuto);
  at::set_num_threads(threads);
}

// A decode step of many sequences in a team: the members quantize a share of the activation
// rows each into one buffer (instead of every member quantizing every row), and the logits stay
// bit for bit those of a region per kernel, for every quantized kernel this CPU has (AMX takes 16
// rows at a time: 17 sequences leave it a remainder). Consecutive steps of 9 and 17 rows and the
// MLP's wider input grow the team's buffer in the middle of a pass.
TEST(EngineTest, WideDecodeStepsQuantizeSharesOfTheRowsAndGiveTheSameBits) {
  const int threads = at::get_num_threads();
  at::set_num_threads(std::max(threads, 2));
  constexpr int kSeqs = 17;
  for (QuantKernel kernel : AvailableQuantKernels())
    for (WeightFormat format : {WeightFormat::kQ8_0, WeightFormat::kQ4_0}) {
      ForceQuantKernel(kernel);
      Model base = TinyModel(9);
      PackWeights(base, format);
      auto m = std::make_shared<const Model>(std::move(base));
      Engine one(m, {.max_len = 32}), many(m, {.max_len = 32, .one_region_decode = false});
      const std::string what =
          std::string(QuantKernelName(kernel)) + " " + WeightFormatName(format);
      KVCache c1 = one.NewCache(kSeqs), c2 = many.NewCache(kSeqs);
      for (int slot = 0; slot < kSeqs; ++slot) {
        const auto prompt = RandomTokens(3 + slot % 4, 97, 50 + slot);
        SeqInput p{slot, prompt};
        ASSERT_TRUE(one.Forward(c1, {&p, 1}).ok());
        ASSERT_TRUE(many.Forward(c2, {&p, 1}).ok());
      }
      for (int step = 0; step < 3; ++step) {
        const int rows = step == 1 ? 9 : kSeqs;
        std::vector<int32_t> tokens(rows);
        std::vector<SeqInput> seqs;
        for (int r = 0; r < rows; ++r) {
          tokens[r] = (7 * r + step) % 97;
          seqs.push_back({r, {&tokens[r], 1}});
        }
        const at::Tensor want = many.Forward(c2, seqs).value().clone();
        const int64_t runs = TeamRuns();
        auto got = one.Forward(c1, seqs);
        ASSERT_TRUE(got.ok());
        EXPECT_EQ(TeamRuns(), runs + 1) << "the step ran as one team";
        ASSERT_EQ(got->size(0), rows);
        EXPECT_EQ(MaxAbsDiff(*got, want), 0.0) << what << " step " << step;
      }
    }
  ForceQuantKernel(QuantKernel::kAuto);
  at::set_num_threads(threads);
}

TEST(EngineTest, StepProfileSplitsTheTimeOfProfiledPassesOnly) {
  at::InferenceMode guard;
  const int threads = at::get_num_threads();
  at::set_num_threads(std::max(threads, 2));
  for (WeightFormat format : {WeightFormat::kF32, WeightFormat::kQ8_0}) {
    Model base = TinyModel(8);
    PackWeights(base, format);
    auto m = std::make_shared<const Model>(std::move(base));
    Engine e(m, {.max_len = 64});
    KVCache cache = e.NewCache(2);
    const auto prompt = RandomTokens(20, 97, 41);  // longer than token-by-token attention
    SeqInput p{0, prompt};
    StepProfile profile;
    {
      ScopedStepProfile attach(&profile);
      const auto t0 = std::chrono::steady_clock::now();
      ASSERT_TRUE(e.Forward(cache, {&p, 1}).ok());  // a prefill: not one team
      const int32_t a = 3, b = 4;
      SeqInput steps[2] = {{0, {&a, 1}}, {1, {&b, 1}}};
      const int64_t runs = TeamRuns();
      ASSERT_TRUE(e.Forward(cache, steps).ok());  // a decode step, as one team
      const int64_t wall_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                  std::chrono::steady_clock::now() - t0)
                                  .count();
      EXPECT_EQ(TeamRuns(), runs + 1);
      EXPECT_LE(profile.total_ns(), wall_ns);  // phases inside the passes, each counted once
    }
    EXPECT_EQ(profile.passes, 2);
    EXPECT_EQ(profile.rows, 22);
    EXPECT_GE(profile.pass_ns, profile.total_ns());
    for (StepPhase ph : {StepPhase::kEmbed, StepPhase::kNorm, StepPhase::kQkv, StepPhase::kRope,
                         StepPhase::kAttention, StepPhase::kO, StepPhase::kGateUp, StepPhase::kDown,
                         StepPhase::kHead})
      EXPECT_GT(profile.ns[static_cast<int>(ph)], 0) << StepPhaseName(ph);
    if (format == WeightFormat::kQ8_0) {
      EXPECT_GT(profile.quantize_ns, 0);
      EXPECT_LT(profile.quantize_ns, profile.total_ns());
    } else {
      EXPECT_EQ(profile.quantize_ns, 0);
    }
    // Detached: a pass records nothing.
    const StepProfile before = profile;
    const int32_t c = 5;
    SeqInput one{0, {&c, 1}};
    ASSERT_TRUE(e.Forward(cache, {&one, 1}).ok());
    EXPECT_EQ(profile.passes, before.passes);
    EXPECT_EQ(profile.total_ns(), before.total_ns());
  }
  at::set_num_threads(threads);
}

TEST(EngineTest, BatchOfDifferentLengthsMatchesEachAlone) {
  at::InferenceMode guard;
  auto m = std::make_shared<const Model>(TinyModel(5));
  Engine engine(m, {.max_len = 64});
  std::vector<std::vector<int32_t>> prompts = {RandomTokens(3, 97, 1), RandomTokens(11, 97, 2),
                                               RandomTokens(1, 97, 3), RandomTokens(7, 97, 4)};
  KVCache batch_cache = engine.NewCache(4);
  std::vector<SeqInput> batch;
  for (size_t i = 0; i < prompts.size(); ++i)
    batch.push_back({static_cast<int64_t>(i), prompts[i]});
  auto bl = engine.Forward(batch_cache, batch);
  ASSERT_TRUE(bl.ok());
  at::Tensor batched = bl->clone();
  for (size_t i = 0; i < prompts.size(); ++i) {
    KVCache c = engine.NewCache(1);
    SeqInput in{0, prompts[i]};
    auto l = engine.Forward(c, {&in, 1});
    ASSERT_TRUE(l.ok());
    EXPECT_LT(MaxAbsDiff(batched[i], (*l)[0]), 1e-5) << "prompt " << i;
  }
  // Then a batched decode step (all single tokens: the skinny-GEMM path) against the reference.
  std::vector<int32_t> next = {5, 6, 7, 8};
  std::vector<SeqInput> step;
  for (size_t i = 0; i < prompts.size(); ++i)
    step.push_back({static_cast<int64_t>(i), {&next[i], 1}});
  auto sl = engine.Forward(batch_cache, step);
  ASSERT_TRUE(sl.ok());
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto full = prompts[i];
    full.push_back(next[i]);
    at::Tensor ref = Reference(*m, full);
    EXPECT_LT(MaxAbsDiff((*sl)[i], ref[-1]), 1e-5) << "prompt " << i;
  }
}

TEST(EngineTest, MixedPrefillAndDecodeInOneCall) {
  at::InferenceMode guard;
  auto m = std::make_shared<const Model>(TinyModel(9));
  Engine engine(m, {.max_len = 64});
  KVCache cache = engine.NewCache(2);
  auto a = RandomTokens(6, 97, 21), b = RandomTokens(9, 97, 22);
  SeqInput first{0, std::span<const int32_t>(a.data(), 5)};
  ASSERT_TRUE(engine.Forward(cache, {&first, 1}).ok());
  std::vector<SeqInput> mixed = {{0, std::span<const int32_t>(&a[5], 1)}, {1, b}};
  auto l = engine.Forward(cache, mixed);
  ASSERT_TRUE(l.ok());
  EXPECT_LT(MaxAbsDiff((*l)[0], Reference(*m, a)[-1]), 1e-5);
  EXPECT_LT(MaxAbsDiff((*l)[1], Reference(*m, b)[-1]), 1e-5);
}

// The libtorch-linear baseline (row-major weights, at::linear) against Amoeba's kernels, on a
// model without panels (row-major kernels) and with them (the default path).
// Checking k drafted tokens in one call must give, row for row, the logits of decoding them one
// at a time: the same bits (short runs attend token by token; panel and delta kernels compute each
// row alone), whatever else shares the call (a prefill chunk, a decode step), and a cache rolled
// back past rejected tokens decodes on exactly as if they had never been fed.
TEST(EngineTest, CheckedRowsEqualTokenByTokenDecodeBitForBit) {
  at::InferenceMode guard;
  const auto prompt = RandomTokens(20, 97, 21), other = RandomTokens(19, 97, 22);
  const auto drafted = RandomTokens(5, 97, 23);
  const int32_t after = 42;
  // Every ISA; under AVX2 also the maddubs kernel where the CPU would take AVX-VNNI (the
  // quantized kernel is otherwise the ISA's choice).
  std::vector<std::pair<KernelIsa, QuantKernel>> paths = {{KernelIsa::kScalar, QuantKernel::kAuto}};
  if (CpuHasAvx2Fma()) paths.push_back({KernelIsa::kAvx2, QuantKernel::kAuto});
  if (CpuHasAvx2Fma() && ActiveQuantKernel() != QuantKernel::kAvx2)
    paths.push_back({KernelIsa::kAvx2, QuantKernel::kAvx2});
  // AVX-512's fp32/fp16 panel kernel splits a one-row sum four ways to hide FMA latency, so there
  // rows of different batch sizes agree to rounding only; its quantized kernels are exact.
  if (CpuHasAvx512()) paths.push_back({KernelIsa::kAvx512, QuantKernel::kAuto});
  for (auto [isa, quant_kernel] : paths)
    for (WeightFormat format :
         {WeightFormat::kF32, WeightFormat::kF16, WeightFormat::kQ8_0, WeightFormat::kQ4_0})
      for (bool deltas : {false, true}) {
        if (quant_kernel != QuantKernel::kAuto && !IsQuantized(format)) continue;
        ForceKernelIsa(isa);
        ForceQuantKernel(quant_kernel);
        Model base = TinyModel(7);
        if (deltas) {  // low-rank deltas (unmerged adapters) on two projections
          for (LayerWeights& l : base.layers)
            for (Proj p : {Proj::kQ, Proj::kDown}) {
              const at::Tensor& w = l.proj(p);
              LowRankDelta d;
              d.downs = {0.2 * at::randn({4, w.size(1)}), 0.2 * at::randn({4, w.size(1)})};
              d.down_weights = {0.7f, 0.3f};
              d.ups = {0.2 * at::randn({w.size(0), 4})};
              d.up_weights = {1.0f};
              l.deltas[static_cast<int>(p)] = d;
            }
        }
        PackWeights(base, format);
        Engine e(std::make_shared<const Model>(std::move(base)), {.max_len = 64});
        const std::string what = std::string(KernelIsaName(isa)) + " " + WeightFormatName(format) +
                                 (IsQuantized(format) ? std::string(" ") + QuantKernelName() : "") +
                                 (deltas ? " deltas" : "");
        // Token by token in slot 0 of one cache.
        KVCache one = e.NewCache(1);
        SeqInput p{0, prompt};
        ASSERT_TRUE(e.Forward(one, {&p, 1}).ok());
        std::vector<at::Tensor> ref;
        for (const int32_t& t : drafted) {
          SeqInput s{0, {&t, 1}};
          ref.push_back(e.Forward(one, {&s, 1}).value().clone());
        }
        // All five in one call, next to a prefill chunk (slot 1) and a decode step (slot 2).
        KVCache many = e.NewCache(3);
        SeqInput q[2] = {{0, prompt}, {2, other}};
        ASSERT_TRUE(e.Forward(many, q).ok());
        const int32_t step = 7;
        SeqInput mixed[3] = {{1, other}, {0, drafted, /*all_logits=*/true}, {2, {&step, 1}}};
        auto rows = e.Forward(many, mixed);
        ASSERT_TRUE(rows.ok());
        ASSERT_EQ(rows->size(0), 1 + 5 + 1);
        const double tol = isa == KernelIsa::kAvx512 && !IsQuantized(format) ? 1e-5 : 0.0;
        for (int i = 0; i < 5; ++i)
          EXPECT_LE(MaxAbsDiff((*rows)[1 + i], ref[i][0]), tol) << what << " row " << i;
        // Keep two of the five, roll back, decode on: as if only those two had been fed.
        many.set_length(0, static_cast<int64_t>(prompt.size()) + 2);
        KVCache two = e.NewCache(1);
        ASSERT_TRUE(e.Forward(two, {&p, 1}).ok());
        SeqInput kept{0, std::span<const int32_t>(drafted.data(), 2)};
        ASSERT_TRUE(e.Forward(two, {&kept, 1}).ok());
        SeqInput next{0, {&after, 1}};
        const at::Tensor expect = e.Forward(two, {&next, 1}).value().clone();
        auto got = e.Forward(many, {&next, 1});
        ASSERT_TRUE(got.ok());
        EXPECT_LE(MaxAbsDiff(*got, expect), tol) << what << " after rollback";
      }
  ForceKernelIsa(KernelIsa::kAuto);
  ForceQuantKernel(QuantKernel::kAuto);
}

TEST(EngineTest, BaselineLinearPathMatchesKernels) {
  at::InferenceMode guard;
  Model packed = TinyModel(4);
  PackWeights(packed);
  for (auto m : {std::make_shared<const Model>(TinyModel(4)),
                 std::make_shared<const Model>(std::move(packed))}) {
    Engine fast(m, {.max_len = 32});
    Engine base(m, {.max_len = 32, .linear_path = LinearPath::kTorch});
    auto ids = RandomTokens(9, 97, 5);
    KVCache c1 = fast.NewCache(1), c2 = base.NewCache(1);
    for (size_t t = 0; t < ids.size(); ++t) {
      SeqInput in{0, std::span<const int32_t>(&ids[t], 1)};
      auto a = fast.Forward(c1, {&in, 1});
      ASSERT_TRUE(a.ok());
      const at::Tensor got = a->clone();
      auto b = base.Forward(c2, {&in, 1});
      ASSERT_TRUE(b.ok());
      EXPECT_LT(MaxAbsDiff(got, *b), 1e-4) << (m->head_panels.defined() ? "packed" : "row-major");
    }
  }
}

// Prefill, then batched decode (4 sequences: 4 rows per step) on `b` equals `a` step by step.
void ExpectSameDecode(const std::shared_ptr<const Model>& a, const std::shared_ptr<const Model>& b,
                      double tol) {
  Engine ea(a, {.max_len = 32}), eb(b, {.max_len = 32});
  KVCache c1 = ea.NewCache(4), c2 = eb.NewCache(4);
  std::vector<std::vector<int32_t>> ids;
  for (int s = 0; s < 4; ++s) ids.push_back(RandomTokens(12, 97, 20 + s));
  std::vector<SeqInput> prompts;
  for (int s = 0; s < 4; ++s) prompts.push_back({s, std::span<const int32_t>(ids[s]).first(4)});
  for (size_t t = 4; t <= 12; ++t) {
    std::vector<SeqInput> in = prompts;
    if (t > 4) {
      in.clear();
      for (int s = 0; s < 4; ++s) in.push_back({s, std::span<const int32_t>(&ids[s][t - 1], 1)});
    }
    auto x = ea.Forward(c1, in);
    ASSERT_TRUE(x.ok());
    const at::Tensor ref = x->clone();
    auto y = eb.Forward(c2, in);
    ASSERT_TRUE(y.ok());
    EXPECT_LT(MaxAbsDiff(*y, ref), tol) << "step " << t;
  }
}

// The engine decodes from packed panels when the model has them: prefill and batched decode
// equal the row-major kernels, in fp32 and in fp16 (against the fp16 row-major weights), and a
// packed model whose row-major copies were dropped runs the same.
TEST(EngineTest, PackedPanelsMatchRowMajorWeights) {
  at::InferenceMode guard;
  Model base = TinyModel(4);
  Model p32 = base;
  PackWeights(p32);
  ASSERT_TRUE(p32.layers[0].panels[0].defined() && p32.head_panels.defined());
  ExpectSameDecode(std::make_shared<const Model>(base), std::make_shared<const Model>(p32), 1e-4);
  DropPackedRowMajor(p32);
  EXPECT_TRUE(p32.layers[0].q.is_meta());
  ExpectSameDecode(std::make_shared<const Model>(base), std::make_shared<const Model>(p32), 1e-4);
  Model p16 = base;
  PackWeights(p16, WeightFormat::kF16);
  Model rounded = ConvertWeights(base, at::kHalf);  // the fp16-rounded matrices...
  rounded.embed = base.embed;                       // ...with the fp32 embedding panels leave
  ExpectSameDecode(std::make_shared<const Model>(rounded), std::make_shared<const Model>(p16),
                   1e-4);
}

// Q8_0 / Q4_0 panels: activations are quantized per row, so a prompt run in one prefill call and
// the same tokens decoded one by one (and four sequences batched) give the same logits; and both
// stay close to the fp32 model, Q8_0 closer than Q4_0.
TEST(EngineTest, QuantizedPanelsDecodeLikePrefillAndTrackFp32) {
  at::InferenceMode guard;
  const Model base = TinyModel(6);
  auto ids = RandomTokens(12, 97, 8);
  at::Tensor exact = Reference(base, ids);
  const double scale = exact.abs().max().item<double>();
  double previous_err = 0;
  for (WeightFormat format : {WeightFormat::kQ8_0, WeightFormat::kQ4_0}) {
    Model q = base;
    PackWeights(q, format);
    ASSERT_EQ(PanelsFormat(q.layers[0].panels[0]), format);
    ASSERT_EQ(PanelsFormat(q.head_panels), format);
    auto m = std::make_shared<const Model>(std::move(q));
    Engine e(m, {.max_len = 32});
    KVCache whole = e.NewCache(1), steps = e.NewCache(1);
    SeqInput all{0, ids};
    auto prefill = e.Forward(whole, {&all, 1}, /*all_logits=*/true);
    ASSERT_TRUE(prefill.ok());
    const at::Tensor pre = prefill->clone();
    for (size_t t = 0; t < ids.size(); ++t) {
      SeqInput one{0, std::span<const int32_t>(&ids[t], 1)};
      auto y = e.Forward(steps, {&one, 1});
      ASSERT_TRUE(y.ok());
      EXPECT_LT(MaxAbsDiff((*y)[0], pre[t]), 1e-4 * scale) << WeightFormatName(format) << " " << t;
    }
    ExpectSameDecode(m, m, 1e-4 * scale);
    // Relative RMS error of the logits: a random 32-wide toy amplifies errors layer by layer (one
    // projection alone: ~0.75% for Q8_0, ~8.6% for Q4_0 on Gaussian weights).
    const double err = (pre - exact).norm().item<double>() / exact.norm().item<double>();
    EXPECT_GT(err, 0.0) << WeightFormatName(format);
    EXPECT_LT(err, format == WeightFormat::kQ8_0 ? 0.08 : 0.8) << WeightFormatName(format);
    EXPECT_GT(err, previous_err) << "q4_0 is coarser than q8_0";
    previous_err = err;
  }
}

// An fp16 KV cache: prefill and batched decode stay close to the fp32 cache (K/V rounded to
// half), and the cache holds half the bytes.
TEST(EngineTest, HalfKvCacheTracksTheFp32Cache) {
  at::InferenceMode guard;
  Model base = TinyModel(4);
  PackWeights(base);
  auto m = std::make_shared<const Model>(std::move(base));
  Engine e32(m, {.max_len = 32}), e16(m, {.max_len = 32, .kv_dtype = at::kHalf});
  KVCache c32 = e32.NewCache(4), c16 = e16.NewCache(4);
  EXPECT_EQ(c16.dtype(), at::kHalf);
  std::vector<std::vector<int32_t>> ids;
  for (int s = 0; s < 4; ++s) ids.push_back(RandomTokens(12, 97, 40 + s));
  for (size_t t = 4; t <= 12; ++t) {
    std::vector<SeqInput> in;
    for (int s = 0; s < 4; ++s)
      in.push_back(t == 4 ? SeqInput{s, std::span<const int32_t>(ids[s]).first(4)}
                          : SeqInput{s, std::span<const int32_t>(&ids[s][t - 1], 1)});
    auto a = e32.Forward(c32, in);
    ASSERT_TRUE(a.ok());
    const at::Tensor ref = a->clone();
    auto b = e16.Forward(c16, in);
    ASSERT_TRUE(b.ok());
    const double rel = MaxAbsDiff(*b, ref) / ref.abs().max().item<double>();
    EXPECT_LT(rel, 5e-3) << "step " << t;
    EXPECT_GT(rel, 0.0) << "step " << t;  // the half cache really is in use
  }
  EXPECT_EQ(c16.bytes() * 2, c32.bytes());
}

// A sliced subnet (fewer layers, prefix views) keeps the full model's panels and decodes from
// their prefixes: equal to the same subnet without panels.
TEST(EngineTest, SlicedViewsDecodeFromPrefixesOfTheFullPanels) {
  at::InferenceMode guard;
  Model full = TinyModel(4);
  PackWeights(full);
  Model sub = full.WithLayers({0, 2});
  const int64_t hd = full.config.head_dim;
  for (LayerWeights& l : sub.layers) {
    l.q = l.q.narrow(0, 0, 2 * hd);
    l.k = l.k.narrow(0, 0, hd);
    l.v = l.v.narrow(0, 0, hd);
    l.o = l.o.narrow(1, 0, 2 * hd);
    l.gate = l.gate.narrow(0, 0, 40);
    l.up = l.up.narrow(0, 0, 40);
    l.down = l.down.narrow(1, 0, 40);
  }
  sub.SyncConfigWithWeights();
  EXPECT_EQ(sub.layers[1].panels[0].data_ptr(), full.layers[2].panels[0].data_ptr());
  Model unpacked = sub;
  for (LayerWeights& l : unpacked.layers)
    for (at::Tensor& p : l.panels) p.reset();
  unpacked.head_panels.reset();
  ExpectSameDecode(std::make_shared<const Model>(unpacked), std::make_shared<const Model>(sub),
                   1e-4);
}

TEST(EngineTest, SubsetOfLayersAndNarrowWidthsRunAsAnOrdinaryModel) {
  at::InferenceMode guard;
  Model full = TinyModel(6);
  // Layers 0 and 2 only; layer 2 keeps one KV group (2 heads) and 40 channels; biases on o/down.
  Model sub = full.WithLayers({0, 2});
  auto& l = sub.layers[1];
  const int64_t hd = full.config.head_dim;
  l.q = l.q.narrow(0, 0, 2 * hd);
  l.k = l.k.narrow(0, 0, hd);
  l.v = l.v.narrow(0, 0, hd);
  l.o = l.o.narrow(1, 0, 2 * hd);  // a strided prefix view: no copy
  l.gate = l.gate.narrow(0, 0, 40);
  l.up = l.up.narrow(0, 0, 40);
  l.down = l.down.narrow(1, 0, 40);
  l.o_bias = 0.1 * at::randn({full.config.hidden_size});
  l.down_bias = 0.1 * at::randn({full.config.hidden_size});
  sub.SyncConfigWithWeights();
  EXPECT_EQ(sub.config.num_hidden_layers, 2);
  EXPECT_EQ(sub.config.layer_kv_heads, (std::vector<int64_t>{2, 1}));
  EXPECT_EQ(sub.config.layer_intermediate, (std::vector<int64_t>{96, 40}));
  EXPECT_EQ(l.o.data_ptr(), full.layers[2].o.data_ptr());  // shares the supernet's storage
  auto m = std::make_shared<const Model>(sub);
  Engine engine(m, {.max_len = 32});
  KVCache cache = engine.NewCache(1);
  auto ids = RandomTokens(10, 97, 8);
  SeqInput in{0, ids};
  auto logits = engine.Forward(cache, {&in, 1}, true);
  ASSERT_TRUE(logits.ok());
  EXPECT_LT(MaxAbsDiff(*logits, Reference(sub, ids)), 1e-5);
  // A layer with no attention heads and no channels at all still runs (bias only).
  Model empty = sub;
  auto& e = empty.layers[1];
  e.q = e.q.narrow(0, 0, 0);
  e.k = e.k.narrow(0, 0, 0);
  e.v = e.v.narrow(0, 0, 0);
  e.o = e.o.narrow(1, 0, 0);
  e.gate = e.gate.narrow(0, 0, 0);
  e.up = e.up.narrow(0, 0, 0);
  e.down = e.down.narrow(1, 0, 0);
  auto me = std::make_shared<const Model>(empty);
  Engine engine2(me, {.max_len = 32});
  KVCache c2 = engine2.NewCache(1);
  auto l2 = engine2.Forward(c2, {&in, 1}, true);
  ASSERT_TRUE(l2.ok()) << l2.status();
  EXPECT_LT(MaxAbsDiff(*l2, Reference(empty, ids)), 1e-5);
}

TEST(EngineTest, GqaEqualsMultiHeadWithRepeatedKeyValueHeads) {
  at::InferenceMode guard;
  Model gqa = TinyModel(12, /*kv_heads=*/2);
  // The same function as MHA: each KV head copied for its group of query heads.
  Model mha = gqa;
  mha.config.num_key_value_heads = 4;
  const int64_t hd = gqa.config.head_dim;
  for (auto& l : mha.layers) {
    l.k = l.k.view({2, 1, hd, -1}).expand({2, 2, hd, l.k.size(1)}).reshape({4 * hd, -1});
    l.v = l.v.view({2, 1, hd, -1}).expand({2, 2, hd, l.v.size(1)}).reshape({4 * hd, -1});
  }
  auto ids = RandomTokens(12, 97, 13);
  at::Tensor a = Reference(gqa, ids), b = Reference(mha, ids);
  EXPECT_LT(MaxAbsDiff(a, b), 1e-5);
  Engine e(std::make_shared<const Model>(gqa), {.max_len = 32});
  KVCache c = e.NewCache(1);
  SeqInput in{0, ids};
  auto l = e.Forward(c, {&in, 1}, true);
  ASSERT_TRUE(l.ok());
  EXPECT_LT(MaxAbsDiff(*l, b), 1e-5);
}

TEST(EngineTest, TiedHeadUsesTheEmbedding) {
  at::InferenceMode guard;
  Model m = TinyModel(2, 2, /*tie=*/true);
  EXPECT_EQ(m.lm_head.data_ptr(), m.embed.data_ptr());
  Engine e(std::make_shared<const Model>(m), {.max_len = 16});
  KVCache c = e.NewCache(1);
  auto ids = RandomTokens(4, 97, 2);
  SeqInput in{0, ids};
  auto l = e.Forward(c, {&in, 1}, true);
  ASSERT_TRUE(l.ok());
  EXPECT_LT(MaxAbsDiff(*l, Reference(m, ids)), 1e-5);
}

// One multiply-add per projection and head weight, in any format: the parameters less the
// embedding and the norms, and (q8_0: 34 bytes per 32 weights) the read bytes less the norms.
TEST(EngineTest, DecodeMultiplyAddsCountEveryProjectionWeightOnce) {
  at::InferenceMode guard;
  Model m = TinyModel(3);
  int64_t norms = m.final_norm.numel();
  for (const auto& l : m.layers) norms += l.attn_norm.numel() + l.mlp_norm.numel();
  const int64_t macs = m.DecodeMultiplyAdds();
  EXPECT_EQ(macs, m.config.ParameterCount() - m.embed.numel() - norms);
  PackWeights(m, WeightFormat::kQ8_0);
  DropPackedRowMajor(m);
  EXPECT_EQ(m.DecodeMultiplyAdds(), macs);
  EXPECT_EQ(m.DecodeWeightBytes(), macs / 32 * 34 + norms * 4);
  EXPECT_LT(m.WithLayers({0}).DecodeMultiplyAdds(), macs);
}

TEST(EngineTest, HalfWeightsMatchTheRoundedFp32Model) {
  at::InferenceMode guard;
  Model m = TinyModel(14);
  Model half = ConvertWeights(m, at::kHalf);
  EXPECT_EQ(half.layers[0].q.scalar_type(), at::kHalf);
  EXPECT_EQ(half.layers[0].attn_norm.scalar_type(), at::kFloat);
  EXPECT_LT(half.DecodeWeightBytes(), m.DecodeWeightBytes() * 0.55);
  Model rounded = ConvertWeights(half, at::kFloat);  // the fp16-rounded reference, fp32 compute
  Engine e(std::make_shared<const Model>(half), {.max_len = 32});
  KVCache c = e.NewCache(1);
  auto ids = RandomTokens(12, 97, 15);
  at::Tensor ref = Reference(rounded, ids);
  // Prefill (GEMM path) and decode (GEMV path).
  SeqInput in{0, std::span<const int32_t>(ids.data(), 6)};
  auto l = e.Forward(c, {&in, 1}, true);
  ASSERT_TRUE(l.ok());
  EXPECT_LT(MaxAbsDiff(*l, ref.narrow(0, 0, 6)), 1e-4);
  for (size_t t = 6; t < ids.size(); ++t) {
    SeqInput step{0, std::span<const int32_t>(&ids[t], 1)};
    auto d = e.Forward(c, {&step, 1});
    ASSERT_TRUE(d.ok());
    EXPECT_LT(MaxAbsDiff((*d)[0], ref[t]), 1e-4);
  }
}

TEST(EngineTest, BadInputsAreErrorsNotCrashes) {
  at::InferenceMode guard;
  auto m = std::make_shared<const Model>(TinyModel());
  Engine e(m, {.max_len = 8});
  KVCache c = e.NewCache(1);
  std::vector<int32_t> too_long(9, 1), bad_id = {1, 500}, ok = {1, 2};
  SeqInput a{0, too_long}, b{0, bad_id}, s{3, ok}, empty{0, {}};
  EXPECT_EQ(e.Forward(c, {&a, 1}).status().code(), absl::StatusCode::kOutOfRange);
  // A longer cache made elsewhere does not stretch the engine past its own max_len (its RoPE
  // tables and attention scratch).
  KVCache longer(*m, 1, 16);
  absl::Status past = e.Forward(longer, {&a, 1}).status();
  EXPECT_EQ(past.code(), absl::StatusCode::kOutOfRange) << past;
  EXPECT_NE(past.message().find("max_len 8"), std::string_view::npos) << past;
  EXPECT_EQ(e.Forward(c, {&b, 1}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(e.Forward(c, {&s, 1}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(e.Forward(c, {&empty, 1}).status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<SeqInput> twice = {{0, ok}, {0, ok}};
  EXPECT_EQ(e.Forward(c, twice).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c.length(0), 0);  // nothing was appended by the failed calls
}

TEST(TorchForwardTest, PaddingMaskMatchesUnpadded) {
  Model m = TinyModel(8);
  auto ids = RandomTokens(6, 97, 9);
  at::Tensor ref = Reference(m, ids);
  // Left-pad to 9 with token 0 and mask it out.
  std::vector<int64_t> padded = {0, 0, 0};
  for (int32_t t : ids) padded.push_back(t);
  at::Tensor tok = at::tensor(padded).unsqueeze(0);
  at::Tensor mask = at::tensor(std::vector<int64_t>{0, 0, 0, 1, 1, 1, 1, 1, 1}).unsqueeze(0);
  at::Tensor out =
      TorchForward(m, tok, {.linear = nullptr, .on_layer = nullptr, .attention_mask = mask})[0]
          .narrow(0, 3, 6);
  EXPECT_LT(MaxAbsDiff(out, ref), 1e-5);
}

TEST(TorchForwardTest, GradientsFlowToHookedProjections) {
  Model m = TinyModel(8);
  at::Tensor extra = at::zeros({m.config.hidden_size}).set_requires_grad(true);
  TorchForwardOptions opt;
  opt.linear = [&](int layer, Proj p, const at::Tensor& x, const at::Tensor& w,
                   const at::Tensor& b) {
    at::Tensor y = at::linear(x, w, b);
    if (p == Proj::kDown && layer == 1) y = y + extra;
    return y;
  };
  at::Tensor tok = at::tensor(std::vector<int64_t>{1, 2, 3, 4}).unsqueeze(0);
  TorchForward(m, tok, opt).sum().backward();
  ASSERT_TRUE(extra.grad().defined());
  EXPECT_GT(extra.grad().abs().sum().item<double>(), 0.0);
}

}  // namespace model_forward_test
}  // namespace amoeba
