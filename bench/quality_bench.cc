// amoeba-bench-quality: what each part of the method buys, at equal budgets, on one model.
//
// Stages (each one's result is a JSON file under OUT/stages/; a rerun skips finished stages and a
// killed tuning run resumes from its checkpoint under OUT/work/):
//   calibrate       the supernet as `amoeba-admin calibrate` builds it (its default width
//                   scores), DP depth table (perplexity) and its baselines
//   depth_dp_accuracy   the DP again with the cloze multiple-choice metric (calibration items)
//   width           before tuning, full depth, every grid ratio: FLAP, weight-magnitude and
//                   removal-error scores, each with the global allocation and with the same
//                   fraction in every layer, with and without bias compensation; each score's
//                   rank correlation with the measured loss of removing single units; the
//                   model's redundancy signature
//   depth_untuned   every grid depth at full width: DP / drop-last / block-influence / DP-accuracy
//   tune_<v>_s<seed>  one tuning run and its evaluation: v = full (SMoL + in-place distillation +
//                   balancing), single_lora, no_distill, no_balancing, the full method on the
//                   depth tables of drop_last / block_influence / dp_accuracy, and alone_smallest /
//                   alone_middle (one LoRA for that shape only, same optimizer steps)
// After every stage the report (OUT/quality.json, OUT/quality.md, OUT/*.svg) is rewritten from all
// finished stages, so a partial run already shows what it has.
#include <signal.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "bench/bench_flags.h"
#include "bench/bench_util.h"
#include "distill/eval.h"
#include "distill/svg_plot.h"
#include "distill/tuner.h"
#include "model/file_util.h"
#include "model/gguf_model.h"
#include "model/model_loader.h"
#include "model/progress.h"
#include "model/runtime.h"
#include "model/status_macros.h"
#include "subnet/calibrate.h"
#include "subnet/calibration_data.h"
#include "subnet/depth_search.h"
#include "subnet/frontier.h"
#include "subnet/metrics.h"
#include "subnet/subnet_builder.h"
#include "subnet/width_importance.h"

#include "bench/quality_bench.h"

