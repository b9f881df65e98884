// bench/kernels: the decode kernels in isolation. For each weight shape and batch, GFLOP/s of (a)
// Amoeba's Linear (GEMV / skinny GEMM over the row-major weights that subnets slice) and (b)
// LinearPacked over the same weights packed as [out/16][in][16] panels (model/packed_linear.h),
// fp32 and fp16; then (c) the Q8_0 / Q4_0 panels under every integer kernel the CPU has, as GB/s
// of weight bytes next to the probed read bandwidth. Shapes large enough to stream from DRAM are
// what decode sees.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <nlohmann/json.hpp>

#include "bench/bench_util.h"
#include "model/kernels.h"
#include "model/packed_linear.h"
#include "model/quantized_panels.h"

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

// Q8_0 / Q4_0 panels under every integer kernel: weight GB/s (each call streams every panel once)
// and GFLOP/s, the bandwidth probed before each shape. Appends a table to `md`.
nlohmann::json QuantizedKernels(double seconds, std::string& md) {
  nlohmann::json rows = nlohmann::json::array();
  const std::vector<QuantKernel> kernels = AvailableQuantKernels();
  md +=
      "\n## Quantized panels\n\nWeight GB/s (GFLOP/s) per integer kernel; probe = read "
      "bandwidth measured just before the shape.\n\n| weight (out×in) | format | MB | probe "
      "GB/s | batch |";
  for (QuantKernel k : kernels) md += fmt::format(" {} |", QuantKernelName(k));
  md += "\n|---|---|---|---|---|";
  for (size_t i = 0; i < kernels.size(); ++i) md += "---|";
  md += "\n";
  for (auto [out, in] : std::vector<std::pair<int64_t, int64_t>>{
           {2048, 768}, {32000, 768}, {5632, 2048}, {2048, 5632}, {32000, 2048}}) {
    at::Tensor W = at::randn({out, in});
    const double probe = MeasureReadBandwidthGBs(256, 3);
    for (WeightFormat f : {WeightFormat::kQ8_0, WeightFormat::kQ4_0}) {
      at::Tensor panels = PackPanels(W, f);
      const double mb = static_cast<double>(panels.nbytes()) / 1e6;
      for (int64_t n : {1, 4, 16}) {
        at::Tensor x = at::randn({n, in}), y = at::empty({n, out});
        md += fmt::format("| {}×{} | {} | {:.1f} | {:.1f} | {} |", out, in, WeightFormatName(f), mb,
                          probe, n);
        for (QuantKernel k : kernels) {
          ForceQuantKernel(k);
          const double sec = SecondsPerCall(seconds, [&] {
            LinearPacked(x.data_ptr<float>(), n, panels, out, in, nullptr, y.data_ptr<float>());
          });
          const double gbs = mb / 1e3 / sec, gflops = 2.0 * n * out * in / sec / 1e9;
          rows.push_back({{"out", out},
                          {"in", in},
                          {"format", WeightFormatName(f)},
                          {"batch", n},
                          {"kernel", QuantKernelName(k)},
                          {"weight_mb", mb},
                          {"probe_gbs", probe},
                          {"weight_gbs", gbs},
                          {"gflops", gflops}});
          md += fmt::format(" {:.1f} ({:.0f}) |", gbs, gflops);
          spdlog::info("{}x{} {} batch {} {}: {:.1f} GB/s, {:.0f} GFLOP/s (probe {:.1f})", out, in,
                       WeightFormatName(f), n, QuantKernelName(k), gbs, gflops, probe);
        }
        ForceQuantKernel(QuantKernel::kAuto);
        md += "\n";
      }
    }
  }
  return rows;
}

int Run(const std::string& json_path, const std::string& md_path, double seconds) {
  InitRuntime(0);
  at::InferenceMode guard;
  nlohmann::json results = nlohmann::json::array();
  std::string md =
      "# bench/kernels\n\nfp32, " + std::to_string(at::get_num_threads()) +
      " threads. GFLOP/s (2 per multiply-add).\n\n| weight (out×in) | MB | batch | "
      "Linear (row-major) | LinearPacked (panels) | ratio | LinearPacked fp16 | fp16 / fp32 panels "
      "|\n|---|---|---|---|---|---|---|---|\n";
  for (auto [out, in] : std::vector<std::pair<int64_t, int64_t>>{
           {2048, 768}, {768, 2048}, {32000, 768}, {5632, 2048}, {2048, 5632}, {32000, 2048}}) {
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
  nlohmann::json quantized = QuantizedKernels(seconds, md);
  WriteReport(json_path, nlohmann::json{{"results", results}, {"quantized", quantized}}.dump(2),
              md_path, md);
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
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }
  return amoeba::bench::Run(json, md, seconds);
}
