// bench/subnet: every grid shape of a supernet built from the ~100M preset (random weights,
// random calibration tokens): parameters, extraction time, batch-1 decode tokens/s, and the
// speed-up over the full model next to the ideal (full / subnet decode weight bytes).
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "bench/bench_util.h"
#include "model/presets.h"
#include "model/runtime.h"
#include "subnet/calibrate.h"

namespace amoeba::bench {
namespace {

struct Options {
  std::string preset = "100m";
  std::vector<double> widths = {1.0, 0.875, 0.75, 0.625, 0.5};
  double min_depth_ratio = 0.5;
  int steps = 24;
  int threads = 0;
  std::string weights_dtype = "f32";  // decode panels: f32 | f16 | q8_0 | q4_0
  std::string out_json = "bench/results/subnet.json";
  std::string out_md = "bench/results/subnet.md";
};

int Run(const Options& o) {
  InitRuntime(o.threads);
  at::InferenceMode guard;
  const auto format = ParseWeightFormat(o.weights_dtype);
  if (!format.ok()) {
    spdlog::error("--{}", std::string(format.status().message()));
    return 2;
  }
  auto cfg = PresetConfig(o.preset);
  if (!cfg.ok()) {
    spdlog::error("{}", cfg.status().ToString());
    return 2;
  }
  spdlog::info("bench/subnet: building a {} supernet (random weights and calibration tokens)",
               o.preset);
  Model model = RandomModel(*cfg, 0);
  at::manual_seed(1);
  at::Tensor windows = at::randint(cfg->vocab_size, {4, 64}, at::kLong);
  CalibrateOptions co;
  co.widths = o.widths;
  co.min_depth_ratio = o.min_depth_ratio;
  co.windows = 4;
  co.window_len = 64;
  co.dp_windows = 2;
  auto built = BuildSupernet(std::move(model), windows, windows.narrow(0, 0, 2), co);
  if (!built.ok()) {
    spdlog::error("{}", built.status().ToString());
    return 1;
  }
  built->supernet->PackBaseWeights(*format);  // decode from panels, as the server does
  const Supernet& s = *built->supernet;
  const double bw = MeasureReadBandwidthGBs();
  nlohmann::json out = {{"preset", o.preset},
                        {"weights_dtype", o.weights_dtype},
                        {"bandwidth_gbs", bw},
                        {"threads", at::get_num_threads()},
                        {"shapes", nlohmann::json::array()}};
  double full_rate = 0, full_bytes = 0;
  int64_t full_params = 0;
  std::string md = fmt::format(
      "# bench/subnet ({} preset, {} weights, {} threads, {:.1f} GB/s)\n\n"
      "| depth | width | params | decode MB/token | extract µs | decode tok/s (batch 1) | speed-up "
      "| ideal | % of roofline |\n"
      "|---|---|---|---|---|---|---|---|---|\n",
      o.preset, o.weights_dtype, at::get_num_threads(), bw);
  for (const Shape& sh : s.GridShapes()) {
    const auto t0 = std::chrono::steady_clock::now();
    auto sub = s.Extract(sh);
    const double extract_us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    if (!sub.ok()) return 1;
    const double bytes = static_cast<double>(sub->DecodeWeightBytes());
    const int64_t params = sub->config.ParameterCount();
    Engine e(std::make_shared<const Model>(std::move(*sub)), {.max_len = 128});
    const double rate = DecodeRate(e, 1, o.steps);
    if (full_rate == 0) {
      full_rate = rate;
      full_bytes = bytes;
      full_params = params;
    }
    const double speedup = rate / full_rate, ideal = full_bytes / bytes;
    const double pct = 100.0 * rate / (bw * 1e9 / bytes);
    spdlog::info("{}: {:.1f}M params, {:.1f} tok/s, speed-up {:.2f}x (ideal {:.2f}x)",
                 sh.ToString(), params / 1e6, rate, speedup, ideal);
    out["shapes"].push_back({{"depth", sh.depth},
                             {"width", sh.width},
                             {"params", params},
                             {"param_ratio", static_cast<double>(params) / full_params},
                             {"decode_weight_bytes", bytes},
                             {"extract_us", extract_us},
                             {"decode_tokens_per_s", rate},
                             {"speedup", speedup},
                             {"ideal_speedup", ideal},
                             {"percent_of_roofline", pct}});
    md += fmt::format(
        "| {} | {} | {:.1f}M ({:.0f}%) | {:.0f} | {:.0f} | {:.1f} | {:.2f}x | {:.2f}x | {:.0f}% "
        "|\n",
        sh.depth, sh.width, params / 1e6, 100.0 * params / full_params, bytes / 1e6, extract_us,
        rate, speedup, ideal, pct);
  }
  WriteReport(o.out_json, out.dump(2), o.out_md, md);
  return 0;
}

}  // namespace
}  // namespace amoeba::bench

int main(int argc, char** argv) {
  amoeba::InitLogging();
  amoeba::bench::Options o;
  CLI::App app{"bench/subnet: decode speed of every subnet shape"};
  app.add_option("--preset", o.preset, "tiny | 100m | tinyllama")->capture_default_str();
  app.add_option("--widths", o.widths, "Width grid")->delimiter(',')->capture_default_str();
  app.add_option("--min-depth-ratio", o.min_depth_ratio, "Smallest depth ratio")
      ->capture_default_str();
  app.add_option("--steps", o.steps, "Decode steps per shape")->capture_default_str();
  app.add_option("--threads", o.threads, "Threads (0 = all cores)")->capture_default_str();
  app.add_option("--weights-dtype", o.weights_dtype, "Decode panels: f32 | f16 | q8_0 | q4_0")
      ->capture_default_str();
  app.add_option("--json", o.out_json, "JSON output")->capture_default_str();
  app.add_option("--md", o.out_md, "Markdown output")->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  return amoeba::bench::Run(o);
}