namespace amoeba::bench {
namespace fs = std::filesystem;
using nlohmann::json;

Shape MiddleShape(const Supernet& s) {
  const auto& d = s.spec().depths;
  const auto& w = s.spec().widths;
  return {d[d.size() / 2], w[w.size() / 2]};
}

namespace {

std::atomic<bool> g_stop{false};
void OnSignal(int) {
  g_stop = true;
}

json ShapeJson(const Shape& sh, int64_t params, double ppl) {
  return {{"depth", sh.depth}, {"width", sh.width}, {"params", params}, {"perplexity", ppl}};
}

// ---- stages -----------------------------------------------------------------------------------

absl::Status StageCalibrate(Bench& b) {
  const fs::path dir = b.work / "supernet";
  if (!fs::exists(dir / "amoeba.json")) {
    CalibrateOptions o;
    o.model_dir = b.f.model;
    o.data_path = (fs::path(b.f.corpus) / "calib.txt").string();
    o.out_dir = dir.string();
    o.windows = b.f.calib_windows;
    o.window_len = b.f.calib_window_len;
    o.window_bos = b.f.calib_bos;
    o.dp_windows = b.f.dp_windows;
    o.force = true;
    ASSIGN_OR_RETURN(auto s, Calibrate(o));
  }
  ASSIGN_OR_RETURN(b.supernet, Supernet::Load(dir.string()));
  if (b.Done("calibrate")) return absl::OkStatus();
  json depth = json::array();
  for (const DepthEntry& e : b.supernet->spec().depth_table) {
    json row = {{"depth", e.depth}, {"dp", {{"layers", e.layers}, {"calib_perplexity", e.metric}}}};
    for (const auto& [name, v] : e.baselines)
      row[name] = {{"layers", v.first}, {"calib_perplexity", v.second}};
    depth.push_back(row);
  }
  return b.Finish("calibrate", {{"depth_table", depth},
                                {"params", b.supernet->base().config.ParameterCount()},
                                {"layers", b.supernet->base().config.num_hidden_layers},
                                {"block_influence", b.supernet->spec().calibration.value(
                                                        "block_influence", json::array())}});
}

absl::Status StageDpAccuracy(Bench& b) {
  if (b.Done("depth_dp_accuracy")) return absl::OkStatus();
  const Model& m = b.supernet->base();
  const Tokenizer& tok = *b.supernet->tokenizer();
  DepthMetric acc;
  acc.name = "accuracy";
  acc.higher_is_better = true;
  acc.eval = [&](const std::vector<int>& active) {
    return MultipleChoiceAccuracy(m.WithLayers(active), tok, b.dp_mc);
  };
  DepthSearchOptions o;
  o.num_layers = m.config.num_hidden_layers;
  o.min_depth = b.supernet->spec().depths.front();
  o.keep_last = b.supernet->spec().calibration.value("keep_last", 1);
  o.state_path = (b.work / "dp_accuracy_state.json").string();
  o.fingerprint = absl::StrCat("dp_accuracy|", b.dp_mc.size(), "|", b.f.model);
  ASSIGN_OR_RETURN(std::vector<DepthEntry> table, DpDepthSearch(o, acc));
  json rows = json::array();
  for (const auto& e : table)
    rows.push_back({{"depth", e.depth}, {"layers", e.layers}, {"calib_accuracy", e.metric}});
  return b.Finish("depth_dp_accuracy", {{"depth_table", rows}, {"items", b.dp_mc.size()}});
}

// The calibrated supernet with another depth method's layer sets in its depth table.
absl::StatusOr<std::unique_ptr<Supernet>> WithDepthMethod(const Bench& b,
                                                          const std::string& method) {
  ASSIGN_OR_RETURN(auto s, Supernet::Load((b.work / "supernet").string()));
  if (method == "dp") return s;
  SupernetSpec spec = s->spec();
  std::optional<json> accuracy = b.Done("depth_dp_accuracy");
  for (DepthEntry& e : spec.depth_table) {
    if (method == "dp_accuracy") {
      if (!accuracy) return absl::FailedPreconditionError("depth_dp_accuracy has not run");
      for (const auto& row : (*accuracy)["depth_table"])
        if (row["depth"].get<int64_t>() == e.depth)
          e.layers = row["layers"].get<std::vector<int>>();
    } else {
      auto it = e.baselines.find(method);
      if (it == e.baselines.end())
        return absl::InvalidArgumentError("unknown depth method " + method);
      e.layers = it->second.first;
    }
  }
  s->set_spec(spec);
  return s;
}

// Spearman's rank correlation (average ranks for ties).
double RankCorrelation(const std::vector<double>& x, const std::vector<double>& y) {
  auto ranks = [](const std::vector<double>& v) {
    std::vector<size_t> order(v.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return v[a] < v[b]; });
    std::vector<double> r(v.size());
    for (size_t i = 0; i < order.size();) {
      size_t j = i;
      while (j + 1 < order.size() && v[order[j + 1]] == v[order[i]]) ++j;
      for (size_t k = i; k <= j; ++k) r[order[k]] = 0.5 * static_cast<double>(i + j);
      i = j + 1;
    }
    return r;
  };
  const std::vector<double> rx = ranks(x), ry = ranks(y);
  const double n = static_cast<double>(x.size());
  const double mx = std::accumulate(rx.begin(), rx.end(), 0.0) / n;
  const double my = std::accumulate(ry.begin(), ry.end(), 0.0) / n;
  double sxy = 0, sxx = 0, syy = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    sxy += (rx[i] - mx) * (ry[i] - my);
    sxx += (rx[i] - mx) * (rx[i] - mx);
    syy += (ry[i] - my) * (ry[i] - my);
  }
  return sxx > 0 && syy > 0 ? sxy / std::sqrt(sxx * syy) : 0.0;
}

const std::vector<std::string> kWidthScores = {"flap", "magnitude", "removal"};

