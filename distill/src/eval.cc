#include "distill/eval.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "absl/strings/str_format.h"
#include "distill/svg_plot.h"
#include "distill/tuner.h"
#include "model/file_util.h"
#include "model/packed_linear.h"
#include "model/progress.h"
#include "model/runtime.h"
#include "model/status_macros.h"
#include "subnet/calibration_data.h"
#include "subnet/frontier.h"
#include "subnet/latency_profile.h"
#include "subnet/speculation.h"
#include "subnet/subnet_builder.h"

namespace amoeba {
namespace fs = std::filesystem;

namespace {

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

}  // namespace

absl::StatusOr<nlohmann::json> EvaluateShapeQuality(const Supernet& s, const Smol* smol,
                                                    const std::vector<Shape>& shapes,
                                                    const at::Tensor& windows,
                                                    const ShapeQualityOptions& o,
                                                    std::vector<at::Tensor>* greedy_next) {
  nlohmann::json rows = nlohmann::json::array();
  Progress bar(o.label, static_cast<int64_t>(shapes.size()));
  for (const Shape& sh : shapes) {
    at::InferenceMode g;
    const double nll = HeldoutNll(s, smol, sh, windows);
    ASSIGN_OR_RETURN(Model m, BuildSubnet(s, smol, sh));
    nlohmann::json row = {{"depth", sh.depth},
                          {"width", sh.width},
                          {"params", m.config.ParameterCount()},
                          {"heldout_perplexity", std::exp(nll)}};
    const bool mc = !o.mc.empty() &&
                    (o.mc_shapes.empty() ||
                     std::find(o.mc_shapes.begin(), o.mc_shapes.end(), sh) != o.mc_shapes.end());
    if (mc) row["mc_accuracy"] = MultipleChoiceAccuracy(m, *s.tokenizer(), o.mc);
    if (o.format != WeightFormat::kF32) {
      ASSIGN_OR_RETURN(EngineComparison c, CompareFormat(s, smol, sh, o.format, windows));
      row["kl_to_fp32"] = c.mean_kl;
      row["engine_perplexity_fp32"] = std::exp(c.reference_nll);
      row["engine_perplexity"] = std::exp(c.test_nll);
    }
    rows.push_back(row);
    if (o.greedy && greedy_next) {
      ASSIGN_OR_RETURN(at::Tensor next,
                       GreedyNextTokens(std::make_shared<const Model>(std::move(m)), windows));
      greedy_next->push_back(std::move(next));
    }
    bar.Advance(1, sh.ToString());
  }
  bar.Finish();
  return rows;
}

absl::StatusOr<EvalReport> Evaluate(const EvalOptions& o) {
  ASSIGN_OR_RETURN(auto s, Supernet::Load(o.supernet));
  std::unique_ptr<Smol> smol;
  if (o.adapters) {
    ASSIGN_OR_RETURN(smol, LoadAdapters(*s));
  }
  ASSIGN_OR_RETURN(std::string text, ReadCorpus(o.data));
  WindowOptions wo{.num_windows = o.windows,
                   .window_len = o.window_len,
                   .seed = o.seed,
                   .bos_token_id = s->base().config.bos_token_id};
  ASSIGN_OR_RETURN(at::Tensor windows, MakeWindows(text, *s->tokenizer(), wo));
  ShapeQualityOptions qo;
  if (!o.mc_data.empty()) {
    ASSIGN_OR_RETURN(qo.mc, ReadMultipleChoice(o.mc_data));
  }
  qo.format = o.format;
  qo.greedy = true;
  std::vector<Shape> shapes = o.shapes.empty() ? s->GridShapes() : o.shapes;
  for (Shape& sh : shapes) {
    if (sh.depth == 0) sh.depth = s->base().config.num_hidden_layers;
    RETURN_IF_ERROR(s->Validate(sh));
  }
  std::vector<at::Tensor> greedy;  // per shape: its greedy next token at every window position
  ASSIGN_OR_RETURN(nlohmann::json rows,
                   EvaluateShapeQuality(*s, smol.get(), shapes, windows, qo, &greedy));
  // Latency as the server decodes: from packed panels. Views of the packed supernet have the
  // sizes of the merged copies, so they read the same bytes without holding a copy per shape.
  s->PackBaseWeights(o.format);
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
  if (o.draft_format) {
    std::vector<std::pair<Shape, std::shared_ptr<const Model>>> copies;
    for (auto& [sh, views] : runnable) {
      Model copy = *views;
      RepackWeights(copy, *o.draft_format);
      copies.emplace_back(sh, std::make_shared<const Model>(std::move(copy)));
    }
    runnable.clear();  // the views' engines are done
    LatencyOptions dlo;
    dlo.bandwidth_gbs = lo.bandwidth_gbs;
    draft_latency = ProfileDecodeLatency(copies, dlo);
    LogLatencyProfile(
        draft_latency,
        (std::string("eval ") + WeightFormatName(*o.draft_format) + " draft").c_str());
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
    if (o.draft_format) p->decode_ms_by_dtype[WeightFormatName(*o.draft_format)] = draft_ms(i);
    p->draft_runs.clear();
    for (size_t j = 0; j < shapes.size(); ++j)
      if (rows[j]["params"].get<int64_t>() < rows[i]["params"].get<int64_t>())
        p->draft_runs[shapes[j].ToString()] = DraftRunHistogram(greedy[i], greedy[j]);
  }
  s->set_spec(spec);
  RETURN_IF_ERROR(s->SaveMetadata(o.supernet));
  EvalReport report;
  report.rows = std::move(rows);
  report.shapes = shapes;
  report.spec = s->spec();
  report.adapters = smol != nullptr;
  for (size_t i = 0; i < shapes.size(); ++i) {
    report.decode_ms.push_back(latency[i].ms_per_token);
    report.draft_ms.push_back(draft_ms(i));
    report.check_extra_ms.push_back(latency[i].check_extra_ms);
  }
  report.svg = o.svg.empty() ? (fs::path(o.supernet) / "frontier.svg").string() : o.svg;
  RETURN_IF_ERROR(WriteFileAtomic(report.svg, FrontierSvg(report.rows, DescribeCpu())));
  return report;
}

}  // namespace amoeba
