// bench/subnet: every grid shape of a supernet built from the ~100M preset (random weights,
// random calibration tokens): parameters, extraction time, batch-1 decode tokens/s, and the
// speed-up over the full model next to the ideal (full / subnet decode weight bytes). Every shape
// is measured once per round, rounds interleaved (this shared machine's bandwidth drifts within
// minutes); a shape's speed-up is the median over rounds of its rate ÷ the full shape's rate in
// the same round.
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "bench/bench_flags.h"
#include "bench/bench_util.h"
#include "bench/random_supernet.h"
#include "model/presets.h"
#include "model/runtime.h"
#include "subnet/latency_profile.h"

namespace amoeba::bench {
namespace {

struct Options {
  std::string preset = "100m";
  std::vector<double> widths = {1.0, 0.875, 0.75, 0.625, 0.5};
  double min_depth_ratio = 0.5;
  int steps = 24;
  int rounds = 3;  // interleaved repetitions; medians reported
  int threads = 0;
  std::string weights_dtype = "f32";  // decode panels: f32 | f16 | q8_0 | q4_0
  std::string out_json = "bench/results/subnet.json";
  std::string out_md = "bench/results/subnet.md";
};

int Run(const Options& o) {
  InitRuntime(o.threads);
  at::InferenceMode guard;
  const auto flags = ParseRandomSupernetFlags(o.preset, o.weights_dtype);
  if (!flags.ok()) {
    spdlog::error("{}", std::string(flags.status().message()));
    return 2;
  }
  spdlog::info("bench/subnet: building a {} supernet (random weights and calibration tokens)",
               o.preset);
  auto built = RandomSupernet(flags->config, o.widths, o.min_depth_ratio, flags->format);
  if (!built.ok()) {
    spdlog::error("{}", built.status().ToString());
    return 1;
  }
  const Supernet& s = **built;
  struct Measured {
    Shape shape;
    int64_t params = 0;
    double bytes = 0, extract_us = 0;
    std::unique_ptr<Engine> engine;
    std::vector<double> rates, bws;
  };
  std::vector<Measured> shapes;
  for (const Shape& sh : s.GridShapes()) {
    const auto t0 = std::chrono::steady_clock::now();
    auto sub = s.Extract(sh);
    const double extract_us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    if (!sub.ok()) return 1;
    Measured m;
    m.shape = sh;
    m.params = sub->config.ParameterCount();
    m.bytes = static_cast<double>(sub->DecodeWeightBytes());
    m.extract_us = extract_us;
    m.engine = std::make_unique<Engine>(std::make_shared<const Model>(std::move(*sub)),
                                        EngineOptions{.max_len = 128});
    shapes.push_back(std::move(m));
  }
  BandwidthProbe probe(256);  // one buffer for every probe
  for (int r = 0; r < o.rounds; ++r)
    for (Measured& m : shapes) {
      const double before = probe.ReadGBs(3);  // mean of probes around it
      m.rates.push_back(DecodeRate(*m.engine, 1, o.steps));
      m.bws.push_back(0.5 * (before + probe.ReadGBs(3)));
      spdlog::info("round {}: {} {:.1f} tok/s ({:.1f} GB/s probed)", r + 1, m.shape.ToString(),
                   m.rates.back(), m.bws.back());
    }
  const Measured& full = shapes.front();
  const double bw = MedianOf(full.bws);
  nlohmann::json out = {{"preset", o.preset},  {"weights_dtype", o.weights_dtype},
                        {"bandwidth_gbs", bw}, {"threads", at::get_num_threads()},
                        {"rounds", o.rounds},  {"shapes", nlohmann::json::array()}};
  std::string md = fmt::format(
      "# bench/subnet ({} preset, {} weights, {} threads, {} interleaved rounds, medians; {:.1f} "
      "GB/s)\n\n"
      "| depth | width | params | decode MB/token | extract µs | decode tok/s (batch 1) | speed-up "
      "| ideal | % of roofline |\n"
      "|---|---|---|---|---|---|---|---|---|\n",
      o.preset, o.weights_dtype, at::get_num_threads(), o.rounds, bw);
  for (const Measured& m : shapes) {
    std::vector<double> speedups, pcts;
    for (int r = 0; r < o.rounds; ++r) {
      speedups.push_back(m.rates[r] / full.rates[r]);
      pcts.push_back(100.0 * m.rates[r] / (m.bws[r] * 1e9 / m.bytes));
    }
    const double rate = MedianOf(m.rates), speedup = MedianOf(speedups), pct = MedianOf(pcts);
    const double ideal = full.bytes / m.bytes;
    spdlog::info("{}: {:.1f}M params, {:.1f} tok/s, speed-up {:.2f}x (ideal {:.2f}x)",
                 m.shape.ToString(), m.params / 1e6, rate, speedup, ideal);
    out["shapes"].push_back({{"depth", m.shape.depth},
                             {"width", m.shape.width},
                             {"params", m.params},
                             {"param_ratio", static_cast<double>(m.params) / full.params},
                             {"decode_weight_bytes", m.bytes},
                             {"extract_us", m.extract_us},
                             {"decode_tokens_per_s", rate},
                             {"decode_tokens_per_s_rounds", m.rates},
                             {"bandwidth_gbs_rounds", m.bws},
                             {"speedup", speedup},
                             {"ideal_speedup", ideal},
                             {"percent_of_roofline", pct}});
    md += fmt::format(
        "| {} | {} | {:.1f}M ({:.0f}%) | {:.0f} | {:.0f} | {:.1f} | {:.2f}x | {:.2f}x | {:.0f}% "
        "|\n",
        m.shape.depth, m.shape.width, m.params / 1e6, 100.0 * m.params / full.params, m.bytes / 1e6,
        m.extract_us, rate, speedup, ideal, pct);
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
  app.add_option("--rounds", o.rounds, "Interleaved repetitions (medians reported)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--threads", o.threads, "Threads (0 = all cores)")->capture_default_str();
  app.add_option("--weights-dtype", o.weights_dtype, "Decode panels: f32 | f16 | q8_0 | q4_0")
      ->capture_default_str();
  app.add_option("--json", o.out_json, "JSON output")->capture_default_str();
  app.add_option("--md", o.out_md, "Markdown output")->capture_default_str();
  if (const std::optional<int> exit_code = amoeba::bench::ParseFlags(app, argc, argv))
    return *exit_code;
  return amoeba::bench::Run(o);
}
