#include "subnet/calibrate.h"

#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/gguf_model.h"
#include "model/gguf_tokenizer.h"
#include "model/model_loader.h"
#include "model/progress.h"
#include "model/status_macros.h"
#include "subnet/calibration_data.h"
#include "subnet/metrics.h"

namespace amoeba {
namespace fs = std::filesystem;
using nlohmann::json;

std::vector<ShapeRecord> StaticProfile(const Supernet& s) {
  std::vector<ShapeRecord> out;
  for (const Shape& sh : s.GridShapes()) {
    auto m = s.Extract(sh);
    if (!m.ok()) continue;
    ShapeRecord r;
    r.shape = sh;
    r.params = m->config.ParameterCount();
    out.push_back(r);
  }
  return out;
}

absl::StatusOr<SupernetBuild> BuildSupernet(Model model, const at::Tensor& windows,
                                            const at::Tensor& dp_windows, const CalibrateOptions& o,
                                            const DepthMetric* custom_metric,
                                            const std::string& dp_state_path) {
  at::InferenceMode guard;
  const int64_t L = model.config.num_hidden_layers;
  if (o.widths.empty() || std::abs(o.widths.front() - 1.0) > 1e-9)
    return absl::InvalidArgumentError("--widths: must start with 1");
  for (size_t i = 1; i < o.widths.size(); ++i)
    if (!(o.widths[i] < o.widths[i - 1] && o.widths[i] > 0))
      return absl::InvalidArgumentError("--widths: must be strictly decreasing and positive");
  if (!(o.min_depth_ratio > 0 && o.min_depth_ratio <= 1))
    return absl::InvalidArgumentError("--min-depth-ratio: must be in (0, 1]");
  const int64_t d_min =
      std::max<int64_t>(o.keep_last, static_cast<int64_t>(std::ceil(o.min_depth_ratio * L - 1e-9)));

  // 1. Width: statistics, scores, permutation, allocation.
  ActivationStats stats;
  {
    Progress bar("width statistics", windows.size(0));
    stats = CollectActivationStats(model, windows, o.batch, &bar);
  }
  ASSIGN_OR_RETURN(const WidthScoring scoring, ParseWidthScoring(o.width_scores));
  LayerSensitivity sensitivity;
  if (scoring == WidthScoring::kRemoval) {
    Progress bar("layer sensitivities", 1 + 2 * L);
    sensitivity = MeasureSensitivity(model, stats, dp_windows, o.batch, &bar);
    for (int64_t l = 0; l < L; ++l)
      spdlog::info(
          "calibrate: layer {} sensitivity attention {:.4g} mlp {:.4g} (NLL per unit of "
          "removal error)",
          l, sensitivity.attention[l], sensitivity.mlp[l]);
  }
  WidthScores scores = ComputeWidthScores(model, stats, scoring, &sensitivity);
  PermuteByScore(model, scores, stats);
  SupernetSpec spec;
  spec.widths = o.widths;
  for (double w : o.widths) {
    spec.width_table.push_back(
        {w, o.uniform_width ? AllocateUniform(model, w) : AllocateGlobal(model, scores, w)});
  }
  for (int64_t d = d_min; d <= L; ++d) spec.depths.push_back(d);

  // 2. Depth: DP and baselines on the (function-identical) permuted model.
  DepthMetric ppl;
  ppl.name = "perplexity";
  ppl.eval = [&](const std::vector<int>& active) {
    return Perplexity(model.WithLayers(active), dp_windows, o.batch);
  };
  const DepthMetric& metric = custom_metric ? *custom_metric : ppl;
  spec.metric = metric.name;
  DepthSearchOptions dso;
  dso.num_layers = L;
  dso.min_depth = d_min;
  dso.keep_last = o.keep_last;
  dso.state_path = dp_state_path;
  dso.fingerprint = absl::StrCat(ModelConfigToJson(model.config).dump(), "|", o.data_path, "|",
                                 o.windows, "|", o.window_len, "|", o.dp_windows, "|", o.seed, "|",
                                 metric.name, "|", o.keep_last, "|", o.window_bos);
  ASSIGN_OR_RETURN(spec.depth_table, DpDepthSearch(dso, metric));
  const std::vector<double> bi = BlockInfluence(model, dp_windows, o.batch);
  {
    Progress bar("depth baselines", static_cast<int64_t>(spec.depth_table.size()));
    for (auto& e : spec.depth_table) {
      auto last = DropLastLayers(L, e.depth, o.keep_last);
      auto bil = BlockInfluenceLayers(bi, e.depth, o.keep_last);
      e.baselines["drop_last"] = {last, last == e.layers ? e.metric : metric.eval(last)};
      e.baselines["block_influence"] = {bil, bil == e.layers ? e.metric : metric.eval(bil)};
      bar.Advance();
    }
  }
  spec.calibration = {{"data", o.data_path},
                      {"windows", o.windows},
                      {"window_len", o.window_len},
                      {"window_bos", o.window_bos},
                      {"statistics_tokens", stats.tokens},
                      {"dp_windows", o.dp_windows},
                      {"seed", o.seed},
                      {"keep_last", o.keep_last},
                      {"min_depth", d_min},
                      {"uniform_width", o.uniform_width},
                      {"width_scores", o.width_scores},
                      {"metric", metric.name},
                      {"block_influence", bi}};
  std::string table =
      absl::StrFormat("%-6s %-14s %-14s %-16s  %s\n", "depth", ("dp " + metric.name).c_str(),
                      "drop_last", "block_influence", "dp layers");
  for (auto it = spec.depth_table.rbegin(); it != spec.depth_table.rend(); ++it) {
    std::string layers;
    for (int l : it->layers) absl::StrAppend(&layers, layers.empty() ? "" : ",", l);
    table += absl::StrFormat("%-6d %-14.4f %-14.4f %-16.4f  [%s]\n", it->depth, it->metric,
                             it->baselines["drop_last"].second,
                             it->baselines["block_influence"].second, layers);
  }
  SupernetBuild out;
  out.supernet =
      std::make_unique<Supernet>(std::move(model), std::move(spec), stats.o_mean, stats.down_mean);
  SupernetSpec s = out.supernet->spec();
  s.profile = StaticProfile(*out.supernet);
  out.supernet->set_spec(std::move(s));
  out.table = std::move(table);
  return out;
}

absl::StatusOr<std::unique_ptr<Supernet>> Calibrate(const CalibrateOptions& o) {
  if (fs::exists(fs::path(o.out_dir) / "amoeba.json") && !o.force) {
    return absl::FailedPreconditionError(
        absl::StrCat(o.out_dir, " already holds a supernet (use --force to overwrite)"));
  }
  const bool gguf = IsGgufPath(o.model_dir);
  ASSIGN_OR_RETURN(Model model, LoadModelOrGguf(o.model_dir));
  if (gguf && !model.config.uniform_width())
    return absl::InvalidArgumentError(absl::StrCat(
        o.model_dir, ": per-layer widths (a pruned model); calibrate needs the full model"));
  ASSIGN_OR_RETURN(auto tok, LoadModelTokenizer(o.model_dir, o.tokenizer_dir));
  ASSIGN_OR_RETURN(std::string text, ReadCorpus(o.data_path));
  WindowOptions wo;
  wo.num_windows = o.windows;
  wo.window_len = o.window_len;
  wo.seed = o.seed;
  wo.bos_token_id = o.window_bos ? model.config.bos_token_id : -1;
  ASSIGN_OR_RETURN(at::Tensor windows, MakeWindows(text, *tok, wo));
  if (o.dp_windows < 1 || o.dp_windows > o.windows)
    return absl::InvalidArgumentError("--dp-windows: must be in [1, --windows]");
  at::Tensor dp_windows = windows.narrow(0, 0, o.dp_windows);

  std::unique_ptr<DepthMetric> acc;
  std::vector<MultipleChoiceItem> items;
  if (o.metric == "accuracy") {
    if (o.mc_data.empty()) return absl::InvalidArgumentError("--metric accuracy needs --mc-data");
    ASSIGN_OR_RETURN(items, ReadMultipleChoice(o.mc_data));
  } else if (o.metric != "perplexity") {
    return absl::InvalidArgumentError("--metric: perplexity or accuracy");
  }
  std::error_code ec;
  fs::create_directories(o.out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", o.out_dir, ": ", ec.message()));
  fs::remove(fs::path(o.out_dir) / "amoeba.json",
             ec);  // marks the directory incomplete until the end
  spdlog::info(
      "calibrate: {} layers; width statistics on {} windows x {} tokens = {} tokens of {} "
      "({}), depth search on {} of them",
      model.config.num_hidden_layers, o.windows, o.window_len, o.windows * o.window_len,
      o.data_path, o.window_bos ? "each window starts with a BOS" : "no BOS at window starts",
      o.dp_windows);
  const std::string dtype = model.config.torch_dtype;
  if (!items.empty()) {
    // Evaluated on the unpermuted model: permutation preserves the function.
    acc = std::make_unique<DepthMetric>();
    acc->name = "accuracy";
    acc->higher_is_better = true;
    acc->eval = [&](const std::vector<int>& active) {
      return MultipleChoiceAccuracy(model.WithLayers(active), *tok, items);
    };
  }
  Model work = model;  // shares storage; permutation replaces tensors, leaving `model` intact
  ASSIGN_OR_RETURN(SupernetBuild b,
                   BuildSupernet(std::move(work), windows, dp_windows, o, acc.get(),
                                 (fs::path(o.out_dir) / "depth_search_state.json").string()));
  at::ScalarType st = dtype == "bfloat16"  ? at::kBFloat16
                      : dtype == "float16" ? at::kHalf
                                           : at::kFloat;
  RETURN_IF_ERROR(SaveModel(b.supernet->base(), o.out_dir, st));
  if (gguf && o.tokenizer_dir.empty()) {
    RETURN_IF_ERROR(WriteGgufTokenizer(o.model_dir, o.out_dir));
  } else {
    RETURN_IF_ERROR(
        CopyTokenizerFiles(o.tokenizer_dir.empty() ? o.model_dir : o.tokenizer_dir, o.out_dir));
  }
  RETURN_IF_ERROR(
      b.supernet->SaveMetadata(o.out_dir));  // amoeba.json last: the directory is complete
  std::fprintf(stdout, "%s", b.table.c_str());
  spdlog::info("calibrate: wrote supernet {}", o.out_dir);
  return Supernet::Load(o.out_dir);
}

}  // namespace amoeba
