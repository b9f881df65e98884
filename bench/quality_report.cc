// bench/quality's report: every finished stage's figures as quality.json, a Markdown summary
// (quality.md: tables per stage, mean ± half range over seeds, verdicts) and SVG figures.
#include <algorithm>
#include <cmath>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "bench/quality_bench.h"
#include "distill/svg_plot.h"
#include "model/status_macros.h"
#include "subnet/frontier.h"

namespace amoeba::bench {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct Stat {
  double mean = 0, spread = 0;  // spread: half the range over seeds
  int n = 0;
};
Stat Summarise(const std::vector<double>& v) {
  Stat s;
  s.n = static_cast<int>(v.size());
  if (v.empty()) return s;
  double lo = v[0], hi = v[0], sum = 0;
  for (double x : v) lo = std::min(lo, x), hi = std::max(hi, x), sum += x;
  s.mean = sum / v.size();
  s.spread = (hi - lo) / 2;
  return s;
}
std::string Fmt(const Stat& s, int decimals = 2) {
  if (s.n == 0) return "–";
  if (s.n == 1) return absl::StrFormat("%.*f", decimals, s.mean);
  return absl::StrFormat("%.*f ± %.*f", decimals, s.mean, decimals, s.spread);
}

std::string ShapeLabel(const json& r) {
  return absl::StrFormat("d%d w%g", r["depth"].get<int>(), r["width"].get<double>());
}

// Per shape label: the values of `key` over the seeds of `variant`.
std::map<std::string, std::vector<double>> BySeed(const std::vector<json>& runs,
                                                  const std::string& key) {
  std::map<std::string, std::vector<double>> out;
  for (const json& run : runs)
    for (const json& r : run["shapes"])
      if (r.contains(key)) out[ShapeLabel(r)].push_back(r[key].get<double>());
  return out;
}

// Writes OUT/<name>.svg and links it from the report.
absl::Status AddPlot(const Bench& b, const std::string& name, const PlotOptions& o,
                     const std::vector<PlotSeries>& series, std::string* md) {
  RETURN_IF_ERROR(
      WriteFileAtomic((fs::path(b.f.out) / (name + ".svg")).string(), SvgPlot(o, series)));
  absl::StrAppend(md, "\n![", name, "](", name, ".svg)\n\n");
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteQualityReport(const Bench& b) {
  json all = json::object();
  for (const auto& entry : fs::directory_iterator(b.stages)) {
    if (entry.path().extension() != ".json") continue;
    auto j = b.Done(entry.path().stem().string());
    if (j) all[entry.path().stem().string()] = *j;
  }
  std::map<std::string, std::vector<json>> tuned;  // variant → runs over seeds
  for (const auto& [name, j] : all.items())
    if (name.rfind("tune_", 0) == 0) tuned[j["variant"].get<std::string>()].push_back(j);
  std::string md = absl::StrFormat(
      "# bench/quality\n\nModel `%s`, corpus `%s`, machine: %s. Tuning: %d steps of %dx%d tokens, "
      "lr %g, seeds %s. Held-out: %d windows x %d tokens; cloze: %d items (held-out documents); "
      "values over seeds are mean ± half the range.\n\n",
      b.f.model, b.f.corpus, b.host, b.f.tune_steps, b.f.tune_batch, b.f.seq_len, b.f.lr,
      absl::StrJoin(b.f.seeds, ","), b.f.eval_windows, b.f.eval_window_len, b.mc.size());
  std::vector<std::string> files;

  // Depth.
  if (all.contains("depth_untuned")) {
    const json& du = all["depth_untuned"]["methods"];
    md += "## Depth (full width): held-out perplexity, before → after tuning (full method)\n\n";
    md += "| depth | " + absl::StrJoin(kDepthMethods, " | ") + " | cloze acc. before (" +
          absl::StrJoin(kDepthMethods, "/") + ") | cloze acc. after |\n|---|";
    for (size_t i = 0; i <= kDepthMethods.size() + 1; ++i) md += "---|";
    md += "\n";
    // Per method, the tuned run's values by shape over the seeds.
    std::map<std::string, std::map<std::string, std::vector<double>>> tuned_ppl_of, tuned_acc_of;
    for (const std::string& method : kDepthMethods) {
      const std::string variant = method == "dp" ? "full" : "depth_" + method;
      tuned_ppl_of[method] = BySeed(tuned[variant], "perplexity");
      tuned_acc_of[method] = BySeed(tuned[variant], "mc_accuracy");
    }
    std::vector<PlotSeries> plot;
    for (const std::string& method : kDepthMethods) {
      PlotSeries before(method + " untuned", true, true), after(method + " tuned");
      before.color = after.color = static_cast<int>(plot.size() / 2);
      for (const json& r : du[method])
        before.points.push_back({r["depth"].get<double>(), r["perplexity"].get<double>(), ""});
      const auto& tuned_ppl = tuned_ppl_of[method];
      for (const json& r : du[method]) {
        auto it = tuned_ppl.find(ShapeLabel(r));
        if (it != tuned_ppl.end())
          after.points.push_back({r["depth"].get<double>(), Summarise(it->second).mean, ""});
      }
      plot.push_back(before);
      after.in_legend = !after.points.empty();  // empty until the tuning stages ran
      plot.push_back(after);
    }
    for (size_t i = 0; i < du["dp"].size(); ++i) {
      const json& r = du["dp"][i];
      md += absl::StrFormat("| %d |", r["depth"].get<int>());
      std::vector<std::string> acc, acc_after;
      for (const std::string& method : kDepthMethods) {
        const json& m = du[method][i];
        const auto& tuned_ppl = tuned_ppl_of[method];
        auto it = tuned_ppl.find(ShapeLabel(m));
        md += absl::StrFormat(" %.2f → %s |", m["perplexity"].get<double>(),
                              it == tuned_ppl.end() ? "–" : Fmt(Summarise(it->second)));
        acc.push_back(m.contains("mc_accuracy")
                          ? absl::StrFormat("%.3f", m["mc_accuracy"].get<double>())
                          : "–");
        const auto& tuned_acc = tuned_acc_of[method];
        auto at = tuned_acc.find(ShapeLabel(m));
        acc_after.push_back(at == tuned_acc.end() ? "–" : Fmt(Summarise(at->second), 3));
      }
      md += " " + absl::StrJoin(acc, " / ") + " | " + absl::StrJoin(acc_after, " / ") + " |\n";
    }
    if (all.contains("calibrate")) {
      md +=
          "\nLayer sets (removed layers per depth):\n\n| depth | dp | drop_last | block_influence "
          "| dp_accuracy |\n|---|---|---|---|---|\n";
      const int L = all["calibrate"]["layers"].get<int>();
      auto removed = [&](const json& layers) {
        std::vector<int> out;
        std::vector<int> keep = layers.get<std::vector<int>>();
        for (int l = 0; l < L; ++l)
          if (std::find(keep.begin(), keep.end(), l) == keep.end()) out.push_back(l);
        return "{" + absl::StrJoin(out, ",") + "}";
      };
      for (const json& row : all["calibrate"]["depth_table"]) {
        std::string acc_layers = "–";
        if (all.contains("depth_dp_accuracy"))
          for (const json& a : all["depth_dp_accuracy"]["depth_table"])
            if (a["depth"] == row["depth"]) acc_layers = removed(a["layers"]);
        md += absl::StrFormat("| %d | %s | %s | %s | %s |\n", row["depth"].get<int>(),
                              removed(row["dp"]["layers"]), removed(row["drop_last"]["layers"]),
                              removed(row["block_influence"]["layers"]), acc_layers);
      }
    }
    PlotOptions po;
    po.title = "Depth selection: held-out perplexity at full width";
    po.x_label = "depth (layers kept)";
    po.y_label = "held-out perplexity";
    RETURN_IF_ERROR(AddPlot(b, "depth", po, plot, &md));
  }

  // Width.
  if (all.contains("width")) {
    const json& series = all["width"]["series"];
    md += "## Width (full depth, before tuning): held-out perplexity at equal parameter counts\n\n";
    const json& width = all["width"];
    if (width.contains("calibration")) {
      const json& c = width["calibration"];
      md += absl::StrFormat(
          "Statistics from %d calibration windows x %d tokens (%d tokens, %s); layer "
          "sensitivities on the first %d, single-unit removals on the first %d.\n\n",
          c["windows"].get<int64_t>(), c["window_len"].get<int64_t>(), c["tokens"].get<int64_t>(),
          c["window_bos"].get<bool>() ? "a BOS at every window start" : "no BOS at window starts",
          c["dp_windows"].get<int64_t>(), c.value("unit_windows", int64_t{0}));
    }
    std::vector<std::string> names;
    for (const auto& [name, _] : series.items()) names.push_back(name);
    // Rows: scores and allocations; columns: the grid's ratios (flap_global's parameter counts;
    // uniform widths round per layer, so theirs differ a little and are given where they do).
    const json& ref = series["flap_global"];
    md += "| scores_allocation |";
    for (size_t i = 0; i < ref.size(); ++i)
      md += absl::StrFormat(" w%g (%.2fM) |", ref[i]["width"].get<double>(),
                            ref[i]["params"].get<double>() / 1e6);
    md += "\n|---|";
    for (size_t i = 0; i < ref.size(); ++i) md += "---|";
    md += "\n";
    for (const auto& n : names) {
      md += "| " + n + " |";
      for (size_t i = 0; i < ref.size() && i < series[n].size(); ++i) {
        const json& p = series[n][i];
        const bool other = std::abs(p["params"].get<double>() - ref[i]["params"].get<double>()) >
                           0.005 * ref[i]["params"].get<double>();
        md += absl::StrFormat(
            " %.2f%s |", p["perplexity"].get<double>(),
            other ? absl::StrFormat(" (%.2fM)", p["params"].get<double>() / 1e6) : "");
      }
      md += "\n";
    }
    md += "\n";
    if (width.contains("redundancy")) {
      const json& r = width["redundancy"];
      md += absl::StrFormat(
          "Redundancy signature: removing each layer's quarter of MLP channels of the smallest "
          "weight norm (compensated, attention intact) takes held-out perplexity from %.2f to "
          "%.2f (%+.1f%%).\n\n",
          r["full_perplexity"].get<double>(),
          r["mlp_quarter_by_magnitude_perplexity"].get<double>(),
          100 * (r["mlp_quarter_by_magnitude_perplexity"].get<double>() /
                     r["full_perplexity"].get<double>() -
                 1));
    }
    if (width.contains("rank_correlations")) {
      md +=
          "Each score against the measured calibration loss of removing one unit alone "
          "(compensated), Spearman's rank correlation over the units of every layer (higher is "
          "better):\n\n| score | KV groups | MLP channels |\n|---|---|---|\n";
      for (const auto& [kind, r] : width["rank_correlations"].items()) {
        md += absl::StrFormat("| %s | %.3f (%d units) | %.3f (%d units) |\n", kind,
                              r["attention_groups"]["spearman"].get<double>(),
                              r["attention_groups"]["units"].get<int64_t>(),
                              r["mlp_channels"]["spearman"].get<double>(),
                              r["mlp_channels"]["units"].get<int64_t>());
      }
      md += "\n";
    }
    std::vector<PlotSeries> plot;
    for (const auto& n : names) {
      PlotSeries ps(n, true, n.find("no_bias") != std::string::npos);
      for (const json& r : series[n])
        ps.points.push_back(
            {r["params"].get<double>() / 1e6, r["perplexity"].get<double>(),
             n == "flap_global" ? absl::StrFormat("w%g", r["width"].get<double>()) : ""});
      plot.push_back(ps);
    }
    PlotOptions po;
    po.title = "Width pruning before tuning (full depth)";
    po.x_label = "parameters (millions)";
    po.y_label = "held-out perplexity";
    RETURN_IF_ERROR(AddPlot(b, "width", po, plot, &md));
  }

  // Tuning objective over the grid.
  const std::vector<std::string> objectives = {"full", "single_lora", "no_distill", "no_balancing"};
  if (all.contains("untuned_grid") || !tuned["full"].empty()) {
    md += "## Tuning objective (every grid shape, equal steps, data and seeds)\n\n";
    md +=
        "| objective | grid mean ppl | worst shape ppl | full shape ppl | smallest ppl | "
        "cloze acc. full / middle / smallest |\n|---|---|---|---|---|---|\n";
    std::vector<PlotSeries> plot;
    auto row_for = [&](const std::string& name, const std::vector<json>& runs) {
      std::vector<double> means, worsts;
      for (const json& run : runs) {
        double sum = 0, worst = 0;
        for (const json& r : run["shapes"]) {
          sum += r["perplexity"].get<double>();
          worst = std::max(worst, r["perplexity"].get<double>());
        }
        means.push_back(sum / run["shapes"].size());
        worsts.push_back(worst);
      }
      auto ppl = BySeed(runs, "perplexity");
      auto acc = BySeed(runs, "mc_accuracy");
      const Shape full = b.supernet->FullShape(), mid = MiddleShape(*b.supernet),
                  small = b.supernet->SmallestShape();
      auto label = [](const Shape& s) { return absl::StrFormat("d%d w%g", s.depth, s.width); };
      md += absl::StrFormat("| %s | %s | %s | %s | %s | %s / %s / %s |\n", name,
                            Fmt(Summarise(means)), Fmt(Summarise(worsts)),
                            Fmt(Summarise(ppl[label(full)])), Fmt(Summarise(ppl[label(small)])),
                            Fmt(Summarise(acc[label(full)]), 3), Fmt(Summarise(acc[label(mid)]), 3),
                            Fmt(Summarise(acc[label(small)]), 3));
      // Every shape as a marker, and the objective's quality-per-parameter frontier as a line
      // in the same colour.
      const int color = static_cast<int>(plot.size() / 2);
      PlotSeries front(name + " (frontier)"), every(name, /*join=*/false);
      front.color = every.color = color;
      every.in_legend = false;
      std::vector<FrontierPoint> points;
      for (const json& r : runs.front()["shapes"]) {
        const double mean_ppl = Summarise(ppl[ShapeLabel(r)]).mean;
        const double params = r["params"].get<double>();
        every.points.push_back({params / 1e6, mean_ppl, name == "full" ? ShapeLabel(r) : ""});
        points.push_back({params, -mean_ppl});
      }
      for (size_t i : ParetoFrontier(points))
        front.points.push_back({every.points[i].x, every.points[i].y, ""});
      plot.push_back(front);
      plot.push_back(every);
    };
    for (const std::string& o : objectives)
      if (!tuned[o].empty()) row_for(o, tuned[o]);
    if (all.contains("untuned_grid")) row_for("untuned", {all["untuned_grid"]});
    PlotOptions po;
    po.title = "Tuning objectives: held-out perplexity of every grid shape (mean over seeds)";
    po.x_label = "parameters (millions)";
    po.y_label = "held-out perplexity";
    po.point_labels = true;
    RETURN_IF_ERROR(AddPlot(b, "objective", po, plot, &md));
    // Per-shape table.
    md += "Per shape (held-out perplexity):\n\n| shape | params |";
    for (const std::string& o : objectives)
      if (!tuned[o].empty()) md += " " + o + " |";
    md += " untuned |\n|---|---|";
    for (const std::string& o : objectives)
      if (!tuned[o].empty()) md += "---|";
    md += "---|\n";
    if (all.contains("untuned_grid")) {
      for (const json& r : all["untuned_grid"]["shapes"]) {
        md += absl::StrFormat("| %s | %.2fM |", ShapeLabel(r), r["params"].get<double>() / 1e6);
        for (const std::string& o : objectives)
          if (!tuned[o].empty())
            md += " " + Fmt(Summarise(BySeed(tuned[o], "perplexity")[ShapeLabel(r)])) + " |";
        md += absl::StrFormat(" %.2f |\n", r["perplexity"].get<double>());
      }
    }
    md += "\n";
  }

  // One for all vs one for each.
  if (!tuned["alone_smallest"].empty() || !tuned["alone_middle"].empty()) {
    md +=
        "## One for all vs one for each (same optimizer steps)\n\n| shape | supernet (full "
        "method) | one LoRA for this shape alone | untuned |\n|---|---|---|---|\n";
    for (const std::string v : {"alone_smallest", "alone_middle"}) {
      if (tuned[v].empty()) continue;
      const json& r0 = tuned[v].front()["shapes"][0];
      const std::string label = ShapeLabel(r0);
      std::string untuned = "–";
      if (all.contains("untuned_grid"))
        for (const json& r : all["untuned_grid"]["shapes"])
          if (ShapeLabel(r) == label)
            untuned = absl::StrFormat("%.2f", r["perplexity"].get<double>());
      md += absl::StrFormat("| %s | %s | %s | %s |\n", label,
                            Fmt(Summarise(BySeed(tuned["full"], "perplexity")[label])),
                            Fmt(Summarise(BySeed(tuned[v], "perplexity")[label])), untuned);
    }
    md += "\n";
  }
  json meta = {{"model", b.f.model},
               {"corpus", b.f.corpus},
               {"machine", b.host},
               {"seeds", b.f.seeds},
               {"tune_steps", b.f.tune_steps},
               {"tune_batch", b.f.tune_batch},
               {"seq_len", b.f.seq_len},
               {"lr", b.f.lr},
               {"eval_windows", b.f.eval_windows},
               {"eval_window_len", b.f.eval_window_len},
               {"mc_items", b.mc.size()},
               {"stages", all}};
  RETURN_IF_ERROR(WriteFileAtomic((fs::path(b.f.out) / "quality.json").string(), meta.dump(1)));
  return WriteFileAtomic((fs::path(b.f.out) / "quality.md").string(), md);
}

}  // namespace amoeba::bench
