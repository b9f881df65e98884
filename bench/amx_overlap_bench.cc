// bench/amx_overlap: what the AMX tile unit overlaps with on this core. Each row times a loop of
// one tile operation of the quantized tile kernel's shapes (a 16 × 16 × 32 int8 product, the tile
// loads of its two operands, the store of its 16 × 16 int32 result, or a whole block: zero, two
// loads, product, store) alone, some ordinary vector work alone (32 FMAs on registers, 16 zmm loads
// with an FMA each, 16 zmm stores), and the two interleaved. overlap = (tile alone + vector alone -
// both) / min(tile alone, vector alone): 1 = the shorter hides behind the longer, 0 = they add up.
// The tile kernel's per-block scaling is such loads (the stored products, the activation scales)
// and Q4_0's widening such stores (model/src/quantized_panels.cc). One thread, buffers in L1.
// Without AMX-INT8 it says so and writes an empty result.
#include <fmt/format.h>
#include <immintrin.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <utility>
#include <vector>

#include "bench/bench_flags.h"
#include "bench/bench_util.h"
#include "model/kernels.h"
#include "model/runtime.h"
#include "subnet/latency_profile.h"

#define AMOEBA_BENCH_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,fma")))

namespace amoeba::bench {
namespace {

struct Options {
  int64_t iters = 2'000'000;  // loop iterations per timing
  int rounds = 3;             // interleaved repetitions; the median is reported
  std::string out_json = "bench/results/amx_overlap.json";
  std::string out_md = "bench/results/amx_overlap.md";
};

enum Tile { kNoTile, kProduct, kLoads, kStore, kBlock };
enum Vector { kNoVector, kRegisterFmas, kConverts, kIntegerAdds, kLoadFmas, kStores };
constexpr const char* kTileNames[] = {"none", "product 16x16x32",
                                      "tile loads (A 16x32 B, B 8x64 B)", "tile store (16x64 B)",
                                      "block (zero, loads, product, store)"};
constexpr const char* kVectorNames[] = {"none",
                                        "32 FMAs on registers",
                                        "32 int32 -> float converts",
                                        "32 integer adds and xors",
                                        "16 zmm loads + FMAs",
                                        "16 zmm stores"};

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

alignas(64) int8_t operand_a[2048], operand_b[2048];
alignas(64) int32_t products[2][256];
alignas(64) float vector_in[8 * 256], vector_out[8 * 256];

// 16 accumulators indexed only by constants, so they stay in registers.
using Rows = std::make_index_sequence<16>;
using Acc = __m512[16];

template <Vector kV, size_t... J>
AMOEBA_BENCH_AMX __attribute__((always_inline)) inline void VectorWork(std::index_sequence<J...>,
                                                                       Acc& a, const float* in,
                                                                       float* out) {
  const __m512 m = _mm512_set1_ps(0.999f);
  if constexpr (kV == kRegisterFmas) {
    ((a[J] = _mm512_fmadd_ps(a[J], m, m)), ...);
    ((a[J] = _mm512_fmadd_ps(a[J], m, m)), ...);
  } else if constexpr (kV == kConverts) {  // bits reinterpreted; the masked form: gcc 12 warns of
    // the plain one's undefined source
    ((a[J] = _mm512_maskz_cvtepi32_ps(0xFFFF, _mm512_castps_si512(a[J]))), ...);
    ((a[J] = _mm512_maskz_cvtepi32_ps(0xFFFF, _mm512_castps_si512(a[J]))), ...);
  } else if constexpr (kV == kIntegerAdds) {
    // An add then a xor: two adds in a row, the compiler folds into one.
    const __m512i one = _mm512_set1_epi32(1), bits = _mm512_set1_epi32(0x5A5A);
    ((a[J] = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a[J]), one))), ...);
    ((a[J] = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a[J]), bits))), ...);
  } else if constexpr (kV == kLoadFmas) {
    ((a[J] = _mm512_fmadd_ps(_mm512_load_ps(in + J * 16), m, a[J])), ...);
  } else if constexpr (kV == kStores) {
    (_mm512_store_ps(out + J * 16, a[J]), ...);
  }
}

template <Tile kT, Vector kV>
AMOEBA_BENCH_AMX __attribute__((noinline)) double NsPerIteration(int64_t iters) {
  Acc a;
  [&]<size_t... J>(std::index_sequence<J...>) AMOEBA_BENCH_AMX {
    ((a[J] = _mm512_set1_ps(1e-3f * (J + 1))), ...);
  }
  (Rows());
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) {
    if constexpr (kT == kProduct) _tile_dpbssd(0, 1, 2);
    if constexpr (kT == kLoads) {
      _tile_loadd(1, operand_a, 32);
      _tile_loadd(2, operand_b, 64);
    }
    if constexpr (kT == kStore) _tile_stored(0, products[i & 1], 64);
    if constexpr (kT == kBlock) {
      _tile_zero(0);
      _tile_loadd(1, operand_a, 32);
      _tile_loadd(2, operand_b, 64);
      _tile_dpbssd(0, 1, 2);
      _tile_stored(0, products[i & 1], 64);
    }
    VectorWork<kV>(Rows(), a, vector_in + (i & 7) * 256, vector_out + (i & 7) * 256);
    asm volatile("" ::: "memory");
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  [&]<size_t... J>(std::index_sequence<J...>) AMOEBA_BENCH_AMX {
    (_mm512_store_ps(vector_out + J * 16, a[J]), ...);
  }
  (Rows());
  return s * 1e9 / static_cast<double>(iters);
}