absl::Status StageWidth(Bench& b) {
  if (b.Done("width")) return absl::OkStatus();
  ASSIGN_OR_RETURN(Model original, LoadModelOrGguf(b.f.model));
  ASSIGN_OR_RETURN(std::string text, ReadCorpus((fs::path(b.f.corpus) / "calib.txt").string()));
  WindowOptions wo{.num_windows = b.f.calib_windows,
                   .window_len = b.f.calib_window_len,
                   .seed = 0,
                   .bos_token_id = b.f.calib_bos ? original.config.bos_token_id : -1};
  ASSIGN_OR_RETURN(at::Tensor windows, MakeWindows(text, *b.supernet->tokenizer(), wo));
  const at::Tensor dp_windows = windows.narrow(0, 0, std::min(b.f.dp_windows, windows.size(0)));
  const at::Tensor unit_windows =
      windows.narrow(0, 0, std::min(b.f.width_unit_windows, windows.size(0)));
  at::InferenceMode guard;
  const ActivationStats stats = CollectActivationStats(original, windows, 4);
  auto clone_stats = [](const ActivationStats& s) {
    ActivationStats c;
    for (const auto& t : s.o_mean) c.o_mean.push_back(t.clone());
    for (const auto& t : s.o_var) c.o_var.push_back(t.clone());
    for (const auto& t : s.down_mean) c.down_mean.push_back(t.clone());
    for (const auto& t : s.down_var) c.down_var.push_back(t.clone());
    for (const auto& t : s.o_cov) c.o_cov.push_back(t.clone());
    c.tokens = s.tokens;
    return c;
  };
  const int64_t L = original.config.num_hidden_layers;
  LayerSensitivity sensitivity;
  {
    Progress bar("layer sensitivities", 1 + 2 * L);
    sensitivity = MeasureSensitivity(original, stats, dp_windows, 4, &bar);
  }

  // Every unit's measured loss when removed alone (compensated), against each score.
  struct Unit {
    int layer;
    int64_t index;
    bool attention;
    double delta_nll = 0;
  };
  std::vector<Unit> units;
  std::mt19937_64 rng(7);
  for (int l = 0; l < L; ++l) {
    const int64_t groups = original.layers[l].kv_heads(original.config.head_dim);
    for (int64_t g = 0; g < groups; ++g) units.push_back({l, g, true});
    const int64_t channels = original.layers[l].intermediate();
    std::vector<int64_t> all(channels);
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    for (int64_t i = 0; i < std::min(b.f.width_units, channels); ++i)
      units.push_back({l, all[i], false});
  }
  {
    Progress bar("single-unit removals", static_cast<int64_t>(units.size()));
    const double base = MeanNll(original, unit_windows, 4);
    for (Unit& u : units) {
      at::Tensor idx = at::tensor({u.index}, at::kLong);
      if (u.attention) idx = KvGroupChannels(original.config, idx);
      const double nll =
          NllWithUnitsRemoved(original, stats, unit_windows, 4, u.layer,
                              u.attention ? idx : at::Tensor(), u.attention ? at::Tensor() : idx);
      u.delta_nll = nll - base;
      bar.Advance();
    }
  }
  // The redundancy signature: held-out perplexity with every layer's quarter of MLP channels of
  // the smallest weight norm removed (inputs at their means), attention intact. A model far from
  // trained loses little.
  json redundancy;
  {
    UnitRemoval quarter;
    for (int l = 0; l < L; ++l) {
      const at::Tensor norms = original.layers[l].down.pow(2).sum(0);
      quarter.down_channels.push_back(
          std::get<1>(norms.sort(true, 0, false)).narrow(0, 0, norms.numel() / 4));
    }
    redundancy = {{"full_perplexity", std::exp(MeanNll(original, b.heldout, 8))},
                  {"mlp_quarter_by_magnitude_perplexity",
                   std::exp(NllWithUnitsRemoved(original, stats, b.heldout, 8, quarter))}};
    spdlog::info("quality: redundancy {}", redundancy.dump());
  }
  json correlations = json::object();
  for (const std::string& kind : kWidthScores) {
    ASSIGN_OR_RETURN(const WidthScoring scoring, ParseWidthScoring(kind));
    const WidthScores sc = ComputeWidthScores(original, stats, scoring, &sensitivity);
    json row = json::object();
    for (const bool attention : {true, false}) {
      std::vector<double> score, loss;
      for (const Unit& u : units) {
        if (u.attention != attention) continue;
        const at::Tensor& t = attention ? sc.group[u.layer] : sc.channel[u.layer];
        score.push_back(t[u.index].item<double>());
        loss.push_back(u.delta_nll);
      }
      row[attention ? "attention_groups" : "mlp_channels"] = {
          {"units", score.size()}, {"spearman", RankCorrelation(score, loss)}};
    }
    correlations[kind] = row;
  }

  const std::vector<double>& widths = b.supernet->spec().widths;
  json series = json::object();
  Progress bar("width ablation", static_cast<int64_t>(kWidthScores.size()) * 2 * 2 *
                                     static_cast<int64_t>(widths.size()));
  for (const std::string& scores_kind : kWidthScores) {
    Model m = original;                       // shares storage; the permutation replaces tensors
    ActivationStats st = clone_stats(stats);  // the permutation reorders it
    ASSIGN_OR_RETURN(const WidthScoring scoring, ParseWidthScoring(scores_kind));
    WidthScores scores = ComputeWidthScores(m, st, scoring, &sensitivity);
    PermuteByScore(m, scores, st);
    // Uniform with either score separates which units a layer keeps from how many.
    const std::vector<std::string> allocations = {"global", "uniform"};
    for (const std::string& allocation : allocations) {
      SupernetSpec spec;
      spec.depths = {L};
      spec.widths = widths;
      DepthEntry full;
      full.depth = L;
      for (int l = 0; l < L; ++l) full.layers.push_back(l);
      spec.depth_table = {full};
      for (double w : widths)
        spec.width_table.push_back(
            {w, allocation == "global" ? AllocateGlobal(m, scores, w) : AllocateUniform(m, w)});
      for (const bool bias : {true, false}) {
        std::vector<at::Tensor> o_mean = st.o_mean, down_mean = st.down_mean;
        if (!bias) {
          for (auto& t : o_mean) t = at::zeros_like(t);
          for (auto& t : down_mean) t = at::zeros_like(t);
        }
        Supernet s(m, spec, o_mean, down_mean);
        const std::string name = absl::StrCat(scores_kind, "_", allocation, bias ? "" : "_no_bias");
        json points = json::array();
        for (size_t wi = 0; wi < widths.size(); ++wi) {
          const double w = widths[wi];
          ASSIGN_OR_RETURN(Model sub, s.Extract({L, w}));
          const double ppl = std::exp(MeanNll(sub, b.heldout, 8));
          json point = ShapeJson({L, w}, sub.config.ParameterCount(), ppl);
          const WidthAllocation& a = spec.width_table[wi].alloc;
          point["kv_groups"] = a.kv_groups;
          point["channels"] = a.channels;
          points.push_back(point);
          bar.Advance(1, name);
        }
        series[name] = points;
      }
    }
  }
  bar.Finish();
  return b.Finish("width", {{"series", series},
                            {"redundancy", redundancy},
                            {"rank_correlations", correlations},
                            {"sensitivity",
                             {{"attention", sensitivity.attention},
                              {"mlp", sensitivity.mlp},
                              {"base_nll", sensitivity.base_nll}}},
                            {"calibration",
                             {{"windows", b.f.calib_windows},
                              {"window_len", b.f.calib_window_len},
                              {"window_bos", b.f.calib_bos},
                              {"tokens", stats.tokens},
                              {"dp_windows", dp_windows.size(0)},
                              {"unit_windows", unit_windows.size(0)}}}});
}

