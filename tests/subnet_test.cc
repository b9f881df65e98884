// Subnet selection and extraction: permutation preserves the function, sliced == masked, nested
// widths, the DP's rule, resume, export round trips, and bad supernet directories.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "model/engine.h"
#include "model/file_util.h"
#include "model/packed_linear.h"
#include "model/presets.h"
#include "model/safetensors.h"
#include "model/torch_forward.h"
#include "subnet/calibrate.h"
#include "subnet/calibration_data.h"
#include "subnet/depth_search.h"
#include "subnet/export.h"
#include "subnet/metrics.h"
#include "subnet/subnet_builder.h"
#include "subnet/width_importance.h"
#include "tests/test_util.h"

namespace amoeba {
namespace subnet_test {  // named: a unity build joins test files
namespace fs = std::filesystem;
using testing::MaxAbsDiff;
using testing::TempDir;

Model SixLayerModel(uint64_t seed = 1) {
  ModelConfig c = testing::TinyConfig();
  c.num_hidden_layers = 6;
  Model m = RandomModel(c, seed, 0.15);
  for (auto& l : m.layers) {
    l.attn_norm = 1 + 0.1 * at::randn_like(l.attn_norm);
    l.mlp_norm = 1 + 0.1 * at::randn_like(l.mlp_norm);
  }
  return m;
}

at::Tensor RandomWindows(int64_t n, int64_t len, int64_t vocab, uint64_t seed) {
  at::manual_seed(seed);
  return at::randint(vocab, {n, len}, at::kLong);
}

CalibrateOptions SmallOptions() {
  CalibrateOptions o;
  o.windows = 8;
  o.window_len = 24;
  o.dp_windows = 4;
  o.batch = 4;
  return o;
}

std::unique_ptr<Supernet> BuildSmall(const Model& m, const CalibrateOptions& o = SmallOptions()) {
  at::Tensor w = RandomWindows(o.windows, o.window_len, m.config.vocab_size, 3);
  auto b = BuildSupernet(m, w, w.narrow(0, 0, o.dp_windows), o);
  EXPECT_TRUE(b.ok()) << b.status();
  return std::move(b->supernet);
}

at::Tensor Logits(const Model& m, const at::Tensor& tokens) {
  at::InferenceMode g;
  return TorchForward(m, tokens);
}

// CompareEngines: a model against itself is KL 0 with equal NLLs (and the NLL is the libtorch
// reference's); against its Q8_0 and Q4_0 panels the KL is positive and larger for Q4_0.
TEST(MetricsTest, CompareEnginesMeasuresTheFormatsDistance) {
  at::InferenceMode guard;
  auto base = std::make_shared<const Model>(testing::TinyModel(5));
  at::Tensor windows = at::randint(0, 97, {3, 12}, at::kLong);
  auto same = CompareEngines(base, base, windows);
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(same->tokens, 3 * 11);
  EXPECT_NEAR(same->mean_kl, 0.0, 1e-9);
  EXPECT_DOUBLE_EQ(same->reference_nll, same->test_nll);
  EXPECT_NEAR(same->reference_nll, MeanNll(*base, windows), 1e-4);
  double previous = 0;
  for (WeightFormat f : {WeightFormat::kQ8_0, WeightFormat::kQ4_0}) {
    Model q = *base;
    PackWeights(q, f);
    auto c = CompareEngines(base, std::make_shared<const Model>(std::move(q)), windows);
    ASSERT_TRUE(c.ok());
    EXPECT_GT(c->mean_kl, previous) << WeightFormatName(f);
    EXPECT_NE(c->test_nll, c->reference_nll);
    previous = c->mean_kl;
  }
  at::Tensor bad = windows.clone();
  bad[0][3] = 1000;  // out of the vocabulary: an error, not a crash
  EXPECT_FALSE(CompareEngines(base, base, bad).ok());
}

TEST(WidthTest, PermutedSupernetEqualsOriginal) {
  Model m = SixLayerModel();
  auto s = BuildSmall(m);
  at::Tensor tok = RandomWindows(2, 12, m.config.vocab_size, 9);
  EXPECT_LT(MaxAbsDiff(Logits(m, tok), Logits(s->base(), tok)), 1e-5);
  // The permutation really moved something.
  EXPECT_FALSE(at::equal(m.layers[0].gate, s->base().layers[0].gate));
}

TEST(WidthTest, SlicedSubnetEqualsMaskedSupernet) {
  Model m = SixLayerModel(2);
  auto s = BuildSmall(m);
  at::Tensor tok = RandomWindows(2, 10, m.config.vocab_size, 4);
  std::vector<Shape> shapes = {s->FullShape(), {6, 0.75}, {5, 0.875}, s->SmallestShape()};
  for (const Shape& sh : shapes) {
    auto sliced = s->Extract(sh, ExtractMode::kSliced);
    auto masked = s->Extract(sh, ExtractMode::kMasked);
    ASSERT_TRUE(sliced.ok() && masked.ok()) << sh.ToString();
    EXPECT_LT(MaxAbsDiff(Logits(*sliced, tok), Logits(*masked, tok)), 1e-5) << sh.ToString();
    EXPECT_EQ(sliced->config.num_hidden_layers, sh.depth);
    if (sh.width < 1) {
      EXPECT_LT(sliced->config.ParameterCount(), masked->config.ParameterCount());
    }
    // Slicing shares the supernet's storage.
    const int first = s->spec().FindDepth(sh.depth)->layers[0];
    EXPECT_EQ(sliced->layers[0].q.data_ptr(), s->base().layers[first].q.data_ptr());
  }
  // And the fast engine agrees on the sliced subnet (strided prefix weights, biases).
  auto sub = s->Extract(s->SmallestShape());
  Engine e(std::make_shared<const Model>(*sub), {.max_len = 16});
  KVCache c = e.NewCache(1);
  std::vector<int32_t> ids(tok[0].data_ptr<int64_t>(), tok[0].data_ptr<int64_t>() + 10);
  SeqInput in{0, ids};
  at::InferenceMode g;
  auto l = e.Forward(c, {&in, 1}, true);
  ASSERT_TRUE(l.ok());
  EXPECT_LT(MaxAbsDiff(*l, Logits(*sub, tok)[0]), 1e-5);
}

TEST(WidthTest, BiasCompensationHelpsOnAverage) {
  // Removing channels with their mean contribution compensated should change the output less than
  // removing them outright, measured on the calibration data itself.
  Model m = SixLayerModel(5);
  CalibrateOptions o = SmallOptions();
  auto s = BuildSmall(m, o);
  at::Tensor w = RandomWindows(o.windows, o.window_len, m.config.vocab_size, 3);
  auto sub = s->Extract({6, 0.625});
  Model nobias = *sub;
  for (auto& l : nobias.layers) {
    l.o_bias = at::Tensor();
    l.down_bias = at::Tensor();
  }
  at::Tensor ref = Logits(s->base(), w);
  const double with = (Logits(*sub, w) - ref).pow(2).mean().item<double>();
  const double without = (Logits(nobias, w) - ref).pow(2).mean().item<double>();
  EXPECT_LT(with, without);
}

// Magnitude scores ignore the activations: the same scores from any statistics, ranking MLP
// channels by ||W_down[:, j]||²; FLAP's change with them. Calibrate records the choice and rejects
// an unknown one.
TEST(WidthTest, MagnitudeScoresRankByWeightNormAlone) {
  at::InferenceMode g;
  Model m = SixLayerModel(4);
  at::Tensor w1 = RandomWindows(4, 12, m.config.vocab_size, 1);
  at::Tensor w2 = RandomWindows(4, 12, m.config.vocab_size, 2);
  const ActivationStats a = CollectActivationStats(m, w1), b = CollectActivationStats(m, w2);
  const WidthScores ma = ComputeWidthScores(m, a, WidthScoring::kMagnitude);
  const WidthScores mb = ComputeWidthScores(m, b, WidthScoring::kMagnitude);
  const WidthScores fa = ComputeWidthScores(m, a), fb = ComputeWidthScores(m, b);
  for (size_t l = 0; l < m.layers.size(); ++l) {
    EXPECT_TRUE(at::equal(ma.channel[l], mb.channel[l]));
    EXPECT_TRUE(at::equal(ma.group[l], mb.group[l]));
    EXPECT_FALSE(at::equal(fa.channel[l], fb.channel[l]));
    const at::Tensor norms = m.layers[l].down.pow(2).sum(0);
    EXPECT_TRUE(at::equal(std::get<1>(ma.channel[l].sort(true, 0, true)),
                          std::get<1>(norms.sort(true, 0, true))))
        << "layer " << l;
  }
  CalibrateOptions o = SmallOptions();
  o.width_scores = "magnitude";
  auto s = BuildSmall(m, o);
  EXPECT_EQ(s->spec().calibration.value("width_scores", ""), "magnitude");
  EXPECT_FALSE(at::equal(s->base().layers[0].gate, BuildSmall(m)->base().layers[0].gate));
  o.width_scores = "random";
  at::Tensor w = RandomWindows(o.windows, o.window_len, m.config.vocab_size, 3);
  auto bad = BuildSupernet(m, w, w.narrow(0, 0, o.dp_windows), o);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
}

// The removal error is what it says: the mean squared change of a layer's o_proj / down_proj
// output over the calibration tokens when a unit's inputs are replaced by their means (removed and
// compensated), measured on the same tokens through the forward hook.
TEST(WidthTest, RemovalErrorsAreTheMeasuredOutputChange) {
  at::InferenceMode g;
  Model m = SixLayerModel(5);
  at::Tensor w = RandomWindows(3, 16, m.config.vocab_size, 7);
  const ActivationStats st = CollectActivationStats(m, w);
  EXPECT_EQ(st.tokens, w.numel());
  const WidthScores err = RemovalErrors(m, st);
  const int64_t gw = m.config.group_size() * m.config.head_dim;
  for (int l : {0, 3}) {
    // The covariance's diagonal is each channel's variance.
    EXPECT_LT(MaxAbsDiff(st.o_cov[l].diagonal(0, 1, 2).reshape({-1}), st.o_var[l]), 1e-5);
    auto output_change = [&](Proj target, const at::Tensor& idx) {
      at::Tensor before, after;
      TorchForwardOptions opt;
      opt.linear = [&](int layer, Proj p, const at::Tensor& x, const at::Tensor& wt,
                       const at::Tensor& b) {
        at::Tensor y = at::linear(x, wt, b);
        if (layer == l && p == target) {
          const at::Tensor& mean = p == Proj::kO ? st.o_mean[l] : st.down_mean[l];
          at::Tensor xr = x.to(at::kDouble).clone();
          std::vector<int64_t> sizes = x.sizes().vec();
          sizes.back() = idx.numel();
          xr.index_copy_(-1, idx, mean.index_select(0, idx).to(at::kDouble).expand(sizes));
          before = y.to(at::kDouble);
          after = at::linear(xr, wt.to(at::kDouble), b.defined() ? b.to(at::kDouble) : b);
        }
        return y;
      };
      TorchHidden(m, w, opt);
      return (after - before).pow(2).sum(-1).mean().item<double>();
    };
    for (int64_t gi = 0; gi < err.group[l].numel(); ++gi) {
      at::Tensor idx = at::arange(gi * gw, (gi + 1) * gw, at::kLong);
      const double want = output_change(Proj::kO, idx);
      EXPECT_NEAR(err.group[l][gi].item<double>(), want, 1e-3 * want + 1e-7)
          << "layer " << l << " group " << gi;
    }
    for (int64_t j : {int64_t{0}, int64_t{5}, err.channel[l].numel() - 1}) {
      const double want = output_change(Proj::kDown, at::tensor({j}, at::kLong));
      EXPECT_NEAR(err.channel[l][j].item<double>(), want, 1e-3 * want + 1e-7)
          << "layer " << l << " channel " << j;
    }
  }
}

// Removal scores: each layer's order is its removal errors' order, scaled by the measured
// sensitivity (which is what the loss does when the layer's cheapest quarter goes) per parameter;
// calibrate with them keeps the function of the permuted model and records the choice.
TEST(WidthTest, RemovalScoresWeighErrorsByMeasuredSensitivity) {
  at::InferenceMode g;
  Model m = SixLayerModel(6);
  at::Tensor w = RandomWindows(4, 16, m.config.vocab_size, 8);
  const ActivationStats st = CollectActivationStats(m, w);
  const LayerSensitivity sens = MeasureSensitivity(m, st, w, 4);
  ASSERT_EQ(sens.attention.size(), m.layers.size());
  EXPECT_NEAR(sens.base_nll, MeanNll(m, w, 4), 1e-9);
  const WidthScores err = RemovalErrors(m, st);
  const WidthScores sc = ComputeWidthScores(m, st, WidthScoring::kRemoval, &sens);
  int measured = 0;
  for (size_t l = 0; l < m.layers.size(); ++l) {
    EXPECT_GE(sens.attention[l], sens.attention_floor);
    EXPECT_GE(sens.mlp[l], sens.mlp_floor);
    EXPECT_GT(sens.mlp_floor, 0);
    const double gp = static_cast<double>(GroupParams(m.config));
    const double cp = static_cast<double>(ChannelParams(m.config));
    EXPECT_LT(MaxAbsDiff(sc.group[l], err.group[l] * (sens.attention[l] / gp)), 1e-9);
    EXPECT_LT(MaxAbsDiff(sc.channel[l], err.channel[l] * (sens.mlp[l] / cp)), 1e-9);
    // The sensitivity is the loss of the layer's cheapest quarter over its errors.
    const at::Tensor order = std::get<1>(err.channel[l].sort(true, 0, false));
    const at::Tensor quarter = order.narrow(0, 0, std::max<int64_t>(1, order.numel() / 4));
    const double nll = NllWithUnitsRemoved(m, st, w, 4, static_cast<int>(l), {}, quarter);
    const double want = std::max(0.0, nll - sens.base_nll) /
                        err.channel[l].index_select(0, quarter).sum().item<double>();
    // Measured where it is above the module's floor.
    EXPECT_NEAR(sens.mlp[l], std::max(want, sens.mlp_floor), 1e-6 * want + 1e-12) << "layer " << l;
    measured += want > sens.mlp_floor;
  }
  EXPECT_GE(measured, 1);
  EXPECT_TRUE(ParseWidthScoring("removal").ok());
  CalibrateOptions o = SmallOptions();
  o.width_scores = "removal";
  auto s = BuildSmall(m, o);
  EXPECT_EQ(s->spec().calibration.value("width_scores", ""), "removal");
  at::Tensor probe = RandomWindows(2, 10, m.config.vocab_size, 9);
  EXPECT_LT(MaxAbsDiff(TorchForward(s->base(), probe), TorchForward(m, probe)), 1e-4);
  // Nested widths as with any score.
  const auto& wt = s->spec().width_table;
  for (size_t i = 1; i < wt.size(); ++i)
    for (size_t l = 0; l < m.layers.size(); ++l) {
      EXPECT_LE(wt[i].alloc.channels[l], wt[i - 1].alloc.channels[l]);
      EXPECT_LE(wt[i].alloc.kv_groups[l], wt[i - 1].alloc.kv_groups[l]);
    }
}

TEST(WidthTest, WidthsAreNestedAndMatchTheRatio) {
  Model m = SixLayerModel(3);
  auto s = BuildSmall(m);
  const auto& wt = s->spec().width_table;
  ASSERT_EQ(wt.size(), 4u);
  const int64_t total = WidthParams(s->base());
  const int64_t unit = std::max(GroupParams(m.config), ChannelParams(m.config));
  for (size_t i = 0; i < wt.size(); ++i) {
    const auto& a = wt[i].alloc;
    EXPECT_GE(a.params, wt[i].ratio * total - 1e-6);
    EXPECT_LT(a.params, wt[i].ratio * total + unit) << "ratio " << wt[i].ratio;
    int64_t recount = 0;
    for (size_t l = 0; l < a.kv_groups.size(); ++l)
      recount += a.kv_groups[l] * GroupParams(m.config) + a.channels[l] * ChannelParams(m.config);
    EXPECT_EQ(recount, a.params);
    if (i > 0) {
      for (size_t l = 0; l < a.kv_groups.size(); ++l) {  // nested: smaller ⊂ larger
        EXPECT_LE(a.kv_groups[l], wt[i - 1].alloc.kv_groups[l]);
        EXPECT_LE(a.channels[l], wt[i - 1].alloc.channels[l]);
      }
    }
  }
  // Widths differ per layer for the global allocation.
  std::set<int64_t> distinct(wt[3].alloc.channels.begin(), wt[3].alloc.channels.end());
  EXPECT_GT(distinct.size(), 1u);
  // Scores are sorted after permutation: the kept set is the top-scored prefix.
  WidthAllocation u = AllocateUniform(s->base(), 0.5);
  for (int64_t c : u.channels) EXPECT_EQ(c, 48);
}

TEST(DepthTest, DpFollowsItsRuleAndIsExactForAdditiveMetrics) {
  const int64_t L = 7, K = 1, dmin = 3;
  // Additive metric: the DP is exact, so it must match brute force.
  std::vector<double> cost = {5, 1, 4, 2, 8, 3, 100};
  int evals = 0;
  DepthMetric add;
  add.eval = [&](const std::vector<int>& active) {
    ++evals;
    double s = 0;
    for (int l : active) s += cost[l];
    return -s;  // removing cheap layers is best: keep the expensive ones
  };
  DepthSearchOptions o;
  o.num_layers = L;
  o.min_depth = dmin;
  o.keep_last = K;
  o.show_progress = false;
  auto r = DpDepthSearch(o, add);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(evals, DpEvaluationCount(L, dmin, K) + 1);  // + the full model
  for (const auto& e : *r) {
    // Brute force over all removal sets of the same size among the candidates.
    const int m = static_cast<int>(L - e.depth);
    double best = INFINITY;
    for (int mask = 0; mask < (1 << (L - K)); ++mask) {
      if (__builtin_popcount(mask) != m) continue;
      std::vector<int> active;
      for (int l = 0; l < L; ++l)
        if (l >= L - K || !(mask & (1 << l))) active.push_back(l);
      double s = 0;
      for (int l : active) s -= cost[l];
      best = std::min(best, s);
    }
    EXPECT_DOUBLE_EQ(e.metric, best) << "depth " << e.depth;
    EXPECT_EQ(e.layers.back(), L - 1);  // the last layer is always kept
  }
}

TEST(DepthTest, DpOnAModelAgainstBruteForce) {
  Model m = SixLayerModel(4);
  at::Tensor w = RandomWindows(2, 16, m.config.vocab_size, 1);
  DepthMetric ppl;
  ppl.eval = [&](const std::vector<int>& a) { return Perplexity(m.WithLayers(a), w); };
  DepthSearchOptions o;
  o.num_layers = 6;
  o.min_depth = 3;
  o.keep_last = 1;
  o.show_progress = false;
  auto r = DpDepthSearch(o, ppl);
  ASSERT_TRUE(r.ok());
  for (const auto& e : *r) {
    // The reported metric is the metric of the reported layers.
    EXPECT_NEAR(e.metric, ppl.eval(e.layers), 1e-6 * e.metric);
    // Not exhaustive: never better than the brute-force optimum, and it is one of the sets.
    double best = INFINITY;
    for (int mask = 0; mask < 32; ++mask) {
      if (__builtin_popcount(mask) != 6 - e.depth) continue;
      std::vector<int> active;
      for (int l = 0; l < 6; ++l)
        if (l == 5 || !(mask & (1 << l))) active.push_back(l);
      best = std::min(best, ppl.eval(active));
    }
    EXPECT_GE(e.metric, best - 1e-9);
  }
  // The DP's d = L-1 answer is the best single removal (the DP compares all of them).
  double best1 = INFINITY;
  for (int l = 0; l < 5; ++l) {
    std::vector<int> a;
    for (int k = 0; k < 6; ++k)
      if (k != l) a.push_back(k);
    best1 = std::min(best1, ppl.eval(a));
  }
  EXPECT_DOUBLE_EQ((*r)[2].metric, best1);
}

TEST(DepthTest, InterruptedSearchResumesFromItsState) {
  TempDir dir;
  int evals = 0;
  DepthMetric add;
  add.eval = [&](const std::vector<int>& active) {
    ++evals;
    double s = 0;
    for (int l : active) s += (l * 7 % 5) + 0.1 * l;
    return s;
  };
  DepthSearchOptions o{.num_layers = 8,
                       .min_depth = 4,
                       .keep_last = 1,
                       .state_path = dir.file("state.json"),
                       .fingerprint = "fp",
                       .show_progress = false};
  auto full = DpDepthSearch(o, add);
  ASSERT_TRUE(full.ok());
  const int first = evals;
  // Simulate a kill part-way: keep only some cached evaluations.
  auto j = nlohmann::json::parse(*ReadFile(dir.file("state.json")));
  nlohmann::json kept = nlohmann::json::object();
  int i = 0;
  for (auto& [k, v] : j["evaluations"].items())
    if (i++ % 2 == 0) kept[k] = v;
  j["evaluations"] = kept;
  ASSERT_TRUE(WriteFileAtomic(dir.file("state.json"), j.dump()).ok());
  evals = 0;
  auto resumed = DpDepthSearch(o, add);
  ASSERT_TRUE(resumed.ok());
  EXPECT_EQ(evals, first - static_cast<int>(kept.size()));
  for (size_t d = 0; d < full->size(); ++d) EXPECT_EQ((*full)[d].layers, (*resumed)[d].layers);
  // Another fingerprint ignores the state.
  evals = 0;
  o.fingerprint = "other";
  ASSERT_TRUE(DpDepthSearch(o, add).ok());
  EXPECT_EQ(evals, first);
}

struct SupernetOnDisk {
  TempDir dir;
  std::string model_dir, super_dir;
  SupernetOnDisk() {
    model_dir = dir.file("model");
    super_dir = dir.file("super");
    Model m = SixLayerModel(7);
    m.config.vocab_size = 259;
    m = RandomModel(m.config, 7, 0.15);
    testing::MustOk(SaveModel(m, model_dir), "save model");
    testing::MustOk(WriteByteTokenizer(model_dir), "tokenizer");
    std::ofstream(dir.file("calib.txt"))
        << std::string(200, 'x') << " the quick brown fox jumps over the lazy dog "
        << "and keeps on running until the end of the calibration text.";
    CalibrateOptions o = SmallOptions();
    o.model_dir = model_dir;
    o.out_dir = super_dir;
    o.data_path = dir.file("calib.txt");
    testing::MustOk(Calibrate(o), "calibrate");
  }
};

TEST(SupernetTest, CalibrateWritesALoadableSupernetAndExportsRoundTrip) {
  SupernetOnDisk d;
  auto s = Supernet::Load(d.super_dir);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)->spec().depths, (std::vector<int64_t>{4, 5, 6}));
  EXPECT_EQ((*s)->spec().profile.size(), 12u);
  EXPECT_EQ((*s)->spec().depth_table[0].baselines.size(), 2u);
  at::Tensor tok = RandomWindows(1, 12, 259, 2);
  for (bool uniform : {false, true}) {
    for (const Shape& sh : {Shape{6, 1.0}, Shape{5, 0.75}, Shape{4, 0.625}}) {
      ExportOptions eo;
      eo.uniform_width = uniform;
      auto sub = SubnetForExport(**s, nullptr, sh, eo);
      ASSERT_TRUE(sub.ok()) << sub.status();
      const std::string out = d.dir.file("export");
      ASSERT_TRUE(WriteExport(**s, *sub, out, eo).ok());
      auto back = LoadModel(out);
      ASSERT_TRUE(back.ok()) << back.status();
      EXPECT_TRUE(fs::exists(fs::path(out) / "tokenizer.json"));
      EXPECT_LT(MaxAbsDiff(Logits(*back, tok), Logits(*sub, tok)), 1e-6) << sh.ToString();
      auto cfg = nlohmann::json::parse(*ReadFile(out + "/config.json"));
      if (uniform) {
        // A standard LlamaForCausalLM config: no per-layer lists.
        EXPECT_FALSE(cfg.contains("amoeba_layer_intermediate_size"));
        if (sh.width < 1) {
          EXPECT_TRUE(cfg["mlp_bias"].get<bool>());
        }
      } else if (sh.width < 1) {
        EXPECT_TRUE(cfg.contains("amoeba_layer_intermediate_size"));
      }
      if (!uniform) {
        auto in_server = (*s)->Extract(sh);
        EXPECT_LT(MaxAbsDiff(Logits(*back, tok), Logits(*in_server, tok)), 1e-6);
      }
    }
  }
}

