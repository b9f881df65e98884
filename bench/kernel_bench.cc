// bench/kernels: the decode kernels in isolation. For each weight shape and batch, GFLOP/s of (a)
// Amoeba's Linear (GEMV / skinny GEMM over the row-major weights that subnets slice) and (b)
// LinearPacked over the same weights packed as [out/16][in][16] panels (model/packed_linear.h),
// fp32 and fp16; then (c) the Q8_0 / Q4_0 panels under every integer kernel the CPU has, as GB/s
// of weight bytes next to the probed read bandwidth. Shapes large enough to stream from DRAM are
// what decode sees. (d) --stream-preset: a preset's decode matrices (every layer and the LM head,
// as the engine packs them) called back to back at batch 1 with nothing in between, each pass
// paired with a read probe right after it: the kernels' share of the roofline, apart from the
// rest of a decode step (bench/decode measures the whole step the same way). --stream-batch runs
// those passes on that many rows, in one team per pass as a decode step runs them, and also
// reports the multiply-adds against the instruction's measured peak: the projections' time a
// step could have if nothing but its kernels ran (bench/decode's "projections ms").
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bench/bench_flags.h"
#include "bench/bench_util.h"
#include "bench/compute_peak.h"
#include "model/kernels.h"
#include "model/packed_linear.h"
#include "model/presets.h"
#include "model/quantized_panels.h"
#include "model/team.h"
#include "subnet/latency_profile.h"