// Held-out perplexity of every grid shape (and cloze accuracy of `mc_shapes`) of `s` with `smol`:
// eval's own loop (distill/eval.h).
absl::StatusOr<json> EvaluateShapes(const Bench& b, const Supernet& s, const Smol* smol,
                                    const std::vector<Shape>& shapes,
                                    const std::vector<Shape>& mc_shapes, const std::string& label) {
  ShapeQualityOptions o;
  o.label = label;
  if (!mc_shapes.empty()) {
    o.mc = b.mc;
    o.mc_shapes = mc_shapes;
  }
  ASSIGN_OR_RETURN(json rows, EvaluateShapeQuality(s, smol, shapes, b.heldout, o));
  for (json& r : rows) {  // this report's name for it
    r["perplexity"] = r["heldout_perplexity"];
    r.erase("heldout_perplexity");
  }
  return rows;
}

absl::Status StageDepthUntuned(Bench& b) {
  if (b.Done("depth_untuned")) return absl::OkStatus();
  json methods = json::object();
  const double full_width = 1.0;
  for (const std::string& method : kDepthMethods) {
    ASSIGN_OR_RETURN(auto s, WithDepthMethod(b, method));
    std::vector<Shape> shapes;
    for (int64_t d : s->spec().depths) shapes.push_back({d, full_width});
    ASSIGN_OR_RETURN(methods[method],
                     EvaluateShapes(b, *s, nullptr, shapes, shapes, "depth " + method));
  }
  return b.Finish("depth_untuned", {{"methods", methods}});
}