using Timer = double (*)(int64_t);

constexpr int kVectors = kStores + 1;

template <Tile kT>
constexpr std::array<Timer, kVectors> TimersFor() {
  return {NsPerIteration<kT, kNoVector>, NsPerIteration<kT, kRegisterFmas>,
          NsPerIteration<kT, kConverts>, NsPerIteration<kT, kIntegerAdds>,
          NsPerIteration<kT, kLoadFmas>, NsPerIteration<kT, kStores>};
}

int Run(const Options& o) {
  InitRuntime(1);
  nlohmann::json out = {{"machine", DescribeCpu()}, {"iters", o.iters}, {"rounds", o.rounds}};
  if (!CpuHasAmx(AmxExtension::kInt8)) {
    std::printf("bench/amx_overlap: this CPU (or kernel) has no AMX-INT8; nothing to measure\n");
    out["available"] = false;
    WriteReport(o.out_json, out.dump(2), o.out_md,
                "# bench/amx_overlap\n\nNo AMX-INT8 on " + DescribeCpu() + ".\n");
    return 0;
  }
  TileConfig cfg;
  cfg.rows[0] = 16, cfg.colsb[0] = 64;  // 16 × 16 int32 products
  cfg.rows[1] = 16, cfg.colsb[1] = 32;  // A: 16 rows × 32 int8
  cfg.rows[2] = 8, cfg.colsb[2] = 64;   // B: 8 groups × (16 columns × 4 int8)
  [&]() AMOEBA_BENCH_AMX { _tile_loadconfig(&cfg); }();
  const std::array<std::array<Timer, kVectors>, 5> timers = {
      TimersFor<kNoTile>(), TimersFor<kProduct>(), TimersFor<kLoads>(), TimersFor<kStore>(),
      TimersFor<kBlock>()};
  // ns[tile][vector], every cell once per round, rounds interleaved.
  std::vector<std::vector<std::vector<double>>> ns(5, std::vector<std::vector<double>>(kVectors));
  for (int r = 0; r < o.rounds; ++r)
    for (int t = 0; t < 5; ++t)
      for (int v = 0; v < kVectors; ++v)
        if (t != kNoTile || v != kNoVector) ns[t][v].push_back(timers[t][v](o.iters));
  auto median = [&](int t, int v) {
    return t == kNoTile && v == kNoVector ? 0.0 : MedianOf(ns[t][v]);
  };
  std::string md =
      "# bench/amx_overlap\n\n" + DescribeCpu() +
      ", one thread, buffers in L1; ns per loop iteration, median of " + std::to_string(o.rounds) +
      " interleaved rounds. overlap = (tile + vector - both) / min(tile, vector): 1 = hidden, 0 = "
      "added.\n\n| tile operation | alone | vector work | alone | both | overlap |\n"
      "|---|---|---|---|---|---|\n";
  nlohmann::json rows = nlohmann::json::array();
  for (int t = kProduct; t <= kBlock; ++t)
    for (int v = kRegisterFmas; v <= kStores; ++v) {
      const double tile = median(t, kNoVector), vec = median(kNoTile, v), both = median(t, v);
      const double overlap = (tile + vec - both) / std::min(tile, vec);
      md += fmt::format("| {} | {:.2f} | {} | {:.2f} | {:.2f} | {:.2f} |\n", kTileNames[t], tile,
                        kVectorNames[v], vec, both, overlap);
      rows.push_back({{"tile", kTileNames[t]},
                      {"vector", kVectorNames[v]},
                      {"tile_ns", tile},
                      {"vector_ns", vec},
                      {"both_ns", both},
                      {"overlap", overlap}});
    }
  [&]() AMOEBA_BENCH_AMX { _tile_release(); }();
  out["available"] = true;
  out["results"] = rows;
  WriteReport(o.out_json, out.dump(2), o.out_md, md);
  return 0;
}

}  // namespace
}  // namespace amoeba::bench

int main(int argc, char** argv) {
  amoeba::InitLogging();
  amoeba::bench::Options o;
  CLI::App app{"bench/amx_overlap: what the AMX tile unit overlaps with on this core"};
  app.add_option("--iters", o.iters, "Loop iterations per timing")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--rounds", o.rounds, "Interleaved repetitions (median reported)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--json", o.out_json, "JSON output")->capture_default_str();
  app.add_option("--md", o.out_md, "Markdown output")->capture_default_str();
  if (const std::optional<int> exit_code = amoeba::bench::ParseFlags(app, argc, argv))
    return *exit_code;
  return amoeba::bench::Run(o);
}