namespace amoeba::bench {
namespace {

using Clock = std::chrono::steady_clock;

// Seconds per call of `run`, after one warm-up call.
template <typename F>
double SecondsPerCall(double min_seconds, F&& run) {
  run();
  int64_t iters = 0;
  const auto t0 = Clock::now();
  double s = 0;
  do {
    run();
    ++iters;
    s = std::chrono::duration<double>(Clock::now() - t0).count();
  } while (s < min_seconds);
  return s / iters;
}

template <typename F>
double Gflops(int64_t n, int64_t out, int64_t in, double min_seconds, F&& run) {
  return 2.0 * n * out * in / SecondsPerCall(min_seconds, run) / 1e9;
}

// One column of the quantized table: a kernel, with its row pairs or (AVX-512) every row alone.
struct QuantVariant {
  QuantKernel kernel;
  bool row_pairs;
  std::string name;
};

std::vector<QuantVariant> QuantVariants() {
  std::vector<QuantVariant> vs;
  for (QuantKernel k : AvailableQuantKernels()) {
    vs.push_back({k, true, QuantKernelName(k)});
    if (k == QuantKernel::kAvx512Vnni || k == QuantKernel::kAmxInt8)
      vs.push_back({k, false, std::string(QuantKernelName(k)) + " rows alone"});
  }
  return vs;
}

// Q8_0 / Q4_0 panels under every integer kernel: weight GB/s (each call streams every panel once)
// and GFLOP/s, the bandwidth probed before each shape. The AVX-512 kernels also run without their
// row pairs (ForceRowPairs), side by side. Appends a table to `md`.
nlohmann::json QuantizedKernels(double seconds, std::string& md) {
  nlohmann::json rows = nlohmann::json::array();
  const std::vector<QuantVariant> variants = QuantVariants();
  md +=
      "\n## Quantized panels\n\nWeight GB/s (GFLOP/s) per integer kernel (\"rows alone\": the "
      "AVX-512 kernel without its row pairs; the same below 4 rows); probe = read bandwidth "
      "measured just before the shape.\n\n| weight (out×in) | format | MB | probe GB/s | batch |";
  for (const QuantVariant& v : variants) md += fmt::format(" {} |", v.name);
  md += "\n|---|---|---|---|---|";
  for (size_t i = 0; i < variants.size(); ++i) md += "---|";
  md += "\n";
  for (auto [out, in] : std::vector<std::pair<int64_t, int64_t>>{
           {2048, 768}, {32000, 768}, {5632, 2048}, {2048, 5632}, {32000, 2048}}) {
    at::Tensor W = at::randn({out, in});
    const double probe = MeasureReadBandwidthGBs(256, 3);
    for (WeightFormat f : {WeightFormat::kQ8_0, WeightFormat::kQ4_0}) {
      at::Tensor panels = PackPanels(W, f);
      const double mb = static_cast<double>(panels.nbytes()) / 1e6;
      for (int64_t n : {1, 4, 16, 64}) {
        at::Tensor x = at::randn({n, in}), y = at::empty({n, out});
        md += fmt::format("| {}×{} | {} | {:.1f} | {:.1f} | {} |", out, in, WeightFormatName(f), mb,
                          probe, n);
        for (const QuantVariant& v : variants) {
          ForceQuantKernel(v.kernel);
          ForceRowPairs(v.row_pairs);
          const double sec = SecondsPerCall(seconds, [&] {
            LinearPacked(x.data_ptr<float>(), n, panels, out, in, nullptr, y.data_ptr<float>());
          });
          const double gbs = mb / 1e3 / sec, gflops = 2.0 * n * out * in / sec / 1e9;
          rows.push_back({{"out", out},
                          {"in", in},
                          {"format", WeightFormatName(f)},
                          {"batch", n},
                          {"kernel", QuantKernelName(v.kernel)},
                          {"row_pairs", v.row_pairs},
                          {"weight_mb", mb},
                          {"probe_gbs", probe},
                          {"weight_gbs", gbs},
                          {"gflops", gflops}});
          md += fmt::format(" {:.1f} ({:.0f}) |", gbs, gflops);
          spdlog::info("{}x{} {} batch {} {}: {:.1f} GB/s, {:.0f} GFLOP/s (probe {:.1f})", out, in,
                       WeightFormatName(f), n, v.name, gbs, gflops, probe);
        }
        ForceQuantKernel(QuantKernel::kAuto);
        ForceRowPairs(true);
        md += "\n";
      }
    }
  }
  return rows;
}

// One pass over a packed model's decode matrices on n rows, in engine order (q/k/v and gate/up
// fused into one call each, as the engine makes them).
void StreamPass(const Model& m, int64_t n, const float* x, float* y) {
  // Each output of a call into its own part of y, as the engine's are (outputs sharing one
  // buffer would have the threads write each other's cache lines).
  auto out = [&](const LayerWeights& l, Proj p, int part) -> PackedOutput {
    return {&l.panels[static_cast<int>(p)], l.proj(p).size(0), nullptr,
            y + part * n * l.proj(p).size(0)};
  };
  for (const LayerWeights& l : m.layers) {
    const int64_t hidden = l.proj(Proj::kQ).size(1), inter = l.proj(Proj::kDown).size(1);
    const PackedOutput qkv[3] = {out(l, Proj::kQ, 0), out(l, Proj::kK, 1), out(l, Proj::kV, 2)};
    LinearPackedMany(x, n, hidden, qkv);
    const PackedOutput o[1] = {out(l, Proj::kO, 0)};
    LinearPackedMany(x, n, l.proj(Proj::kO).size(1), o);
    const PackedOutput gate_up[2] = {out(l, Proj::kGate, 0), out(l, Proj::kUp, 1)};
    LinearPackedMany(x, n, hidden, gate_up);
    const PackedOutput down[1] = {out(l, Proj::kDown, 0)};
    LinearPackedMany(x, n, inter, down);
  }
  const PackedOutput head[1] = {{&m.head_panels, m.config.vocab_size, nullptr, y}};
  LinearPackedMany(x, n, m.config.hidden_size, head);
}

// The kernels' share of the roofline on a whole model's matrices, per format (see the top).
nlohmann::json ModelStream(const std::string& preset, int passes, int64_t batch, std::string& md) {
  nlohmann::json rows = nlohmann::json::array();
  auto cfg = PresetConfig(preset);
  if (!cfg.ok()) {
    spdlog::error("--stream-preset: {}", cfg.status().ToString());
    return rows;
  }
  const ComputePeak fp_peak = MeasureFp32Peak(at::get_num_threads());
  const ComputePeak int8_peak = MeasureInt8Peak(ActiveQuantKernel(), at::get_num_threads());
  md += fmt::format(
      "\n## {} decode matrices back to back (batch {})\n\nEach pass over every matrix (in one "
      "team, as a decode step runs them) is followed by one 256 MiB read probe; medians over {} "
      "passes. Peak: the multiply-adds of every matrix on {} rows at the measured peak of the "
      "path's instruction ({} {:.0f} G/s, {} {:.0f} G/s).\n\n| format | MB/pass | ms/pass | "
      "weight GB/s | probe GB/s | % of the probe | % of the peak "
      "|\n|---|---|---|---|---|---|---|\n",
      preset, batch, passes, batch, fp_peak.instruction, fp_peak.multiply_adds_per_s / 1e9,
      int8_peak.instruction, int8_peak.multiply_adds_per_s / 1e9);
  BandwidthProbe probe(256);
  const Model base = RandomModel(*cfg, 0);  // once: each format packs a shallow copy of it
  for (WeightFormat f : {WeightFormat::kF16, WeightFormat::kQ8_0, WeightFormat::kQ4_0}) {
    Model m = base;
    PackWeights(m, f);
    DropPackedRowMajor(m);
    const double bytes = static_cast<double>(m.DecodeWeightBytes());
    const int64_t width = std::max({cfg->hidden_size, cfg->intermediate_size, cfg->vocab_size,
                                    cfg->num_attention_heads * cfg->head_dim});
    // Uneven values: activations that quantize to one repeated byte would not exercise the kernels.
    std::vector<float> x(batch * width), y(3 * batch * width);
    for (size_t i = 0; i < x.size(); ++i) x[i] = 0.5f + 0.25f * std::sin(0.37f * i);
    auto pass = [&] { StreamPass(m, batch, x.data(), y.data()); };
    RunInTeam(pass);  // warm-up
    const double multiply_adds = static_cast<double>(batch) * m.DecodeMultiplyAdds();
    const double peak = (IsQuantized(f) ? int8_peak : fp_peak).multiply_adds_per_s;
    std::vector<double> gbs, probes, pcts, mss;
    for (int i = 0; i < passes; ++i) {
      const auto t0 = Clock::now();
      RunInTeam(pass);
      const double sec = std::chrono::duration<double>(Clock::now() - t0).count();
      mss.push_back(sec * 1e3);
      gbs.push_back(bytes / sec / 1e9);
      probes.push_back(probe.ReadGBs(1));
      pcts.push_back(100.0 * gbs.back() / probes.back());
    }
    const double g = MedianOf(gbs), pr = MedianOf(probes), pct = MedianOf(pcts), ms = MedianOf(mss);
    const double peak_pct = peak > 0 ? 100.0 * multiply_adds / (ms / 1e3) / peak : 0;
    spdlog::info(
        "{} {} matrices, batch {}: {:.2f} ms, {:.1f} GB/s, probe {:.1f} GB/s ({:.0f}%), "
        "{:.0f}% of the peak",
        preset, WeightFormatName(f), batch, ms, g, pr, pct, peak_pct);
    rows.push_back(
        {{"preset", preset},
         {"format", WeightFormatName(f)},
         {"kernel", IsQuantized(f) ? QuantKernelName() : KernelIsaName(ActiveKernelIsa())},
         {"batch", batch},
         {"bytes_per_pass", bytes},
         {"ms_per_pass", ms},
         {"percent_of_peak", peak_pct},
         {"weight_gbs", g},
         {"probe_gbs", pr},
         {"percent_of_probe", pct},
         {"percent_of_probe_passes", pcts}});
    md += fmt::format("| {} | {:.0f} | {:.2f} | {:.1f} | {:.1f} | {:.0f}% | {:.0f}% |\n",
                      WeightFormatName(f), bytes / 1e6, ms, g, pr, pct, peak_pct);
  }
  return rows;
}

int Run(const std::string& json_path, const std::string& md_path, double seconds,
        const std::string& stream_preset, int stream_passes, int64_t stream_batch, int threads,
        bool fp32, bool quantized) {
  InitRuntime(threads);
  at::InferenceMode guard;
  nlohmann::json results = nlohmann::json::array();
  std::string md =
      "# bench/kernels\n\nfp32, " + std::to_string(at::get_num_threads()) +
      " threads. GFLOP/s (2 per multiply-add).\n\n| weight (out×in) | MB | batch | "
      "Linear (row-major) | LinearPacked (panels) | ratio | LinearPacked fp16 | fp16 / fp32 panels "
      "|\n|---|---|---|---|---|---|---|---|\n";
  using Shapes = std::vector<std::pair<int64_t, int64_t>>;
  for (auto [out, in] : fp32 ? Shapes{{2048, 768},
                                      {768, 2048},
                                      {32000, 768},
                                      {5632, 2048},
                                      {2048, 5632},
                                      {32000, 2048}}
                             : Shapes{}) {
    at::Tensor W = at::randn({out, in});
    at::Tensor panels = PackPanels(W), panels16 = PackPanels(W, WeightFormat::kF16);
    for (int64_t n : {1, 4, 16}) {
      at::Tensor x = at::randn({n, in}), y = at::empty({n, out}), y2 = at::empty({n, out});
      const double rowmajor = Gflops(n, out, in, seconds, [&] {
        Linear(x.data_ptr<float>(), n, W, nullptr, y.data_ptr<float>());
      });
      const double packed = Gflops(n, out, in, seconds, [&] {
        LinearPacked(x.data_ptr<float>(), n, panels, out, in, nullptr, y2.data_ptr<float>());
      });
      const double packed16 = Gflops(n, out, in, seconds, [&] {
        LinearPacked(x.data_ptr<float>(), n, panels16, out, in, nullptr, y2.data_ptr<float>());
      });
      const double diff = (y - y2).abs().max().item<double>();
      if (diff > 1e-2 * y.abs().max().item<double>())
        spdlog::error("bench/kernels: packed result differs ({})", diff);
      const double mb = out * in * 4 / 1e6;
      spdlog::info(
          "{}x{} ({:.0f} MB) batch {}: Linear {:.1f} GFLOP/s, LinearPacked {:.1f}, fp16 {:.1f}",
          out, in, mb, n, rowmajor, packed, packed16);
      results.push_back({{"out", out},
                         {"in", in},
                         {"batch", n},
                         {"linear_gflops", rowmajor},
                         {"packed_gflops", packed},
                         {"packed_fp16_gflops", packed16},
                         {"isa", KernelIsaName(ActiveKernelIsa())}});
      md += fmt::format("| {}×{} | {:.0f} | {} | {:.1f} | {:.1f} | {:.2f}x | {:.1f} | {:.2f}x |\n",
                        out, in, mb, n, rowmajor, packed, packed / rowmajor, packed16,
                        packed16 / packed);
    }
  }
  nlohmann::json report = {
      {"results", results},
      {"quantized", quantized ? QuantizedKernels(seconds, md) : nlohmann::json::array()}};
  if (!stream_preset.empty())
    report["stream"] = ModelStream(stream_preset, stream_passes, stream_batch, md);
  WriteReport(json_path, report.dump(2), md_path, md);
  return 0;
}

}  // namespace
}  // namespace amoeba::bench