struct TuneVariant {
  std::string name;
  std::string depth_method = "dp";
  bool single_lora = false, distill = true, balancing = true;
  std::string alone;  // "", "smallest" or "middle"
};

std::vector<TuneVariant> TuneVariants() {
  //       name                     depth table        single  distill balance alone
  return {{"full", "dp", false, true, true, ""},
          {"single_lora", "dp", true, true, true, ""},
          {"no_distill", "dp", false, false, true, ""},
          {"no_balancing", "dp", false, true, false, ""},
          {"depth_drop_last", "drop_last", false, true, true, ""},
          {"depth_block_influence", "block_influence", false, true, true, ""},
          {"depth_dp_accuracy", "dp_accuracy", false, true, true, ""},
          {"alone_smallest", "dp", true, false, true, "smallest"},
          {"alone_middle", "dp", true, false, true, "middle"}};
}

absl::Status StageTune(Bench& b, const TuneVariant& v, uint64_t seed) {
  const std::string name = absl::StrCat("tune_", v.name, "_s", seed);
  if (b.Done(name)) return absl::OkStatus();
  ASSIGN_OR_RETURN(auto s, WithDepthMethod(b, v.depth_method));
  if (!b.train) {
    const ModelConfig& c = s->base().config;
    ASSIGN_OR_RETURN(b.train, TrainData::Load((fs::path(b.f.corpus) / "train.txt").string(),
                                              *s->tokenizer(), c.bos_token_id, c.eos_token_ids[0]));
  }
  SmolConfig sc;
  if (v.single_lora) sc.experts = 1, sc.top_k = 1;
  Smol smol(s->base(), static_cast<int64_t>(s->spec().widths.size()), sc, seed);
  TuneOptions o;
  o.loop.steps = b.f.tune_steps;
  o.batch = b.f.tune_batch;
  o.seq_len = b.f.seq_len;
  o.loop.lr = b.f.lr;
  o.loop.seed = seed;
  o.distill = v.distill;
  o.balancing = v.balancing;
  if (v.alone == "smallest") o.only_shape = s->SmallestShape();
  if (v.alone == "middle") o.only_shape = MiddleShape(*s);
  o.loop.checkpoint = (b.work / (name + ".ckpt.safetensors")).string();
  o.loop.checkpoint_every = 20;
  o.loop.resume = true;
  o.loop.metrics_log = (b.work / (name + ".metrics.jsonl")).string();
  spdlog::info("quality: {} ({} steps of {}x{} tokens, depth table {})", name, o.loop.steps,
               o.batch, o.seq_len, v.depth_method);
  const auto start = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(TuneResult r, Tune(*s, smol, *b.train, o, &g_stop));
  if (r.interrupted)
    return absl::CancelledError(absl::StrCat(name, " interrupted at step ", r.step));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::vector<Shape> shapes = s->GridShapes();
  std::vector<Shape> mc_shapes = {s->FullShape(), MiddleShape(*s), s->SmallestShape()};
  // The method's run also at every depth at full width, so the depth table compares like with
  // like after tuning.
  if (v.name == "full")
    for (int64_t d : s->spec().depths)
      if (d != s->FullShape().depth) mc_shapes.push_back({d, 1.0});
  if (o.only_shape) shapes = mc_shapes = {*o.only_shape};
  if (v.depth_method != "dp") {
    // Depth ablation: every depth at full width, as depth_untuned.
    shapes.clear();
    for (int64_t d : s->spec().depths) shapes.push_back({d, 1.0});
    mc_shapes = shapes;
  }
  ASSIGN_OR_RETURN(json rows, EvaluateShapes(b, *s, &smol, shapes, mc_shapes, "eval " + name));
  return b.Finish(name, {{"variant", v.name},
                         {"seed", seed},
                         {"depth_method", v.depth_method},
                         {"steps", o.loop.steps},
                         {"tune_seconds", seconds},
                         {"final_loss_full", r.loss_full},
                         {"final_loss_smallest", r.loss_smallest},
                         {"shapes", rows}});
}

