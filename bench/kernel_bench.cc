// bench/kernels: the batched-decode kernel in isolation, against a prototype of the next step.
// For each weight shape and batch, GFLOP/s of (a) Amoeba's Linear (the skinny GEMM over row-major
// weights that subnets slice) and (b) an experimental outer-product microkernel over weights
// packed as [out/16][in][16] panels with software prefetch (not used by the engine yet; see
// bench/README.md). Shapes large enough to stream from DRAM are what decode sees.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <immintrin.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <nlohmann/json.hpp>

#include "bench/bench_util.h"
#include "model/kernels.h"

namespace amoeba::bench {
namespace {

using Clock = std::chrono::steady_clock;

// 16 inputs × one 16-output panel: 16 zmm accumulators, one weight load and 16 broadcasts per k.
__attribute__((target("avx512f"))) void PackedPanel16(const float* panel, const float* xt,
                                                      int64_t in, float* y, int64_t out, int64_t p,
                                                      int64_t prefetch) {
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < in; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(panel + k * 16 + prefetch), _MM_HINT_T0);
    const __m512 w = _mm512_loadu_ps(panel + k * 16);
    const float* xk = xt + k * 16;
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(w, _mm512_set1_ps(xk[j]), acc[j]);
  }
  for (int j = 0; j < 16; ++j) _mm512_storeu_ps(y + j * out + p * 16, acc[j]);
}

template <typename F>
double Gflops(int64_t n, int64_t out, int64_t in, double min_seconds, F&& run) {
  run();
  int64_t iters = 0;
  const auto t0 = Clock::now();
  double s = 0;
  do {
    run();
    ++iters;
    s = std::chrono::duration<double>(Clock::now() - t0).count();
  } while (s < min_seconds);
  return 2.0 * n * out * in * iters / s / 1e9;
}

int Run(const std::string& json_path, const std::string& md_path, double seconds) {
  InitRuntime(0);
  at::InferenceMode guard;
  nlohmann::json results = nlohmann::json::array();
  std::string md =
      "# bench/kernels\n\nBatch 16, fp32, " + std::to_string(at::get_num_threads()) +
      " threads. GFLOP/s (2 per multiply-add).\n\n| weight (out×in) | MB | Linear (skinny, "
      "row-major) | packed outer product + prefetch | ratio |\n|---|---|---|---|---|\n";
  const bool avx512 = CpuHasAvx512();
  for (auto [out, in] : std::vector<std::pair<int64_t, int64_t>>{
           {2048, 768}, {768, 2048}, {32000, 768}, {5632, 2048}, {2048, 5632}, {32000, 2048}}) {
    const int64_t n = 16;
    at::Tensor W = at::randn({out, in});
    at::Tensor x = at::randn({n, in}), y = at::empty({n, out});
    const double skinny = Gflops(n, out, in, seconds, [&] {
      Linear(x.data_ptr<float>(), n, W, nullptr, y.data_ptr<float>());
    });
    double packed = 0;
    if (avx512) {
      at::Tensor Wp = W.view({out / 16, 16, in}).permute({0, 2, 1}).contiguous();
      at::Tensor xt = x.t().contiguous();
      at::Tensor y2 = at::empty({n, out});
      packed = Gflops(n, out, in, seconds, [&] {
        at::parallel_for(0, out / 16, 8, [&](int64_t b, int64_t e) {
          for (int64_t p = b; p < e; ++p)
            PackedPanel16(Wp.data_ptr<float>() + p * in * 16, xt.data_ptr<float>(), in,
                          y2.data_ptr<float>(), out, p, /*prefetch=*/1024);
        });
      });
      const double diff = (y - y2).abs().max().item<double>();
      if (diff > 1e-3 * y.abs().max().item<double>())
        spdlog::error("bench/kernels: packed kernel disagrees ({})", diff);
    }
    const double mb = out * in * 4 / 1e6;
    spdlog::info("{}x{} ({:.0f} MB): skinny {:.1f} GFLOP/s, packed {:.1f}", out, in, mb, skinny,
                 packed);
    results.push_back({{"out", out},
                       {"in", in},
                       {"batch", n},
                       {"skinny_gflops", skinny},
                       {"packed_outer_gflops", packed}});
    md += fmt::format("| {}×{} | {:.0f} | {:.1f} | {} | {} |\n", out, in, mb, skinny,
                      avx512 ? fmt::format("{:.1f}", packed) : "n/a (no AVX-512)",
                      avx512 ? fmt::format("{:.2f}x", packed / skinny) : "");
  }
  WriteReport(json_path, nlohmann::json{{"results", results}}.dump(2), md_path, md);
  return 0;
}

}  // namespace
}  // namespace amoeba::bench

int main(int argc, char** argv) {
  amoeba::InitLogging();
  std::string json = "bench/results/kernels.json", md = "bench/results/kernels.md";
  double seconds = 1.0;
  CLI::App app{"bench/kernels: batched-decode kernel GFLOP/s, current vs packed prototype"};
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