TEST(SupernetTest, BadSupernetDirectoriesAndShapes) {
  SupernetOnDisk d;
  auto s = Supernet::Load(d.super_dir);
  ASSERT_TRUE(s.ok());
  auto bad_depth = (*s)->Extract({3, 1.0});
  EXPECT_EQ(bad_depth.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_depth.status().message().find("shape.depth"), std::string::npos);
  auto bad_width = (*s)->Extract({6, 0.5});
  EXPECT_NE(bad_width.status().message().find("shape.width"), std::string::npos);
  EXPECT_FALSE(Shape::Parse("depth=x", 6).ok());
  EXPECT_FALSE(Shape::Parse("height=3", 6).ok());
  EXPECT_EQ(Shape::Parse("width=0.75", 6)->depth, 6);
  // Partial / corrupt directories.
  const std::string meta = d.super_dir + "/amoeba.json";
  const std::string good = *ReadFile(meta);
  ASSERT_TRUE(WriteFileAtomic(meta, "{\"format\": \"amoeba-supernet\"}").ok());
  EXPECT_EQ(Supernet::Load(d.super_dir).status().code(), absl::StatusCode::kDataLoss);
  auto j = nlohmann::json::parse(good);
  j["depth_table"][0]["layers"][0] = 99;
  ASSERT_TRUE(WriteFileAtomic(meta, j.dump()).ok());
  EXPECT_NE(Supernet::Load(d.super_dir).status().message().find("depth_table[0].layers[0]"),
            std::string::npos);
  ASSERT_TRUE(WriteFileAtomic(meta, good).ok());
  fs::rename(d.super_dir + "/width.safetensors", d.super_dir + "/w.bak");
  EXPECT_FALSE(Supernet::Load(d.super_dir).ok());
  fs::rename(d.super_dir + "/w.bak", d.super_dir + "/width.safetensors");
  fs::remove(meta);
  auto none = Supernet::Load(d.super_dir);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(none.status().message().find("calibration did not finish"), std::string::npos);
  EXPECT_FALSE(Supernet::Load(d.model_dir).ok());  // a plain model is not a supernet
}