absl::Status StageUntunedGrid(Bench& b) {
  if (b.Done("untuned_grid")) return absl::OkStatus();
  const Supernet& s = *b.supernet;
  std::vector<Shape> mc_shapes = {s.FullShape(), MiddleShape(s), s.SmallestShape()};
  ASSIGN_OR_RETURN(json rows, EvaluateShapes(b, s, nullptr, s.GridShapes(), mc_shapes, "untuned"));
  return b.Finish("untuned_grid", {{"shapes", rows}});
}

// ---- report -----------------------------------------------------------------------------------

absl::Status Run(Flags& f) {
  InitRuntime(f.threads);
  Bench b;
  b.f = f;
  b.stages = fs::path(f.out) / "stages";
  b.work = fs::path(f.out) / "work";
  b.host = DescribeCpu();
  std::error_code ec;
  fs::create_directories(b.stages, ec);
  fs::create_directories(b.work, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", f.out, ": ", ec.message()));
  for (const char* file :
       {"train.txt", "calib.txt", "heldout.txt", "cloze.jsonl", "cloze-calib.jsonl"})
    if (!fs::exists(fs::path(f.corpus) / file))
      return absl::InvalidArgumentError(absl::StrCat("--corpus: no ", file, " in ", f.corpus,
                                                     " (scripts/quality-corpus writes them)"));
  if (f.seeds.empty()) return absl::InvalidArgumentError("--seeds: need at least one");
  RETURN_IF_ERROR(StageCalibrate(b));
  ASSIGN_OR_RETURN(std::string heldout, ReadCorpus((fs::path(f.corpus) / "heldout.txt").string()));
  WindowOptions wo{.num_windows = f.eval_windows,
                   .window_len = f.eval_window_len,
                   .seed = 1,
                   .bos_token_id = b.supernet->base().config.bos_token_id};
  ASSIGN_OR_RETURN(b.heldout, MakeWindows(heldout, *b.supernet->tokenizer(), wo));
  ASSIGN_OR_RETURN(b.mc, ReadMultipleChoice((fs::path(f.corpus) / "cloze.jsonl").string()));
  ASSIGN_OR_RETURN(b.dp_mc,
                   ReadMultipleChoice((fs::path(f.corpus) / "cloze-calib.jsonl").string()));
  if (static_cast<int64_t>(b.mc.size()) > f.mc_items) b.mc.resize(f.mc_items);
  if (static_cast<int64_t>(b.dp_mc.size()) > f.dp_mc_items) b.dp_mc.resize(f.dp_mc_items);
  if (f.report_only) return WriteQualityReport(b);

  std::vector<std::pair<std::string, std::function<absl::Status()>>> stages = {
      {"width", [&] { return StageWidth(b); }},
      {"depth_dp_accuracy", [&] { return StageDpAccuracy(b); }},
      {"depth_untuned", [&] { return StageDepthUntuned(b); }},
      {"untuned_grid", [&] { return StageUntunedGrid(b); }}};
  for (uint64_t seed : f.seeds)
    for (const TuneVariant& v : TuneVariants())
      stages.push_back({"tune", [&b, v, seed] { return StageTune(b, v, seed); }});
  Progress overall("bench/quality stages", static_cast<int64_t>(stages.size()) + 1, 1);
  RETURN_IF_ERROR(WriteQualityReport(b));
  for (const std::string& name : f.only_stages)
    if (std::none_of(stages.begin(), stages.end(),
                     [&](const auto& st) { return st.first == name; }))
      return absl::InvalidArgumentError(
          absl::StrCat("--stages: no stage ", name,
                       " (width, depth_dp_accuracy, depth_untuned, untuned_grid, tune)"));
  for (auto& [name, stage] : stages) {
    if (!f.only_stages.empty() &&
        std::find(f.only_stages.begin(), f.only_stages.end(), name) == f.only_stages.end()) {
      overall.Advance();
      continue;
    }
    RETURN_IF_ERROR(stage());
    RETURN_IF_ERROR(WriteQualityReport(b));
    overall.Advance();
    if (g_stop) return absl::CancelledError("stopped; rerun to continue");
  }
  overall.Finish();
  auto md = ReadFile((fs::path(f.out) / "quality.md").string());
  if (md.ok()) std::printf("%s", md->c_str());
  spdlog::info("quality: report in {}/quality.md", f.out);
  return absl::OkStatus();
}

}  // namespace
}  // namespace amoeba::bench

