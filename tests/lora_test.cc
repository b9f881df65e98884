// SMoL adapters and in-place distillation: merged == unmerged, deterministic inference gate,
// loss balancing, tuning lowers held-out loss, and resume == uninterrupted.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <numeric>

#include <nlohmann/json.hpp>

#include "distill/pretrain.h"
#include "distill/src/losses.h"
#include "distill/svg_plot.h"
#include "distill/train_loop.h"
#include "distill/tuner.h"
#include "lora/smol.h"
#include "model/engine.h"
#include "model/packed_linear.h"
#include "model/presets.h"
#include "model/team.h"
#include "model/torch_forward.h"
#include "subnet/calibrate.h"
#include "subnet/metrics.h"
#include "tests/test_util.h"

namespace amoeba {
namespace lora_test {  // named: a unity build joins test files
using testing::MaxAbsDiff;
using testing::TempDir;

struct Fixture {
  TempDir dir;
  std::unique_ptr<Supernet> s;
  std::unique_ptr<TrainData> data;
  at::Tensor heldout;
  Fixture() {
    ModelConfig c = testing::TinyConfig();
    c.num_hidden_layers = 4;
    c.vocab_size = 259;
    Model m = RandomModel(c, 5, 0.1);
    EXPECT_TRUE(SaveModel(m, dir.file("m")).ok());
    EXPECT_TRUE(WriteByteTokenizer(dir.file("m")).ok());
    // Learnable text: a few repeated sentences.
    std::ofstream(dir.file("text.txt")) << [] {
      std::string t;
      for (int i = 0; i < 200; ++i) t += "the cat sat on the mat. the dog ran in the park. ";
      return t;
    }();
    CalibrateOptions o;
    o.model_dir = dir.file("m");
    o.out_dir = dir.file("s");
    o.data_path = dir.file("text.txt");
    o.windows = 4;
    o.window_len = 32;
    o.dp_windows = 2;
    o.widths = {1.0, 0.75, 0.5};
    s = std::move(*Calibrate(o));
    data =
        std::make_unique<TrainData>(*TrainData::Load(dir.file("text.txt"), *s->tokenizer(), 1, 2));
    heldout = data->Sample(999, 0, 0, 4, 32).tokens;
  }
  Smol NewSmol(uint64_t seed = 3) {
    SmolConfig sc;
    sc.rank = 4;
    return Smol(s->base(), static_cast<int64_t>(s->spec().widths.size()), sc, seed);
  }
};

TEST(SmolTest, MergedEqualsUnmergedForSeveralShapes) {
  Fixture f;
  Smol smol = f.NewSmol();
  // B starts at zero (a no-op adapter): give it values so the test compares something.
  for (auto& [n, t] : smol.NamedParameters())
    if (n.find("lora_B") != std::string::npos) const_cast<at::Tensor&>(t).normal_(0, 0.05);
  at::Tensor tok = at::randint(259, {2, 12}, at::kLong);
  at::InferenceMode g;
  for (const Shape& sh : {f.s->FullShape(), Shape{3, 0.75}, f.s->SmallestShape()}) {
    const auto& layers = f.s->spec().FindDepth(sh.depth)->layers;
    Model sub = *f.s->Extract(sh);
    at::Tensor gate = InferenceGate(*f.s, smol, sh);
    TorchForwardOptions opt;
    opt.linear = smol.Hook(gate, layers);
    at::Tensor unmerged = TorchForward(sub, tok, opt);
    at::Tensor merged = TorchForward(smol.Merge(sub, gate, layers), tok);
    EXPECT_LT(MaxAbsDiff(unmerged, merged), 1e-4) << sh.ToString();
    EXPECT_GT(MaxAbsDiff(unmerged, TorchForward(sub, tok)), 1e-3)
        << "the adapters change the output";
  }
}

// The serving path for cold shapes: adapters attached as low-rank deltas to supernet views, run by
// the fast engine (prefill + KV decode), equal the merged copy and the reference forward.
TEST(SmolTest, EngineWithUnmergedDeltasEqualsMergedCopy) {
  Fixture f;
  Smol smol = f.NewSmol();
  for (auto& [n, t] : smol.NamedParameters())
    if (n.find("lora_B") != std::string::npos) const_cast<at::Tensor&>(t).normal_(0, 0.05);
  at::InferenceMode g;
  const std::vector<int32_t> prompt = {5, 17, 99, 3, 250, 42, 7};
  const std::vector<int32_t> next = {11, 12, 13};
  for (const Shape& sh : {f.s->FullShape(), Shape{3, 0.75}, f.s->SmallestShape()}) {
    const auto& layers = f.s->spec().FindDepth(sh.depth)->layers;
    Model sub = *f.s->Extract(sh);
    at::Tensor gate = InferenceGate(*f.s, smol, sh);
    Model unmerged = smol.AttachUnmerged(sub, gate, layers);
    // No weight was copied: the projections still share the supernet's storage.
    EXPECT_EQ(unmerged.layers[0].q.data_ptr(), sub.layers[0].q.data_ptr());
    auto run = [&](const Model& m) {
      Engine e(std::make_shared<const Model>(m), {.max_len = 64});
      KVCache c = e.NewCache(1);
      std::vector<at::Tensor> out;
      SeqInput in{0, prompt};
      out.push_back(e.Forward(c, {&in, 1}).value().clone());
      for (int32_t t : next) {
        SeqInput step{0, {&t, 1}};
        out.push_back(e.Forward(c, {&step, 1}).value().clone());
      }
      return at::cat(out);
    };
    at::Tensor a = run(unmerged), b = run(smol.Merge(sub, gate, layers));
    EXPECT_LT(MaxAbsDiff(a, b), 1e-4) << sh.ToString();
    EXPECT_GT(MaxAbsDiff(a, run(sub)), 1e-3) << "the deltas change the output";
    // The reference forward applies the deltas too.
    std::vector<int64_t> all(prompt.begin(), prompt.end());
    all.insert(all.end(), next.begin(), next.end());
    at::Tensor ref = TorchForward(unmerged, at::tensor(all).view({1, -1}))[0];
    EXPECT_LT(MaxAbsDiff(a, ref.narrow(0, prompt.size() - 1, next.size() + 1)), 1e-4);
  }
}

// Packed deltas (PackDeltas: the mixed factors as panels, what BuildSubnet gives a packed
// supernet's shapes) against the same deltas row-major, in every panel format: a decode step then
// runs as one team, and its logits differ from the row-major deltas' by rounding only: none to
// speak of in fp32, and in the other formats less than a merged copy in the same format (the
// server's other fast way to run adapters) differs from them.
TEST(SmolTest, PackedDeltasRunAsOneTeamAndMatchTheRowMajorOnes) {
  Fixture f;
  Smol smol = f.NewSmol();
  for (auto& [n, t] : smol.NamedParameters())
    if (n.find("lora_B") != std::string::npos) const_cast<at::Tensor&>(t).normal_(0, 0.05);
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  at::InferenceMode g;
  const std::vector<int32_t> prompt = {5, 17, 99, 3, 250, 42, 7};
  const std::vector<int32_t> next = {11, 12, 13};
  auto run = [&](Model m) {
    Engine e(std::make_shared<const Model>(std::move(m)), {.max_len = 64});
    KVCache c = e.NewCache(2);
    std::vector<at::Tensor> out;
    SeqInput in[2] = {{0, prompt}, {1, std::span<const int32_t>(prompt).first(3)}};
    out.push_back(e.Forward(c, in).value().clone());
    for (int32_t t : next) {
      SeqInput step[2] = {{0, {&t, 1}}, {1, {&t, 1}}};
      out.push_back(e.Forward(c, step).value().clone());
    }
    return at::cat(out);
  };
  for (WeightFormat format :
       {WeightFormat::kF32, WeightFormat::kF16, WeightFormat::kQ8_0, WeightFormat::kQ4_0})
    for (const Shape& sh : {f.s->FullShape(), f.s->SmallestShape()}) {
      SCOPED_TRACE(std::string(WeightFormatName(format)) + " " + sh.ToString());
      const auto& layers = f.s->spec().FindDepth(sh.depth)->layers;
      Model sub = *f.s->Extract(sh);
      RepackWeights(sub, format);
      Model row_major = smol.AttachUnmerged(sub, InferenceGate(*f.s, smol, sh), layers);
      Model packed = row_major;
      const int64_t predicted = PackDeltasBytes(packed);
      PackDeltas(packed);
      int64_t bytes = 0;
      for (const LayerWeights& l : packed.layers)
        for (const LowRankDelta& d : l.deltas) {
          EXPECT_EQ(d.packed(), d.defined());
          if (d.packed()) bytes += d.down_panels.nbytes() + d.up_panels.nbytes();
        }
      EXPECT_EQ(bytes, predicted) << "PackDeltasBytes (what the server's cap counts)";
      EXPECT_EQ(PackDeltasBytes(packed), 0);
      const at::Tensor base = run(sub), want = run(row_major);
      const int64_t teams = TeamRuns();
      const at::Tensor got = run(std::move(packed));
      EXPECT_GT(TeamRuns(), teams) << "no decode step with packed deltas ran as one team";
      const double effect = MaxAbsDiff(want, base), err = MaxAbsDiff(got, want);
      EXPECT_GT(effect, 1e-3) << "the deltas change the output";
      EXPECT_LT(err, 0.1 * effect);
      if (format == WeightFormat::kF32) {
        EXPECT_LT(err, 1e-4);
      } else {
        Model merged = smol.Merge(*f.s->Extract(sh), InferenceGate(*f.s, smol, sh), layers);
        RepackWeights(merged, format);
        EXPECT_LT(err, MaxAbsDiff(run(std::move(merged)), want));
      }
    }
  at::set_num_threads(threads);
}

TEST(SmolTest, GateIsDeterministicAtInferenceAndTopK) {
  Fixture f;
  Smol smol = f.NewSmol();
  at::Tensor phi = smol.ShapeFeature(f.s->spec().FindDepth(3)->layers, 1);
  at::Tensor a = smol.Gate(phi, false), b = smol.Gate(phi, false);
  EXPECT_TRUE(at::equal(a, b));
  EXPECT_EQ((a > 0).sum().item<int64_t>(), 2);  // top-2 of 5
  EXPECT_NEAR(a.sum().item<double>(), 1.0, 1e-6);
  // Training adds noise.
  bool differs = false;
  for (int i = 0; i < 10 && !differs; ++i) differs = !at::equal(smol.Gate(phi, true), a);
  EXPECT_TRUE(differs);
}

TEST(DistillTest, BalancedLossKeepsTheFullValueAndScalesGradients) {
  at::Tensor x = at::tensor({2.0f}).set_requires_grad(true);
  at::Tensor li = x * x / 8;           // L_i = 0.5, dL_i/dx = x/4 = 0.5
  at::Tensor l0 = at::tensor({2.0f});  // L_0 = 2
  at::Tensor b = BalanceLoss(li, l0);
  EXPECT_FLOAT_EQ(b.item<float>(), 2.0f);  // equals the full subnet's loss value
  b.backward();
  EXPECT_FLOAT_EQ(x.grad().item<float>(), 0.5f * 2.0f / 0.5f);  // scaled by L_0 / L_i
  // Soft CE to itself is the entropy; masked positions do not count.
  at::Tensor logits = at::randn({1, 4, 7});
  at::Tensor mask = at::tensor({0.f, 1.f, 1.f, 0.f}).unsqueeze(0);
  at::Tensor p = at::softmax(logits.narrow(1, 0, 3), -1);
  const double entropy = (-(p * p.log()).sum(-1)[0].narrow(0, 0, 2)).mean().item<double>();
  EXPECT_NEAR(MaskedSoftCrossEntropy(logits, logits, mask).item<double>(), entropy, 1e-5);
}

TEST(DistillTest, ShortTuneLowersHeldoutLossOfFullAndSmallest) {
  Fixture f;
  Smol smol = f.NewSmol();
  const double full0 = HeldoutNll(*f.s, &smol, f.s->FullShape(), f.heldout);
  const double small0 = HeldoutNll(*f.s, &smol, f.s->SmallestShape(), f.heldout);
  TuneOptions o;
  o.loop.steps = 25;
  o.batch = 4;
  o.seq_len = 32;
  o.loop.lr = 5e-3;
  o.loop.progress = false;
  auto r = Tune(*f.s, smol, *f.data, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_LT(HeldoutNll(*f.s, &smol, f.s->FullShape(), f.heldout), full0 - 0.05);
  EXPECT_LT(HeldoutNll(*f.s, &smol, f.s->SmallestShape(), f.heldout), small0 - 0.05);
  // After training, different shapes get different gates.
  EXPECT_FALSE(at::allclose(InferenceGate(*f.s, smol, f.s->FullShape()),
                            InferenceGate(*f.s, smol, f.s->SmallestShape())));
}

TEST(DistillTest, ResumeGivesTheSameAdaptersAsAnUninterruptedRun) {
  Fixture f;
  TuneOptions o;
  o.loop.steps = 6;
  o.batch = 2;
  o.seq_len = 24;
  o.loop.lr = 3e-3;
  o.loop.progress = false;
  o.loop.checkpoint_every = 100;  // only the final / interrupt checkpoints
  Smol straight = f.NewSmol(7);
  ASSERT_TRUE(Tune(*f.s, straight, *f.data, o).ok());
  // Stopped after 3 steps by the stop flag (what Ctrl-C sets), then resumed in a fresh Smol.
  o.loop.checkpoint = f.dir.file("ckpt.safetensors");
  Smol first = f.NewSmol(7);
  std::atomic<bool> stop{false};
  o.loop.on_step = [&](int64_t step) { stop = step >= 3; };
  auto part = Tune(*f.s, first, *f.data, o, &stop);
  ASSERT_TRUE(part.ok());
  EXPECT_TRUE(part->interrupted);
  EXPECT_EQ(part->step, 3);
  o.loop.on_step = nullptr;
  o.loop.resume = true;
  Smol second = f.NewSmol(7);
  auto r = Tune(*f.s, second, *f.data, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->step, 6);
  auto a = straight.NamedParameters(), b = second.NamedParameters();
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_LT(MaxAbsDiff(a[i].second, b[i].second), 1e-6) << a[i].first;
  // A checkpoint from other options is refused instead of silently mixing runs.
  o.loop.lr = 1.0;
  Smol third = f.NewSmol(7);
  EXPECT_EQ(Tune(*f.s, third, *f.data, o).status().code(), absl::StatusCode::kFailedPrecondition);
}

// After a crash between checkpoints the resumed run logged the steps since the checkpoint again
// (48 rows for 40 steps). The log now has one row per step, in order.
TEST(DistillTest, MetricsLogHasOneRowPerStepAfterACrashAndResume) {
  TempDir dir;
  at::Tensor w = at::ones({4}).set_requires_grad(true);
  const std::vector<std::pair<std::string, at::Tensor>> params = {{"w", w}};
  LoopOptions o;
  o.steps = 10;
  o.lr = 0.1;
  o.progress = false;
  o.checkpoint = dir.file("ckpt.safetensors");
  o.checkpoint_every = 4;
  o.metrics_log = dir.file("metrics.jsonl");
  const MicroStep micro = [&](int64_t, int64_t) {
    at::Tensor loss = (w * w).sum();
    loss.backward();
    return MicroResult{loss.item<double>(), 0, 4};
  };
  auto steps = [&] {
    std::vector<int64_t> out;
    std::ifstream in(o.metrics_log);
    for (std::string line; std::getline(in, line);)
      out.push_back(nlohmann::json::parse(line)["step"].get<int64_t>());
    return out;
  };
  o.on_step = [](int64_t step) {
    if (step == 6) throw std::runtime_error("killed");  // no checkpoint since step 4
  };
  EXPECT_THROW((void)RunTrainingLoop(params, o, micro), std::runtime_error);
  EXPECT_EQ(steps().size(), 6u);
  o.on_step = nullptr;
  o.resume = true;
  auto r = RunTrainingLoop(params, o, micro);
  ASSERT_TRUE(r.ok()) << r.status();
  std::vector<int64_t> want(10);
  std::iota(want.begin(), want.end(), 1);
  EXPECT_EQ(steps(), want);
  // A fresh run (no resume) starts a fresh log.
  o.resume = false;
  o.steps = 2;
  ASSERT_TRUE(RunTrainingLoop(params, o, micro).ok());
  EXPECT_EQ(steps(), (std::vector<int64_t>{1, 2}));
}

// The "one adapter for each shape" baseline: every micro-batch trains only the named shape on the
// labels, that shape's held-out loss falls, and an off-grid shape is refused.
TEST(DistillTest, OnlyShapeTrainsThatShapeAlone) {
  Fixture f;
  Smol smol = f.NewSmol();
  TuneOptions o;
  o.loop.steps = 20;
  o.batch = 4;
  o.seq_len = 32;
  o.loop.lr = 5e-3;
  o.loop.progress = false;
  o.distill = false;
  o.only_shape = f.s->SmallestShape();
  auto b = f.data->Sample(o.loop.seed, 0, 0, o.batch, o.seq_len);
  smol.SetRequiresGrad(true);
  SandwichLosses l = SandwichStep(*f.s, smol, b, o, 0, 0);
  ASSERT_EQ(l.shapes.size(), 1u);
  EXPECT_EQ(l.shapes[0], f.s->SmallestShape());
  EXPECT_EQ(l.full, l.smallest);
  for (auto& [name, p] : smol.NamedParameters())
    if (p.grad().defined()) p.mutable_grad().zero_();
  const double before = HeldoutNll(*f.s, &smol, f.s->SmallestShape(), f.heldout);
  ASSERT_TRUE(Tune(*f.s, smol, *f.data, o).ok());
  EXPECT_LT(HeldoutNll(*f.s, &smol, f.s->SmallestShape(), f.heldout), before - 0.05);
  o.only_shape = Shape{f.s->spec().depths.front() - 1, 1.0};
  EXPECT_EQ(Tune(*f.s, smol, *f.data, o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PretrainTest, LowersLossAndResumesBitForBit) {
  Fixture f;
  Model m = *LoadModel(f.dir.file("m"));
  at::Tensor held = f.heldout;
  const double before = MeanNll(m, held);
  PretrainOptions o;
  o.batch = 4;
  o.seq_len = 32;
  o.loop.steps = 20;
  o.loop.lr = 3e-3;
  o.loop.progress = false;
  ASSERT_TRUE(Pretrain(m, *f.data, o).ok());
  EXPECT_LT(MeanNll(m, held), before - 0.5);
  // Stop at step 2 and resume to 4 == 4 straight steps.
  o.loop.steps = 4;
  Model straight = *LoadModel(f.dir.file("m"));
  ASSERT_TRUE(Pretrain(straight, *f.data, o).ok());
  o.loop.checkpoint = f.dir.file("p.safetensors");
  o.loop.checkpoint_every = 100;
  std::atomic<bool> stop{false};
  o.loop.on_step = [&](int64_t s) { stop = s >= 2; };
  Model a = *LoadModel(f.dir.file("m"));
  auto part = Pretrain(a, *f.data, o, &stop);
  ASSERT_TRUE(part.ok() && part->interrupted);
  o.loop.on_step = nullptr;
  o.loop.resume = true;
  Model b = *LoadModel(f.dir.file("m"));
  ASSERT_TRUE(Pretrain(b, *f.data, o).ok());
  auto x = NamedWeights(straight), y = NamedWeights(b);
  for (size_t i = 0; i < x.size(); ++i)
    EXPECT_LT(MaxAbsDiff(x[i].second, y[i].second), 1e-6) << x[i].first;
}

TEST(SmolTest, SaveLoadRoundTrip) {
  Fixture f;
  Smol smol = f.NewSmol();
  ASSERT_TRUE(smol.Save(f.dir.file("smol.safetensors")).ok());
  auto back = Smol::Load(f.dir.file("smol.safetensors"), f.s->base());
  ASSERT_TRUE(back.ok()) << back.status();
  auto a = smol.NamedParameters(), b = back->NamedParameters();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_TRUE(at::equal(a[i].second, b[i].second)) << a[i].first;
}

TEST(PlotTest, TicksAreRoundAndEveryPointIsLabelled) {
  EXPECT_EQ(NiceTicks(0, 9.3), (std::vector<double>{0, 2, 4, 6, 8}));
  EXPECT_EQ(NiceTicks(181.2, 208.9), (std::vector<double>{185, 190, 195, 200, 205}));
  const std::vector<double> small = NiceTicks(0.5, 0.56);
  ASSERT_GE(small.size(), 3u);
  EXPECT_NEAR(small[1] - small[0], 0.01, 1e-12);
  PlotSeries a("dp <tuned>"), b("drop_last", true, true);
  a.points = {{8, 190.5, "d8 w1"}, {12, 181, "d12 w1"}};
  b.points = {{8, 201, ""}};
  PlotOptions o;
  o.x_label = "depth (layers)";
  o.y_label = "perplexity";
  const std::string svg = SvgPlot(o, {a, b});
  for (const char* want : {"depth (layers)", "perplexity", "d8 w1", "d12 w1", "dp &lt;tuned&gt;",
                           "drop_last", "stroke-dasharray", "<polyline", ">190<"})
    EXPECT_NE(svg.find(want), std::string::npos) << want;
  size_t circles = 0;
  for (size_t p = svg.find("<circle"); p != std::string::npos; p = svg.find("<circle", p + 1))
    ++circles;
  EXPECT_EQ(circles, 3u + 2u);  // the points and one legend marker per series
}

}  // namespace lora_test
}  // namespace amoeba
