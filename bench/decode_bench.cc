// bench/decode: prefill and decode throughput of the engine against the memory roofline.
// For each preset and batch size it runs the libtorch-linear baseline and Amoeba's kernels side
// by side in one process, and writes JSON plus a Markdown summary.
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>

#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "model/engine.h"
#include "model/presets.h"
#include "model/runtime.h"

namespace amoeba::bench {
namespace {

struct Options {
  std::string presets = "100m";
  std::string batches = "1,8";
  int prompt_len = 128;
  int decode_steps = 64;
  int threads = 0;
  std::string out_json = "bench/results/decode.json";
  std::string out_md = "bench/results/decode.md";
};

int Run(const Options& o) {
  InitRuntime(o.threads);
  at::InferenceMode guard;
  const double bw = MeasureReadBandwidthGBs();
  spdlog::info("bench/decode: memory read bandwidth {:.1f} GB/s", bw);
  nlohmann::json out = {{"bandwidth_gbs", bw},
                        {"threads", at::get_num_threads()},
                        {"results", nlohmann::json::array()}};
  std::vector<int> batches;
  for (auto s : absl::StrSplit(o.batches, ',')) batches.push_back(std::stoi(std::string(s)));
  std::string md =
      "# bench/decode\n\nMemory read bandwidth: " + fmt::format("{:.1f}", bw) + " GB/s, " +
      std::to_string(at::get_num_threads()) +
      " threads. Roofline = bandwidth / weight bytes per decode step.\n\n" +
      "| preset | params | path | prefill tok/s | batch | decode tok/s (aggregate) | "
      "per stream | GB/s probed just before | fp32 roofline tok/s (batch 1) | % of roofline per "
      "step |\n"
      "|---|---|---|---|---|---|---|---|---|---|\n";
  for (auto name : absl::StrSplit(o.presets, ',')) {
    auto cfg = PresetConfig(std::string(name));
    if (!cfg.ok()) {
      spdlog::error("{}", cfg.status().ToString());
      return 2;
    }
    spdlog::info("bench/decode: building random {} model", std::string(name));
    auto model = std::make_shared<const Model>(RandomModel(*cfg, 0));
    auto model16 = std::make_shared<const Model>(ConvertWeights(*model, at::kHalf));
    const double bytes = static_cast<double>(model->DecodeWeightBytes());
    struct Variant {
      LinearPath path;
      const char* name;
      std::shared_ptr<const Model> model;
      bool packed = false;
    };
    for (const Variant& v : {Variant{LinearPath::kTorch, "libtorch-linear", model},
                             Variant{LinearPath::kAuto, "amoeba-fp32", model},
                             Variant{LinearPath::kAuto, "amoeba-fp32-packed", model, true},
                             Variant{LinearPath::kAuto, "amoeba-fp16", model16}}) {
      const char* pname = v.name;
      Engine e(v.model, {.max_len = std::max(256, o.prompt_len + 64),
                         .linear_path = v.path,
                         .packed_weights = v.packed});
      const double prefill = PrefillRate(e, o.prompt_len);
      for (int b : batches) {
        // The shared machine's bandwidth drifts by ~1.5x within minutes: probe it right before
        // each measurement and compare with that (the header's figure is the first probe).
        const double bw_now = MeasureReadBandwidthGBs(512, 3);
        const double roof = bw_now * 1e9 / bytes;
        const double rate = DecodeRate(e, b, o.decode_steps);
        const double pct = 100.0 * (rate / b) / roof;  // per decode step vs one weight pass
        spdlog::info(
            "{} {} batch {}: decode {:.1f} tok/s aggregate ({:.1f}/stream), roofline {:.1f}, "
            "{:.0f}%; prefill {:.0f} tok/s",
            std::string(name), pname, b, rate, rate / b, roof, pct, prefill);
        out["results"].push_back({{"preset", std::string(name)},
                                  {"params", cfg->ParameterCount()},
                                  {"weight_bytes_per_step", bytes},
                                  {"path", pname},
                                  {"batch", b},
                                  {"prefill_tokens_per_s", prefill},
                                  {"decode_tokens_per_s", rate},
                                  {"decode_tokens_per_s_per_stream", rate / b},
                                  {"bandwidth_gbs", bw_now},
                                  {"roofline_tokens_per_s", roof},
                                  {"percent_of_roofline_per_step", pct}});
        md += fmt::format(
            "| {} | {:.0f}M | {} | {:.0f} | {} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.0f}% |\n",
            std::string(name), cfg->ParameterCount() / 1e6, pname, prefill, b, rate, rate / b,
            bw_now, roof, pct);
      }
    }
  }
  // Ratios measured side by side.
  auto find = [&](const std::string& preset, const std::string& path, int batch) -> double {
    for (const auto& r : out["results"])
      if (r["preset"] == preset && r["path"] == path && r["batch"] == batch)
        return r["decode_tokens_per_s"].get<double>();
    return 0;
  };
  md +=
      "\nRatios (same run):\n\n| preset | batch | fp32 / libtorch | fp16 / fp32 | fp32 batch / "
      "fp32 batch 1 | fp32-packed batch / fp32 batch 1 |\n|---|---|---|---|---|---|\n";
  for (auto name : absl::StrSplit(o.presets, ',')) {
    const std::string p(name);
    for (int b : batches) {
      const double t = find(p, "libtorch-linear", b), f = find(p, "amoeba-fp32", b),
                   h = find(p, "amoeba-fp16", b);
      md += fmt::format("| {} | {} | {:.2f}x | {:.2f}x | {:.2f}x | {:.2f}x |\n", p, b, f / t, h / f,
                        f / find(p, "amoeba-fp32", batches[0]),
                        find(p, "amoeba-fp32-packed", b) / find(p, "amoeba-fp32", batches[0]));
    }
  }
  WriteReport(o.out_json, out.dump(2), o.out_md, md);
  return 0;
}

}  // namespace
}  // namespace amoeba::bench

int main(int argc, char** argv) {
  amoeba::InitLogging();
  amoeba::bench::Options o;
  CLI::App app{"bench/decode: prefill and decode tokens/s against the memory roofline"};
  app.add_option("--presets", o.presets, "Comma-separated presets (tiny, 100m, tinyllama)")
      ->capture_default_str();
  app.add_option("--batches", o.batches, "Comma-separated decode batch sizes")
      ->capture_default_str();
  app.add_option("--prompt-len", o.prompt_len, "Prefill length")->capture_default_str();
  app.add_option("--steps", o.decode_steps, "Decode steps per measurement")->capture_default_str();
  app.add_option("--threads", o.threads, "Threads (0 = all cores)")->capture_default_str();
  app.add_option("--json", o.out_json, "JSON output")->capture_default_str();
  app.add_option("--md", o.out_md, "Markdown output")->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  return amoeba::bench::Run(o);
}