int main(int argc, char** argv) {
  amoeba::InitLogging();
  std::string json = "bench/results/kernels.json", md = "bench/results/kernels.md";
  double seconds = 1.0;
  CLI::App app{"bench/kernels: decode kernel GFLOP/s, row-major Linear vs packed panels"};
  app.add_option("--json", json, "JSON output")->capture_default_str();
  app.add_option("--md", md, "Markdown output")->capture_default_str();
  app.add_option("--seconds", seconds, "Minimum time per measurement")->capture_default_str();
  std::string stream_preset;
  int stream_passes = 8;
  app.add_option("--stream-preset", stream_preset,
                 "Also stream this preset's decode matrices back to back (tiny, 100m, tinyllama)");
  app.add_option("--stream-passes", stream_passes, "Passes over the preset's matrices")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  int64_t stream_batch = 1;
  app.add_option("--stream-batch", stream_batch, "Rows per call in the --stream-preset passes")
      ->check(CLI::Range(int64_t{1}, int64_t{256}))
      ->capture_default_str();
  int threads = 0;
  app.add_option("--threads", threads, "Threads (0 = all cores)")->capture_default_str();
  bool no_fp32 = false;
  app.add_flag("--no-fp32", no_fp32, "Skip the fp32 / fp16 table (quantized panels only)");
  bool stream_only = false;
  app.add_flag("--stream-only", stream_only,
               "Only the --stream-preset passes (no fp32 or quantized tables)");
  if (const std::optional<int> exit_code = amoeba::bench::ParseFlags(app, argc, argv))
    return *exit_code;
  return amoeba::bench::Run(json, md, seconds, stream_preset, stream_passes, stream_batch, threads,
                            !no_fp32 && !stream_only, !stream_only);
}
