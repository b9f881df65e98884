// Engine::ForwardShared against each model's own Forward: subnets of one supernet (views at
// per-layer prefixes, adapters unmerged) decoded together must give every shape the logits it
// gets alone, for every weight format and kernel path, through prefill chunks, decode steps and
// multi-token checks; and the shared pass must stream each shared panel once.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <memory>
#include <vector>

#include "model/engine.h"
#include "model/kernels.h"
#include "model/packed_linear.h"
#include "model/quantized_panels.h"
#include "model/step_profile.h"
#include "model/team.h"
#include "subnet/subnet_builder.h"
#include "tests/supernet_fixture.h"

namespace amoeba {
namespace shared_forward_test {  // named: a unity build joins test files
using testing::MakeTestAdapters;
using testing::MakeTestSupernet;
using testing::MaxAbsDiff;
using testing::RandomTokens;
using testing::TempDir;

struct Lane {
  Shape shape;
  std::vector<int64_t> keys;
  std::unique_ptr<Engine> alone, shared;
  KVCache alone_cache, shared_cache;
};

// Builds one lane per shape: two engines over the same views (one decodes alone, one shared),
// each with its own KV cache of `slots` slots. The shared engines share one workspace, as the
// server's lanes do.
std::vector<Lane> MakeLanes(const Supernet& s, const Smol* smol, const std::vector<Shape>& shapes,
                            int64_t slots, AdapterMode mode = AdapterMode::kUnmerged) {
  std::vector<Lane> lanes;
  auto workspace = std::make_shared<EngineWorkspace>();
  for (const Shape& sh : shapes) {
    auto m = BuildSubnet(s, smol, sh, {.adapters = mode, .uniform_width = false});
    EXPECT_TRUE(m.ok()) << m.status();
    if (!m.ok()) continue;
    auto model = std::make_shared<const Model>(std::move(*m));
    Lane l;
    l.shape = sh;
    for (int layer : s.spec().FindDepth(sh.depth)->layers) l.keys.push_back(layer);
    l.alone = std::make_unique<Engine>(model, EngineOptions{.max_len = 96});
    l.shared =
        std::make_unique<Engine>(model, EngineOptions{.max_len = 96, .workspace = workspace});
    l.alone_cache = l.alone->NewCache(slots);
    l.shared_cache = l.shared->NewCache(slots);
    lanes.push_back(std::move(l));
  }
  return lanes;
}

// Runs `steps` of each lane alone and all lanes shared, comparing logits. inputs[lane] are the
// lane's sequences for one step.
double CompareStep(std::vector<Lane>& lanes, const std::vector<std::vector<SeqInput>>& inputs,
                   SharedWorkspace& ws, SharedPassStats* stats = nullptr) {
  // Lanes without inputs this step sit it out.
  std::vector<size_t> used;
  std::vector<at::Tensor> alone;
  std::vector<SharedForwardGroup> groups;
  for (size_t i = 0; i < lanes.size(); ++i) {
    if (inputs[i].empty()) continue;
    used.push_back(i);
    auto l = lanes[i].alone->Forward(lanes[i].alone_cache, inputs[i]);
    EXPECT_TRUE(l.ok()) << l.status();
    alone.push_back(l->clone());
    groups.push_back({.engine = lanes[i].shared.get(),
                      .cache = &lanes[i].shared_cache,
                      .seqs = inputs[i],
                      .layer_keys = lanes[i].keys});
  }
  const absl::Status st = Engine::ForwardShared(groups, ws, stats);
  EXPECT_TRUE(st.ok()) << st;
  double worst = 0;
  for (size_t j = 0; j < used.size(); ++j) {
    const Lane& lane = lanes[used[j]];
    EXPECT_EQ(groups[j].logits.sizes(), alone[j].sizes()) << lane.shape.ToString();
    if (groups[j].logits.sizes() != alone[j].sizes()) return 1e9;
    const double d = MaxAbsDiff(groups[j].logits, alone[j]);
    // Relative to the logits' scale: exact for the kernels whose rows are independent.
    worst = std::max(worst, d / std::max(1.0, alone[j].abs().max().item<double>()));
    EXPECT_TRUE(at::equal(groups[j].logits.argmax(1), alone[j].argmax(1))) << lane.shape.ToString();
    for (const SeqInput& s : inputs[used[j]])
      EXPECT_EQ(lane.shared_cache.length(s.slot), lane.alone_cache.length(s.slot));
  }
  return worst;
}

// Every shape of a mixed batch through prefill (a long chunk, a short one), decode steps and a
// 4-token check: the largest relative logit difference against the shapes run alone.
double RunMixedBatch(const Supernet& s, const Smol* smol,
                     AdapterMode mode = AdapterMode::kUnmerged) {
  const std::vector<Shape> shapes = {
      s.FullShape(), {5, 0.75}, {4, 0.875}, s.SmallestShape(), {4, 0.625}};
  std::vector<Lane> lanes = MakeLanes(s, smol, shapes, 2, mode);
  SharedWorkspace ws;
  const int64_t vocab = s.base().config.vocab_size;
  double worst = 0;
  // Prompts: 24 tokens (prefill attention), 5 tokens (token by token), per lane two sequences
  // (one lane one).
  std::vector<std::vector<int32_t>> prompts;
  for (size_t i = 0; i < lanes.size(); ++i) {
    prompts.push_back(RandomTokens(24, vocab, 10 + i));
    prompts.push_back(RandomTokens(5, vocab, 40 + i));
  }
  std::vector<std::vector<SeqInput>> step(lanes.size());
  for (size_t i = 0; i < lanes.size(); ++i) {
    step[i].push_back({0, prompts[2 * i]});
    if (i != 2) step[i].push_back({1, prompts[2 * i + 1]});
  }
  worst = std::max(worst, CompareStep(lanes, step, ws));
  // Decode steps: each sequence feeds a token of its own.
  std::vector<int32_t> next(2 * lanes.size());
  for (int t = 0; t < 4; ++t) {
    for (size_t i = 0; i < lanes.size(); ++i) {
      step[i].clear();
      for (int64_t slot = 0; slot < (i == 2 ? 1 : 2); ++slot) {
        next[2 * i + slot] = static_cast<int32_t>((7 * t + 3 * i + slot) % vocab);
        step[i].push_back({slot, {&next[2 * i + slot], 1}});
      }
    }
    if (t == 1) step[3].clear();  // a shape whose sequences wait this step
    worst = std::max(worst, CompareStep(lanes, step, ws));
  }
  // A check of 4 tokens on lane 1, logits for each, next to single tokens elsewhere.
  const std::vector<int32_t> check = RandomTokens(4, vocab, 99);
  for (size_t i = 0; i < lanes.size(); ++i) {
    step[i].clear();
    step[i].push_back(
        {0, i == 1 ? std::span<const int32_t>(check) : std::span<const int32_t>(&next[2 * i], 1),
         /*all_logits=*/i == 1});
  }
  worst = std::max(worst, CompareStep(lanes, step, ws));
  return worst;
}

class SharedForwardTest : public ::testing::TestWithParam<WeightFormat> {};

TEST_P(SharedForwardTest, EveryShapeGetsItsOwnLogits) {
  // Two threads: panels-only passes then run as one team (model/team.h), as in the server.
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  TempDir dir;
  auto s = MakeTestSupernet(dir);
  s->PackBaseWeights(GetParam());
  auto smol = MakeTestAdapters(*s);
  at::InferenceMode guard;
  const bool quantized = IsQuantized(GetParam());
  // Every kernel path this machine has.
  std::vector<int> paths;
  if (quantized) {
    for (QuantKernel k : AvailableQuantKernels()) paths.push_back(static_cast<int>(k));
  } else {
    for (KernelIsa k : {KernelIsa::kScalar, KernelIsa::kAvx2, KernelIsa::kAvx512})
      if (static_cast<int>(k) <= static_cast<int>(ActiveKernelIsa()))
        paths.push_back(static_cast<int>(k));
  }
  for (int path : paths) {
    if (quantized) {
      ForceQuantKernel(static_cast<QuantKernel>(path));
    } else {
      ForceKernelIsa(static_cast<KernelIsa>(path));
    }
    SCOPED_TRACE(quantized ? QuantKernelName(static_cast<QuantKernel>(path))
                           : KernelIsaName(static_cast<KernelIsa>(path)));
    // Without adapters (untuned: panels only) and with them unmerged (their deltas packed as
    // panels too, by BuildSubnet): both in one parallel region.
    int64_t teams = TeamRuns();
    EXPECT_LT(RunMixedBatch(*s, nullptr), 1e-5);
    EXPECT_GT(TeamRuns(), teams) << "no shared decode step ran as one team";
    teams = TeamRuns();
    EXPECT_LT(RunMixedBatch(*s, smol.get()), 1e-5);
    EXPECT_GT(TeamRuns(), teams) << "no shared decode step with deltas ran as one team";
  }
  ForceQuantKernel(QuantKernel::kAuto);
  ForceKernelIsa(KernelIsa::kAuto);
  at::set_num_threads(threads);
}

INSTANTIATE_TEST_SUITE_P(Formats, SharedForwardTest,
                         ::testing::Values(WeightFormat::kF32, WeightFormat::kF16,
                                           WeightFormat::kQ8_0, WeightFormat::kQ4_0),
                         [](const auto& info) {
                           return std::string(WeightFormatName(info.param));
                         });

// Merged copies (their own panels) run in the same walk as views: each on its own storage.
TEST(SharedForwardMixTest, MergedCopiesAndViewsTogether) {
  TempDir dir;
  auto s = MakeTestSupernet(dir);
  s->PackBaseWeights(WeightFormat::kQ8_0);
  auto smol = MakeTestAdapters(*s);
  at::InferenceMode guard;
  const std::vector<Shape> shapes = {s->FullShape(), {4, 0.75}};
  std::vector<Lane> lanes = MakeLanes(*s, smol.get(), shapes, 1);
  std::vector<Lane> merged = MakeLanes(*s, smol.get(), {{4, 0.625}}, 1, AdapterMode::kMerged);
  lanes.push_back(std::move(merged[0]));
  SharedWorkspace ws;
  const std::vector<int32_t> prompt = RandomTokens(20, s->base().config.vocab_size, 3);
  std::vector<std::vector<SeqInput>> step(lanes.size(), {{0, prompt}});
  EXPECT_LT(CompareStep(lanes, step, ws), 1e-5);
}

// The point of the shared pass: panels serving several shapes are read once.
TEST(SharedForwardMixTest, StreamsSharedPanelsOnce) {
  TempDir dir;
  auto s = MakeTestSupernet(dir);
  s->PackBaseWeights(WeightFormat::kQ8_0);
  at::InferenceMode guard;
  const std::vector<Shape> shapes = {s->FullShape(), {5, 0.75}, {4, 0.625}, s->SmallestShape()};
  std::vector<Lane> lanes = MakeLanes(*s, nullptr, shapes, 1);
  SharedWorkspace ws;
  int32_t token = 5;
  std::vector<std::vector<SeqInput>> step(lanes.size(), {{0, {&token, 1}}});
  SharedPassStats stats;
  StepProfile profile;  // the four passes alone and the shared one
  {
    ScopedStepProfile attach(&profile);
    EXPECT_LT(CompareStep(lanes, step, ws, &stats), 1e-5);
  }
  EXPECT_EQ(stats.rows, 4);
  EXPECT_EQ(profile.passes, 5);
  EXPECT_EQ(profile.rows, 8);
  for (StepPhase ph : {StepPhase::kQkv, StepPhase::kAttention, StepPhase::kO, StepPhase::kGateUp,
                       StepPhase::kDown, StepPhase::kHead})
    EXPECT_GT(profile.ns[static_cast<int>(ph)], 0) << StepPhaseName(ph);
  EXPECT_GT(profile.quantize_ns, 0);
  // Read: the full shape's bytes (it covers every smaller one); alone: the four shapes' sum.
  const int64_t full = lanes[0].alone->model().DecodeWeightBytes();
  int64_t sum = 0;
  for (const Lane& l : lanes) sum += l.alone->model().DecodeWeightBytes();
  EXPECT_NEAR(static_cast<double>(stats.weight_bytes), static_cast<double>(full), 0.02 * full);
  EXPECT_NEAR(static_cast<double>(stats.weight_bytes_alone), static_cast<double>(sum), 0.02 * sum);
  EXPECT_LT(stats.weight_bytes, stats.weight_bytes_alone / 2);
}

TEST(SharedForwardMixTest, BadGroupsAreRefusedAndChangeNothing) {
  TempDir dir;
  auto s = MakeTestSupernet(dir);
  s->PackBaseWeights(WeightFormat::kF32);
  at::InferenceMode guard;
  std::vector<Lane> lanes = MakeLanes(*s, nullptr, {s->FullShape(), {4, 0.625}}, 1);
  SharedWorkspace ws;
  int32_t token = 5, bad = 100000;
  std::vector<SeqInput> ok_in = {{0, {&token, 1}}}, bad_in = {{0, {&bad, 1}}};
  std::vector<SharedForwardGroup> groups = {{.engine = lanes[0].shared.get(),
                                             .cache = &lanes[0].shared_cache,
                                             .seqs = ok_in,
                                             .layer_keys = lanes[0].keys},
                                            {.engine = lanes[1].shared.get(),
                                             .cache = &lanes[1].shared_cache,
                                             .seqs = bad_in,
                                             .layer_keys = lanes[1].keys}};
  absl::Status st = Engine::ForwardShared(groups, ws);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("group 1"), std::string_view::npos) << st;
  EXPECT_EQ(lanes[0].shared_cache.length(0), 0);
  // Keys that do not match the layers, or are not increasing.
  const std::vector<int64_t> short_keys = {0};
  groups[1] = {.engine = lanes[1].shared.get(),
               .cache = &lanes[1].shared_cache,
               .seqs = ok_in,
               .layer_keys = short_keys};
  EXPECT_EQ(Engine::ForwardShared(groups, ws).code(), absl::StatusCode::kInvalidArgument);
  std::vector<int64_t> reversed(lanes[1].keys.rbegin(), lanes[1].keys.rend());
  groups[1] = {.engine = lanes[1].shared.get(),
               .cache = &lanes[1].shared_cache,
               .seqs = ok_in,
               .layer_keys = reversed};
  EXPECT_EQ(Engine::ForwardShared(groups, ws).code(), absl::StatusCode::kInvalidArgument);
  // One cache in two groups.
  groups[1] = {.engine = lanes[0].shared.get(),
               .cache = &lanes[0].shared_cache,
               .seqs = ok_in,
               .layer_keys = lanes[0].keys};
  EXPECT_EQ(Engine::ForwardShared(groups, ws).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(lanes[0].shared_cache.length(0), 0);
}

}  // namespace shared_forward_test
}  // namespace amoeba