// Rewrites a safetensors file with `edit` applied to its tensors (dtype per tensor kept as F32).
void RewriteTensors(const std::string& path,
                    const std::function<void(std::map<std::string, at::Tensor>&)>& edit) {
  auto f = testing::MustOk(SafetensorsFile::Open(path), "open");
  std::map<std::string, at::Tensor> t;
  for (const auto& n : f->names()) t[n] = testing::MustOk(f->GetF32(n), "read").clone();
  f.reset();
  edit(t);
  NamedTensors out(t.begin(), t.end());
  testing::MustOk(WriteSafetensors(path, out), "write");
}

// Changes the stored dtype string of one tensor in a safetensors header (same byte size).
void SetStoredDtype(const std::string& path, const std::string& name, const std::string& dtype) {
  const std::string bytes = testing::MustOk(ReadFile(path), "read");
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  auto header = nlohmann::json::parse(bytes.substr(8, n));
  header[name]["dtype"] = dtype;
  const std::string h = header.dump();
  const uint64_t m = h.size();
  std::string out(reinterpret_cast<const char*>(&m), 8);
  out += h + bytes.substr(8 + n);
  testing::MustOk(WriteFileAtomic(path, out), "write");
}

// Each of these corrupt supernets used to abort the server (SIGABRT) or be silently accepted
// (then serve empty text or fail every request). Each is now a clear error at load that names
// what is wrong, and the directory is intact afterwards for the next case.
TEST(SupernetTest, EveryCorruptPieceIsAClearLoadError) {
  SupernetOnDisk d;
  const std::string meta = d.super_dir + "/amoeba.json";
  const std::string config = d.super_dir + "/config.json";
  const std::string width = d.super_dir + "/width.safetensors";
  const std::string weights = d.super_dir + "/model.safetensors";
  const std::string good_meta = *ReadFile(meta), good_config = *ReadFile(config);
  const std::string good_width = *ReadFile(width), good_weights = *ReadFile(weights);
  auto restore = [&] {
    testing::MustOk(WriteFileAtomic(meta, good_meta), "restore");
    testing::MustOk(WriteFileAtomic(config, good_config), "restore");
    testing::MustOk(WriteFileAtomic(width, good_width), "restore");
    testing::MustOk(WriteFileAtomic(weights, good_weights), "restore");
  };
  auto expect_error = [&](const std::string& what, const std::string& needle) {
    auto s = Supernet::Load(d.super_dir);
    EXPECT_FALSE(s.ok()) << what << ": loaded";
    if (!s.ok()) {
      EXPECT_NE(s.status().message().find(needle), std::string::npos)
          << what << ": " << s.status().message();
    }
    restore();
    ASSERT_TRUE(Supernet::Load(d.super_dir).ok()) << "restored after " << what;
  };
  auto edit_meta = [&](const std::function<void(nlohmann::json&)>& f) {
    auto j = nlohmann::json::parse(good_meta);
    f(j);
    testing::MustOk(WriteFileAtomic(meta, j.dump()), "write");
  };
  auto edit_config = [&](const std::function<void(nlohmann::json&)>& f) {
    auto j = nlohmann::json::parse(good_config);
    f(j);
    testing::MustOk(WriteFileAtomic(config, j.dump()), "write");
  };
  const int64_t H = 64;

  SetStoredDtype(width, "width.1.layers.0.o_proj.bias", "I32");
  expect_error("bias stored as I32", "width.1.layers.0.o_proj.bias");
  RewriteTensors(width, [](auto& t) { t["width.1.layers.0.o_proj.bias"] = at::zeros({1}); });
  expect_error("bias of shape [1]", "width.1.layers.0.o_proj.bias");
  RewriteTensors(width, [](auto& t) { t["width.1.layers.2.down_proj.bias"] = at::zeros({2, 88}); });
  expect_error("bias of shape [2, 88]", "width.1.layers.2.down_proj.bias");
  RewriteTensors(width,
                 [&](auto& t) { t["width.1.layers.0.o_proj.bias"] = at::full({H}, std::nan("")); });
  expect_error("NaN bias", "NaN");
  edit_meta([](auto& j) { j["width_table"][1]["kv_groups"][0] = -1; });
  expect_error("kv_groups -1", "width_table[1].kv_groups[0]");
  edit_meta([](auto& j) { j["width_table"][1]["kv_groups"][0] = 0; });
  expect_error("zero kv groups", "width_table[1].kv_groups[0]");
  edit_meta([](auto& j) { j["width_table"][2]["channels"][3] = 0; });
  expect_error("zero channels", "width_table[2].channels[3]");
  edit_meta([](auto& j) { j["width_table"][2]["channels"][3] = "many"; });
  expect_error("channels not a number", "must be an integer");
  edit_meta([](auto& j) { j["width_table"][3]["channels"][0] = 96; });
  expect_error("widths not nested", "nested");
  edit_meta([](auto& j) { j["profile"][0]["decode_ms_per_token"] = "fast"; });
  expect_error("latency as text", "profile[0].decode_ms_per_token");
  edit_meta([](auto& j) { j["profile"][0]["depth"] = "six"; });
  expect_error("depth as text", "profile[0].depth");
  edit_meta([](auto& j) { j["profile"][0]["decode_ms_by_dtype"] = {{"q5_k", 1.0}}; });
  expect_error("draft timing of an unknown format", "decode_ms_by_dtype[\"q5_k\"]");
  edit_meta([](auto& j) { j["profile"][0]["decode_ms_by_dtype"] = {{"q8_0", -1.0}}; });
  expect_error("negative draft timing", "must be > 0");
  {  // A valid one round-trips.
    edit_meta([](auto& j) { j["profile"][0]["decode_ms_by_dtype"] = {{"q8_0", 0.25}}; });
    auto s = Supernet::Load(d.super_dir);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_DOUBLE_EQ((*s)->spec().profile[0].decode_ms_by_dtype.at("q8_0"), 0.25);
    EXPECT_EQ((*s)->spec().ToJson()["profile"][0]["decode_ms_by_dtype"]["q8_0"], 0.25);
    restore();
  }
  edit_meta([](auto& j) { j["profile"] = nlohmann::json::object(); });
  expect_error("profile an object", "profile");
  edit_meta([](auto& j) { j["profile"][0]["params"] = 12345; });
  expect_error("profile of another model", "parameters");
  edit_meta([](auto& j) {
    auto& layers = j["depth_table"][1]["layers"];
    layers[1] = layers[0];
  });
  expect_error("duplicate layers", "without repeats");
  edit_meta([](auto& j) { j["grid"]["widths"][0] = 0.9; });
  expect_error("grid without width 1", "grid.widths");
  edit_meta([](auto& j) { j["smol"] = "yes"; });
  expect_error("smol not an object", "smol");
  edit_config([](auto& j) { j["rope_theta"] = 0; });
  expect_error("rope_theta 0", "rope_theta");
  edit_config([](auto& j) { j["rms_norm_eps"] = -1e-5; });
  expect_error("negative eps", "rms_norm_eps");
  edit_config([](auto& j) { j["bos_token_id"] = 1000000; });
  expect_error("bos_token_id out of range", "bos_token_id");
  edit_config([](auto& j) { j["eos_token_id"] = -3; });
  expect_error("eos_token_id out of range", "eos_token_id");
  RewriteTensors(weights, [](auto& t) {
    t["model.layers.1.mlp.up_proj.weight"][3][4] = std::numeric_limits<float>::quiet_NaN();
  });
  expect_error("NaN weight", "model.layers.1.mlp.up_proj.weight");

  // Adapters named in amoeba.json but missing: an error, not an untuned server that says it is
  // tuned. And the reverse.
  edit_meta([](auto& j) { j["smol"] = {{"experts", 2}, {"rank", 4}}; });
  {
    auto s = Supernet::Load(d.super_dir);
    ASSERT_TRUE(s.ok());
    auto a = LoadAdapters(**s);
    EXPECT_EQ(a.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_NE(a.status().message().find("smol.safetensors is missing"), std::string::npos);
  }
  restore();
  {
    auto s = Supernet::Load(d.super_dir);
    ASSERT_TRUE(s.ok());
    Smol smol((*s)->base(), static_cast<int64_t>((*s)->spec().widths.size()), SmolConfig{}, 1);
    ASSERT_TRUE(smol.Save(d.super_dir + "/smol.safetensors").ok());
    EXPECT_FALSE(LoadAdapters(**s).ok());  // present, but amoeba.json names none
    fs::remove(d.super_dir + "/smol.safetensors");
    auto none = LoadAdapters(**s);
    ASSERT_TRUE(none.ok());
    EXPECT_EQ(none->get(), nullptr);
  }
}

// Choices of different lengths are scored in one padded batch; each must score as if alone: with
// the answer set to the best choice by a one-at-a-time reference the accuracy is 1, with the
// worst it is 0.
TEST(MetricsTest, MultipleChoiceScoresEveryChoiceAsIfAlone) {
  TempDir dir;
  ASSERT_TRUE(WriteByteTokenizer(dir.path()).ok());
  auto tok = LoadTokenizer(dir.path());
  ASSERT_TRUE(tok.ok());
  ModelConfig c = testing::TinyConfig();
  c.vocab_size = (*tok)->vocab_size();
  Model m = RandomModel(c, 5, 0.3);
  at::InferenceMode g;
  auto score = [&](const std::string& prompt, const std::string& choice) {
    std::vector<int64_t> seq = {m.config.bos_token_id};
    if (!prompt.empty())
      for (int32_t t : (*tok)->Encode(prompt)) seq.push_back(t);
    const size_t n = seq.size();
    std::vector<int32_t> cont = (*tok)->Encode(" " + choice);
    for (int32_t t : cont) seq.push_back(t);
    at::Tensor lp = at::log_softmax(TorchForward(m, at::tensor(seq).unsqueeze(0))[0], -1);
    double s = 0;
    for (size_t k = 0; k < cont.size(); ++k) s += lp[n - 1 + k][cont[k]].item<double>();
    return s;
  };
  std::vector<MultipleChoiceItem> best, worst;
  const std::vector<std::vector<std::string>> choices = {
      {"a", "bcdefgh", "ij"}, {"long choice here", "x", "mid one", "yy"}, {"q", "rs"}};
  for (size_t i = 0; i < choices.size(); ++i) {
    MultipleChoiceItem it{"prompt " + std::to_string(i), choices[i], 0};
    std::vector<double> s;
    for (const auto& c : choices[i]) s.push_back(score(it.prompt, c));
    it.answer = static_cast<int>(std::max_element(s.begin(), s.end()) - s.begin());
    best.push_back(it);
    it.answer = static_cast<int>(std::min_element(s.begin(), s.end()) - s.begin());
    worst.push_back(it);
  }
  EXPECT_EQ(MultipleChoiceAccuracy(m, **tok, best), 1.0);
  EXPECT_EQ(MultipleChoiceAccuracy(m, **tok, worst), 0.0);
  // "pmi" scoring: how much the prompt raises each choice's likelihood over BOS alone.
  std::vector<MultipleChoiceItem> pmi;
  int differs = 0;
  for (size_t i = 0; i < choices.size(); ++i) {
    MultipleChoiceItem it{"prompt " + std::to_string(i), choices[i], 0, true};
    std::vector<double> s;
    for (const auto& c : choices[i]) s.push_back(score(it.prompt, c) - score("", c));
    it.answer = static_cast<int>(std::max_element(s.begin(), s.end()) - s.begin());
    differs += it.answer != best[i].answer;
    pmi.push_back(it);
  }
  EXPECT_EQ(MultipleChoiceAccuracy(m, **tok, pmi), 1.0);
  if (differs > 0) {  // the two rules disagree somewhere: each must lose there under the other
    for (auto& it : pmi) it.unconditional_baseline = false;
    EXPECT_LT(MultipleChoiceAccuracy(m, **tok, pmi), 1.0);
  }
}

TEST(CalibrationDataTest, WindowsAreDeterministicAndJsonlWorks) {
  TempDir dir;
  ASSERT_TRUE(WriteByteTokenizer(dir.path()).ok());
  auto tok = LoadTokenizer(dir.path());
  std::string text;
  for (int i = 0; i < 50; ++i) text += "line " + std::to_string(i) + " of text. ";
  WindowOptions o{.num_windows = 5, .window_len = 16, .seed = 3, .bos_token_id = 1};
  at::Tensor a = *MakeWindows(text, **tok, o), b = *MakeWindows(text, **tok, o);
  EXPECT_TRUE(at::equal(a, b));
  EXPECT_EQ(a[2][0].item<int64_t>(), 1);
  o.seed = 4;
  EXPECT_FALSE(at::equal(a, *MakeWindows(text, **tok, o)));
  o.window_len = 100000;
  EXPECT_FALSE(MakeWindows(text, **tok, o).ok());
  std::ofstream(dir.file("d.jsonl")) << "{\"text\": \"hello\"}\n\n{\"text\": \"world\"}\n";
  EXPECT_EQ(*ReadCorpus(dir.file("d.jsonl")), "hello\nworld\n");
  std::ofstream(dir.file("bad.jsonl")) << "{\"txt\": 1}\n";
  auto bad = ReadCorpus(dir.file("bad.jsonl"));
  EXPECT_NE(bad.status().message().find("bad.jsonl:1"), std::string::npos);
  std::ofstream(dir.file("mc.jsonl")) << R"({"prompt": "2+2=", "choices": ["4", "5"], "answer": 0})"
                                      << "\n"
                                      << R"({"prompt": "x", "choices": ["a"], "answer": 0})"
                                      << "\n";
  EXPECT_FALSE(ReadMultipleChoice(dir.file("mc.jsonl")).ok());
  std::ofstream(dir.file("mc2.jsonl"))
      << R"({"prompt": "a", "choices": ["b", "c"], "answer": 1, "scoring": "pmi"})"
      << "\n";
  auto pmi = ReadMultipleChoice(dir.file("mc2.jsonl"));
  ASSERT_TRUE(pmi.ok()) << pmi.status();
  EXPECT_TRUE((*pmi)[0].unconditional_baseline);
  std::ofstream(dir.file("mc3.jsonl"))
      << R"({"prompt": "a", "choices": ["b", "c"], "answer": 1, "scoring": "bogus"})"
      << "\n";
  auto bogus = ReadMultipleChoice(dir.file("mc3.jsonl"));
  ASSERT_FALSE(bogus.ok());
  EXPECT_NE(bogus.status().message().find("scoring"), std::string::npos);
}

}  // namespace subnet_test
}  // namespace amoeba
