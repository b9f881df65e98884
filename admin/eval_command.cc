// amoeba-admin eval: every grid shape (or a list) on held-out text: perplexity, optional
// multiple-choice accuracy, parameters, decode tokens/s on this host. Writes the figures into the
// supernet's per-shape profile, prints a table and draws the quality-vs-latency frontier (SVG).
#include <spdlog/spdlog.h>

#include <filesystem>
#include <fstream>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "admin/commands.h"
#include "distill/tuner.h"
#include "model/engine.h"
#include "model/file_util.h"
#include "model/packed_linear.h"
#include "model/progress.h"
#include "model/runtime.h"
#include "model/status_macros.h"
#include "subnet/calibration_data.h"
#include "subnet/frontier.h"
#include "subnet/latency_profile.h"
#include "subnet/metrics.h"
#include "subnet/speculation.h"
#include "subnet/subnet_builder.h"
#include "subnet/svg_plot.h"

namespace amoeba::admin {
namespace fs = std::filesystem;

namespace {

struct EvalFlags {
  std::string supernet, data, mc_data, shapes, svg;
  int64_t windows = 16, window_len = 128;
  uint64_t seed = 1;
  int threads = 0;
  bool no_adapters = false;
  std::string weights_dtype = "f32";
  std::string draft_weights_dtype;  // also time every shape as a draft copy in this format
};

// Every shape by decode latency and held-out perplexity, labelled "d<depth> w<width>", with the
// frontier drawn as a line.
std::string FrontierSvg(const nlohmann::json& rows, const std::string& host) {
  PlotSeries all("every shape", /*join=*/false), front("frontier (nothing faster is better)");
  for (const auto& r : rows) {
    PlotPoint p{r["decode_ms_per_token"].get<double>(), r["heldout_perplexity"].get<double>(),
                absl::StrFormat("d%d w%g", r["depth"].get<int>(), r["width"].get<double>())};
    if (r.value("frontier", false)) front.points.push_back(p);
    all.points.push_back(std::move(p));
  }
  // The frontier in ascending cost; the labels are on the other series already.
  std::sort(front.points.begin(), front.points.end(),
            [](const PlotPoint& a, const PlotPoint& b) { return a.x < b.x; });
  for (auto& p : front.points) p.label.clear();
  PlotOptions o;
  o.title = "Quality against decode latency, every shape";
  o.x_label = "decode ms/token, batch 1 (" + host + ")";
  o.y_label = "held-out perplexity (lower is better)";
  return SvgPlot(o, {all, front});
}

// The shape decoded by the engine from panels of `format` (the subnet's own blocks, as a merged
// copy or an export packs them) against the engine in fp32, on the held-out windows.
absl::StatusOr<EngineComparison> CompareFormat(const Supernet& s, const Smol* smol, const Shape& sh,
                                               WeightFormat format, const at::Tensor& windows) {
  SubnetOptions so;
  so.adapters = smol ? AdapterMode::kMerged : AdapterMode::kNone;
  ASSIGN_OR_RETURN(Model fp32, BuildSubnet(s, smol, sh, so));
  DropPanels(fp32);
  Model packed = fp32;
  PackWeights(packed, format);
  return CompareEngines(std::make_shared<const Model>(std::move(fp32)),
                        std::make_shared<const Model>(std::move(packed)), windows);
}

absl::Status RunEval(const EvalFlags& f) {
  InitRuntime(f.threads);
  auto format = ParseWeightFormat(f.weights_dtype);
  if (!format.ok())
    return absl::InvalidArgumentError(absl::StrCat("--", format.status().message()));
  const auto draft_parsed = ParseDraftFormat(f.draft_weights_dtype, *format);
  if (!draft_parsed.ok())
    return absl::InvalidArgumentError(absl::StrCat("--", draft_parsed.status().message()));
  const std::optional<WeightFormat> draft_format = *draft_parsed;
  ASSIGN_OR_RETURN(auto s, Supernet::Load(f.supernet));
  std::unique_ptr<Smol> smol;
  if (!f.no_adapters) {
    ASSIGN_OR_RETURN(smol, LoadAdapters(*s));
  }
  ASSIGN_OR_RETURN(std::string text, ReadCorpus(f.data));
  WindowOptions wo{.num_windows = f.windows,
                   .window_len = f.window_len,
                   .seed = f.seed,
                   .bos_token_id = s->base().config.bos_token_id};
  ASSIGN_OR_RETURN(at::Tensor windows, MakeWindows(text, *s->tokenizer(), wo));
  std::vector<MultipleChoiceItem> mc;
  if (!f.mc_data.empty()) {
    ASSIGN_OR_RETURN(mc, ReadMultipleChoice(f.mc_data));
  }
  std::vector<Shape> shapes;
  if (f.shapes.empty()) {
    shapes = s->GridShapes();
  } else {
    for (auto part : absl::StrSplit(f.shapes, ';', absl::SkipEmpty())) {
      ASSIGN_OR_RETURN(Shape sh,
                       Shape::Parse(std::string(part), s->base().config.num_hidden_layers));
      RETURN_IF_ERROR(s->Validate(sh));
      shapes.push_back(sh);
    }
  }
  nlohmann::json rows = nlohmann::json::array();
  std::vector<at::Tensor> greedy;  // per shape: its greedy next token at every window position
  Progress bar("eval", static_cast<int64_t>(shapes.size()));
  for (const Shape& sh : shapes) {
    at::InferenceMode g;
    const double nll = HeldoutNll(*s, smol.get(), sh, windows);
    ASSIGN_OR_RETURN(Model m, BuildSubnet(*s, smol.get(), sh));
    nlohmann::json row = {{"depth", sh.depth},
                          {"width", sh.width},
                          {"params", m.config.ParameterCount()},
                          {"heldout_perplexity", std::exp(nll)}};
    if (!mc.empty()) row["mc_accuracy"] = MultipleChoiceAccuracy(m, *s->tokenizer(), mc);
    if (*format != WeightFormat::kF32) {
      ASSIGN_OR_RETURN(EngineComparison c, CompareFormat(*s, smol.get(), sh, *format, windows));
      row["kl_to_fp32"] = c.mean_kl;
      row["engine_perplexity_fp32"] = std::exp(c.reference_nll);
      row["engine_perplexity"] = std::exp(c.test_nll);
    }
    rows.push_back(row);
    ASSIGN_OR_RETURN(at::Tensor next,
                     GreedyNextTokens(std::make_shared<const Model>(std::move(m)), windows));
    greedy.push_back(std::move(next));
    bar.Advance(1, sh.ToString());
  }
  bar.Finish();
  // Latency as the server decodes: from packed panels. Views of the packed supernet have the
  // sizes of the merged copies, so they read the same bytes without holding a copy per shape.
  s->PackBaseWeights(*format);
  std::vector<std::pair<Shape, std::shared_ptr<const Model>>> runnable;
  for (const Shape& sh : shapes) {
    ASSIGN_OR_RETURN(Model m, s->Extract(sh));
    runnable.emplace_back(sh, std::make_shared<const Model>(std::move(m)));
  }
  LatencyOptions lo;
  lo.bandwidth_gbs = MeasureReadBandwidthGBs(256, 2);
  lo.check_tokens = 4;  // what checking drafted tokens costs each shape
  const std::vector<ShapeLatency> latency = ProfileDecodeLatency(runnable, lo);
  LogLatencyProfile(latency, "eval");
  // Drafts reading their own copy in another format (the server's --draft-weights-dtype).
  std::vector<ShapeLatency> draft_latency;
  if (draft_format) {
    std::vector<std::pair<Shape, std::shared_ptr<const Model>>> copies;
    for (auto& [sh, views] : runnable) {
      Model copy = *views;
      RepackWeights(copy, *draft_format);
      copies.emplace_back(sh, std::make_shared<const Model>(std::move(copy)));
    }
    runnable.clear();  // the views' engines are done
    LatencyOptions dlo;
    dlo.bandwidth_gbs = lo.bandwidth_gbs;
    draft_latency = ProfileDecodeLatency(copies, dlo);
    LogLatencyProfile(draft_latency,
                      (std::string("eval ") + WeightFormatName(*draft_format) + " draft").c_str());
  }
  auto draft_ms = [&](size_t j) {
    return draft_latency.empty() ? latency[j].ms_per_token : draft_latency[j].ms_per_token;
  };
  std::vector<FrontierPoint> points;
  for (size_t i = 0; i < rows.size(); ++i) {
    rows[i]["decode_ms_per_token"] = latency[i].ms_per_token;
    rows[i]["predicted_ms_per_token"] = latency[i].predicted_ms;
    rows[i]["fitted_ms_per_token"] = latency[i].fitted_ms;
    rows[i]["latency_outlier"] = latency[i].outlier;
    rows[i]["frontier"] = false;
    points.push_back({latency[i].ms_per_token, -rows[i]["heldout_perplexity"].get<double>()});
  }
  for (size_t i : ParetoFrontier(points)) rows[i]["frontier"] = true;
  // Merge into the profile.
  SupernetSpec spec = s->spec();
  for (const auto& r : rows) {
    const Shape sh{r["depth"].get<int64_t>(), r["width"].get<double>()};
    ShapeRecord* p = spec.FindRecord(sh);
    if (!p) {
      ShapeRecord fresh;
      fresh.shape = sh;
      spec.profile.push_back(fresh);
      p = &spec.profile.back();
    }
    p->params = r["params"].get<int64_t>();
    p->heldout_perplexity = r["heldout_perplexity"].get<double>();
    p->decode_ms_per_token = r["decode_ms_per_token"].get<double>();
    p->decode_ms_by_dtype.clear();
    if (r.contains("mc_accuracy")) p->mc_accuracy = r["mc_accuracy"].get<double>();
    p->adapters = smol != nullptr;
  }
  // Speculative decoding: every smaller shape as a draft for every shape.
  for (size_t i = 0; i < shapes.size(); ++i) {
    ShapeRecord* p = spec.FindRecord(shapes[i]);
    p->check_ms_per_extra_token = latency[i].check_extra_ms;
    if (draft_format) p->decode_ms_by_dtype[WeightFormatName(*draft_format)] = draft_ms(i);
    p->draft_runs.clear();
    for (size_t j = 0; j < shapes.size(); ++j)
      if (rows[j]["params"].get<int64_t>() < rows[i]["params"].get<int64_t>())
        p->draft_runs[shapes[j].ToString()] = DraftRunHistogram(greedy[i], greedy[j]);
  }
  s->set_spec(spec);
  RETURN_IF_ERROR(s->SaveMetadata(f.supernet));
  const bool quantized = *format != WeightFormat::kF32;
  const std::string fmt_name = WeightFormatName(*format);
  if (quantized)
    std::printf(
        "%s against fp32, the engine on the same windows (perplexity change, mean "
        "per-token KL divergence):\n",
        fmt_name.c_str());
  std::printf(
      "%-6s %-7s %-12s %-12s %-14s %-10s %-12s %s%s\n", "depth", "width", "params", "perplexity",
      "decode ms/tok", "fitted", "roofline ms",
      quantized
          ? absl::StrFormat("%-10s %-12s %-12s ", "ppl f32", "ppl " + fmt_name, "KL to f32").c_str()
          : "",
      mc.empty() ? "" : "mc acc");
  for (const auto& r : rows) {
    std::printf(
        "%-6d %-7g %-12lld %-12.3f %-14.3f %-10.3f %-12.3f %s%s%s%s\n", r["depth"].get<int>(),
        r["width"].get<double>(), static_cast<long long>(r["params"].get<int64_t>()),
        r["heldout_perplexity"].get<double>(), r["decode_ms_per_token"].get<double>(),
        r["fitted_ms_per_token"].get<double>(), r["predicted_ms_per_token"].get<double>(),
        quantized
            ? absl::StrFormat("%-10.3f %-12.3f %-12.5f ", r["engine_perplexity_fp32"].get<double>(),
                              r["engine_perplexity"].get<double>(), r["kl_to_fp32"].get<double>())
                  .c_str()
            : "",
        r.contains("mc_accuracy") ? absl::StrFormat("%.3f", r["mc_accuracy"].get<double>()).c_str()
                                  : "",
        r["frontier"].get<bool>() ? "  *frontier" : "",
        r["latency_outlier"].get<bool>() ? "  (latency outlier)" : "");
  }
  // The draft eval would pick per shape on this host (the server picks with its own timings).
  std::printf(
      "speculative decoding (greedy agreement on the held-out windows%s):\n",
      draft_format
          ? (std::string(", drafts read ") + WeightFormatName(*draft_format) + " copies").c_str()
          : "");
  std::printf("%-22s %-22s %-3s %-12s %s\n", "target", "best draft", "k", "kept/check",
              "expected speedup");
  for (size_t i = 0; i < shapes.size(); ++i) {
    auto costs = [&](const Shape& t, const Shape& d) -> std::optional<DraftCosts> {
      (void)t;
      for (size_t j = 0; j < shapes.size(); ++j)
        if (shapes[j] == d)
          return DraftCosts{latency[i].ms_per_token, draft_ms(j), latency[i].check_extra_ms};
      return std::nullopt;
    };
    auto c = ChooseDraft(spec, shapes[i], costs, 0.0);
    if (!c) continue;
    std::printf("%-22s %-22s %-3lld %-12.2f %.2fx%s\n", shapes[i].ToString().c_str(),
                c->draft.ToString().c_str(), static_cast<long long>(c->tokens), c->expected_kept,
                c->expected_speedup,
                c->expected_speedup < 1.3 ? " (below the server's default 1.3)" : "");
  }
  const std::string svg = f.svg.empty() ? (fs::path(f.supernet) / "frontier.svg").string() : f.svg;
  RETURN_IF_ERROR(WriteFileAtomic(svg, FrontierSvg(rows, DescribeCpu())));
  spdlog::info("eval: {} shapes{}; profile updated; frontier plot {}", rows.size(),
               smol ? " with adapters" : "", svg);
  return absl::OkStatus();
}
}  // namespace

Runner AddEvalCommand(CLI::App& app) {
  auto f = std::make_shared<EvalFlags>();
  CLI::App* cmd =
      app.add_subcommand("eval", "Quality, size and speed of every shape; updates the profile");
  cmd->add_option("--supernet", f->supernet, "Supernet directory")->required();
  cmd->add_option("--data", f->data, "Held-out text (.txt or .jsonl with \"text\")")->required();
  cmd->add_option("--mc-data", f->mc_data, "Multiple-choice JSONL");
  cmd->add_option("--shapes", f->shapes, "Shapes 'depth=D,width=W;...' (default: the grid)");
  cmd->add_option("--windows", f->windows)->capture_default_str();
  cmd->add_option("--window-len", f->window_len)->capture_default_str();
  cmd->add_option("--seed", f->seed)->capture_default_str();
  cmd->add_option("--svg", f->svg, "Frontier plot (default SUPERNET/frontier.svg)");
  cmd->add_flag("--no-adapters", f->no_adapters, "Evaluate without smol.safetensors");
  cmd->add_option("--weights-dtype", f->weights_dtype,
                  "f32 | f16 | q8_0 | q4_0: also decode every shape from panels of this format, "
                  "print its perplexity and mean per-token KL divergence to fp32, and time it")
      ->capture_default_str();
  cmd->add_option("--draft-weights-dtype", f->draft_weights_dtype,
                  "Also time every shape as a draft reading its own copy in this format (the "
                  "server's --draft-weights-dtype) and choose drafts with those costs");
  cmd->add_option("--threads", f->threads);
  return [f]() {
    absl::Status st = RunEval(*f);
    if (!st.ok()) spdlog::error("eval: {}", st.ToString());
    return ExitCodeFor(st);
  };
}

}  // namespace amoeba::admin