int main(int argc, char** argv) {
  using amoeba::bench::Flags;
  Flags f;
  CLI::App app{"bench/quality: the method's ablations at equal budgets (see bench/README.md)"};
  app.add_option("--model", f.model, "HF model directory (bench/quality builds the preset)")
      ->required();
  app.add_option("--corpus", f.corpus, "Directory from scripts/quality-corpus")->required();
  app.add_option("--out", f.out, "Results directory (stages resume from here)")
      ->capture_default_str();
  app.add_option("--seeds", f.seeds, "Tuning seeds")->delimiter(',')->capture_default_str();
  app.add_option("--tune-steps", f.tune_steps)->capture_default_str();
  app.add_option("--tune-batch", f.tune_batch)->capture_default_str();
  app.add_option("--seq-len", f.seq_len)->capture_default_str();
  app.add_option("--lr", f.lr)->capture_default_str();
  app.add_option("--calib-windows", f.calib_windows)->capture_default_str();
  app.add_option("--calib-window-len", f.calib_window_len)->capture_default_str();
  app.add_option("--dp-windows", f.dp_windows)->capture_default_str();
  app.add_flag("--calib-bos", f.calib_bos, "A BOS at every calibration window's start");
  app.add_option("--width-units", f.width_units,
                 "MLP channels per layer removed one by one for the rank correlations")
      ->capture_default_str();
  app.add_option("--width-unit-windows", f.width_unit_windows,
                 "Calibration windows the single-unit removals are measured on")
      ->capture_default_str();
  app.add_option("--stages", f.only_stages,
                 "Only these stages (width, depth_dp_accuracy, depth_untuned, untuned_grid, tune); "
                 "calibrate always runs")
      ->delimiter(',');
  app.add_option("--eval-windows", f.eval_windows)->capture_default_str();
  app.add_option("--eval-window-len", f.eval_window_len)->capture_default_str();
  app.add_option("--mc-items", f.mc_items, "Cloze items for evaluation")->capture_default_str();
  app.add_option("--dp-mc-items", f.dp_mc_items, "Cloze items for the accuracy DP")
      ->capture_default_str();
  app.add_option("--threads", f.threads);
  app.add_flag("--report-only", f.report_only, "Rewrite the report from finished stages");
  if (const std::optional<int> exit_code = amoeba::bench::ParseFlags(app, argc, argv))
    return *exit_code;
  signal(SIGINT, amoeba::bench::OnSignal);
  signal(SIGTERM, amoeba::bench::OnSignal);
  absl::Status st = amoeba::bench::Run(f);
  if (!st.ok()) {
    spdlog::error("quality: {}", st.ToString());
    return st.code() == absl::StatusCode::kCancelled         ? 130
           : st.code() == absl::StatusCode::kInvalidArgument ? 2
                                                             : 1;
  }
  return 0;
}
