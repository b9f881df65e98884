// amoeba-admin eval: every grid shape (or a list) on held-out text: perplexity, optional
// multiple-choice accuracy, parameters, decode tokens/s on this host. Writes the figures into the
// supernet's per-shape profile, prints a table and draws the quality-vs-latency frontier (SVG).
#include <spdlog/spdlog.h>

#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "admin/commands.h"
#include "distill/eval.h"
#include "model/runtime.h"
#include "model/status_macros.h"
#include "subnet/speculation.h"

namespace amoeba::admin {

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

absl::Status RunEval(const EvalFlags& f) {
  InitRuntime(f.threads);
  auto format = ParseWeightFormat(f.weights_dtype);
  if (!format.ok())
    return absl::InvalidArgumentError(absl::StrCat("--", format.status().message()));
  const auto draft_parsed = ParseDraftFormat(f.draft_weights_dtype, *format);
  if (!draft_parsed.ok())
    return absl::InvalidArgumentError(absl::StrCat("--", draft_parsed.status().message()));
  EvalOptions o;
  o.supernet = f.supernet;
  o.data = f.data;
  o.mc_data = f.mc_data;
  o.windows = f.windows;
  o.window_len = f.window_len;
  o.seed = f.seed;
  o.adapters = !f.no_adapters;
  o.format = *format;
  o.draft_format = *draft_parsed;
  o.svg = f.svg;
  for (auto part : absl::StrSplit(f.shapes, ';', absl::SkipEmpty())) {
    // "width=W" alone: depth 0, the supernet's full depth (Evaluate knows it).
    ASSIGN_OR_RETURN(Shape sh, Shape::Parse(std::string(part), 0));
    o.shapes.push_back(sh);
  }
  ASSIGN_OR_RETURN(EvalReport report, Evaluate(o));
  const nlohmann::json& rows = report.rows;
  const std::vector<Shape>& shapes = report.shapes;
  const SupernetSpec& spec = report.spec;
  const std::optional<WeightFormat> draft_format = o.draft_format;
  const bool mc = !f.mc_data.empty();
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
      mc ? "mc acc" : "");
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
          return DraftCosts{report.decode_ms[i], report.draft_ms[j], report.check_extra_ms[i]};
      return std::nullopt;
    };
    auto c = ChooseDraft(spec, shapes[i], costs, 0.0);
    if (!c) continue;
    std::printf("%-22s %-22s %-3lld %-12.2f %.2fx%s\n", shapes[i].ToString().c_str(),
                c->draft.ToString().c_str(), static_cast<long long>(c->tokens), c->expected_kept,
                c->expected_speedup,
                c->expected_speedup < 1.3 ? " (below the server's default 1.3)" : "");
  }
  spdlog::info("eval: {} shapes{}; profile updated; frontier plot {}", rows.size(),
               report.adapters ? " with adapters" : "", report.svg);
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
