// bench/prefill: prompt-processing tokens/s over prompt lengths, with figures that hold still: a
// warm-up pass over every length, then `--rounds` rounds, each measuring every length once
// (rounds interleaved, so a slow minute of this shared machine hits every length alike); the
// median and the spread (min, max) per length. The prompt goes through the engine in chunks of
// `--chunk` tokens (0 = all at once, as `amoeba-admin generate` does; the server uses
// --prefill-chunk, 64 by default; llama-bench uses 512-token micro-batches). bench/prefill.sh
// runs llama.cpp's llama-bench on the same GGUF file beside it.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <sstream>

#include <nlohmann/json.hpp>

#include "bench/bench_flags.h"
#include "bench/bench_util.h"
#include "model/kernels.h"
#include "model/model_loader.h"
#include "model/packed_linear.h"
#include "model/presets.h"
#include "model/runtime.h"
#include "model/weight_format.h"

namespace amoeba::bench {
namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string model;  // HF directory or .gguf; empty = --preset with random weights
  std::string preset = "100m";
  std::string weights_dtype = "q8_0";
  std::string kv_dtype = "f32";
  std::vector<int> lengths = {128, 256, 512, 1024, 2048, 4096};
  int rounds = 3;
  int chunk = 0;
  int threads = 0;
  // Prefill attention's products: bf16 (the engine's default: AMX-BF16 where the CPU has it, else
  // fp32), fp32, avx512-bf16 (vdpbf16ps, forced); several are measured side by side, interleaved
  // within each round.
  std::vector<std::string> attention = {"bf16"};
  std::string out = "bench/results/prefill";
};

// Seconds to prefill `len` tokens into an empty cache, `chunk` at a time; the passes' time split
// added to `profile` when given.
double PrefillSeconds(Engine& e, KVCache& cache, int len, int chunk,
                      StepProfile* profile = nullptr) {
  std::vector<int32_t> prompt(len);
  for (int i = 0; i < len; ++i) prompt[i] = (i * 7 + 3) % 200;
  cache.Reset(0);
  ScopedStepProfile attach(profile);
  const auto t0 = Clock::now();
  const int step = chunk > 0 ? chunk : len;
  for (int at = 0; at < len; at += step) {
    SeqInput in{0, std::span<const int32_t>(prompt.data() + at, std::min(step, len - at))};
    auto r = e.Forward(cache, {&in, 1});
    if (!r.ok()) {
      std::fprintf(stderr, "prefill: %s\n", std::string(r.status().message()).c_str());
      std::exit(1);
    }
  }
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

int Run(const Options& o) {
  InitRuntime(o.threads);
  at::InferenceMode guard;
  Model m;
  std::string source;
  if (!o.model.empty()) {
    auto loaded = LoadModelOrGguf(o.model);
    if (!loaded.ok()) {
      std::fprintf(stderr, "--model: %s\n", std::string(loaded.status().message()).c_str());
      return 2;
    }
    m = std::move(*loaded);
    source = o.model;
  } else {
    auto cfg = PresetConfig(o.preset);
    if (!cfg.ok()) {
      std::fprintf(stderr, "--preset: %s\n", std::string(cfg.status().message()).c_str());
      return 2;
    }
    m = RandomModel(*cfg, 1, 0.02);
    source = "preset " + o.preset + " (random weights)";
  }
  auto format = ParseWeightFormat(o.weights_dtype);
  if (!format.ok()) {
    std::fprintf(stderr, "--weights-dtype: %s\n", std::string(format.status().message()).c_str());
    return 2;
  }
  PackWeights(m, *format);
  ReleaseRowMajorPages(m);
  const int max_len = *std::max_element(o.lengths.begin(), o.lengths.end());
  EngineOptions eo;
  eo.max_len = max_len + 1;
  eo.kv_dtype = o.kv_dtype == "f16" ? at::kHalf : at::kFloat;
  const int64_t params = m.config.ParameterCount();
  auto model = std::make_shared<const Model>(std::move(m));
  std::vector<std::unique_ptr<Engine>> engines;
  for (const std::string& mode : o.attention) {
    eo.bf16_prefill_attention = mode != "fp32";
    engines.push_back(std::make_unique<Engine>(model, eo));
  }
  KVCache cache = engines[0]->NewCache(1);

  // Rows: (attention mode, length), mode-major.
  const size_t nl = o.lengths.size(), nrows = o.attention.size() * nl;
  // What bf16 runs when not forced (read before any mode forces a kernel).
  const char* auto_kernel = PrefillBf16KernelName(ActivePrefillBf16Kernel(model->config.head_dim));
  // The engine option picks bf16 or fp32; avx512-bf16 also forces the process-wide kernel.
  auto select_kernel = [&](size_t a) {
    ForcePrefillBf16Kernel(o.attention[a] == "avx512-bf16" ? PrefillBf16Kernel::kAvx512Bf16
                                                           : PrefillBf16Kernel::kAuto);
  };
  for (size_t a = 0; a < engines.size(); ++a) {  // warm-up
    select_kernel(a);
    for (int len : o.lengths) (void)PrefillSeconds(*engines[a], cache, len, o.chunk);
  }
  std::vector<std::vector<double>> rates(nrows);
  std::vector<StepProfile> split(nrows);
  for (int r = 0; r < o.rounds; ++r)
    for (size_t i = 0; i < nl; ++i)
      for (size_t a = 0; a < engines.size(); ++a) {
        select_kernel(a);
        rates[a * nl + i].push_back(o.lengths[i] / PrefillSeconds(*engines[a], cache, o.lengths[i],
                                                                  o.chunk, &split[a * nl + i]));
      }

  nlohmann::json rows = nlohmann::json::array();
  std::ostringstream md;
  md << "bench/prefill: " << source << ", " << params / 1e6 << "M params, " << o.weights_dtype
     << " weights, " << o.kv_dtype << " KV, chunk "
     << (o.chunk > 0 ? std::to_string(o.chunk) : "all") << ", " << DescribeCpu() << "; " << o.rounds
     << " interleaved rounds after a warm-up; bf16 attention runs " << auto_kernel << " here\n\n"
     << "| attention | prompt tokens | prefill tok/s (median) | min | max | vs first length |\n"
     << "|---|---|---|---|---|---|\n";
  double first = 0;
  for (size_t i = 0; i < nrows; ++i) {
    std::vector<double> v = rates[i];
    std::sort(v.begin(), v.end());
    const double med = v[v.size() / 2];
    if (i % nl == 0) first = med;
    const int len = o.lengths[i % nl];
    const std::string& mode = o.attention[i / nl];
    rows.push_back({{"attention", mode},
                    {"prompt_tokens", len},
                    {"tokens_per_s_median", med},
                    {"tokens_per_s_min", v.front()},
                    {"tokens_per_s_max", v.back()},
                    {"tokens_per_s_rounds", rates[i]}});
    char line[160];
    std::snprintf(line, sizeof(line), "| %s | %d | %.0f | %.0f | %.0f | %.2fx |\n", mode.c_str(),
                  len, med, v.front(), v.back(), med / first);
    md << line;
  }
  // Where a prompt's time goes as it grows (model/step_profile.h): each phase's share of the
  // passes' wall time, summed over the rounds.
  md << StepSplitHeader(
      "\nTime split (share of the prefill passes' wall time; outside = before and after the "
      "phases, e.g. KV growth):\n\n| attention | prompt tokens | ms per prompt |",
      3);
  for (size_t i = 0; i < nrows; ++i) {
    char cell[96];
    std::snprintf(cell, sizeof(cell), "| %s | %d | %.1f |", o.attention[i / nl].c_str(),
                  o.lengths[i % nl], split[i].pass_ns / 1e6 / o.rounds);
    md << cell << StepSplitCells(split[i]);
    rows[i]["split_ms_per_prompt"] = StepSplitMs(split[i], o.rounds);
  }
  nlohmann::json j = {
      {"model", source},        {"params", params},   {"weights_dtype", o.weights_dtype},
      {"kv_dtype", o.kv_dtype}, {"chunk", o.chunk},   {"threads", at::get_num_threads()},
      {"cpu", DescribeCpu()},   {"rounds", o.rounds}, {"results", rows}};
  WriteReport(o.out + ".json", j.dump(2), o.out + ".md", md.str());
  return 0;
}

}  // namespace
}  // namespace amoeba::bench

int main(int argc, char** argv) {
  amoeba::bench::Options o;
  CLI::App app{"bench/prefill: prompt-processing tokens/s over prompt lengths"};
  app.add_option("--model", o.model, "HF model directory or .gguf file (default: --preset)");
  app.add_option("--preset", o.preset, "Random-weight preset when no --model")
      ->capture_default_str();
  app.add_option("--weights-dtype", o.weights_dtype, "f32 | f16 | q8_0 | q4_0")
      ->capture_default_str();
  app.add_option("--kv-dtype", o.kv_dtype, "f32 | f16")->capture_default_str();
  app.add_option("--lengths", o.lengths, "Prompt lengths")->delimiter(',')->capture_default_str();
  app.add_option("--rounds", o.rounds, "Interleaved rounds")->capture_default_str();
  app.add_option("--chunk", o.chunk, "Tokens per Forward call (0 = the whole prompt)")
      ->capture_default_str();
  app.add_option("--attention", o.attention,
                 "Prefill attention products, one or more of bf16,fp32,avx512-bf16 (side by side)")
      ->delimiter(',')
      ->check(CLI::IsMember({"bf16", "fp32", "avx512-bf16"}))
      ->capture_default_str();
  app.add_option("--threads", o.threads, "Compute threads (0 = all cores)")->capture_default_str();
  app.add_option("--out", o.out, "Report path without extension")->capture_default_str();
  if (const std::optional<int> exit_code = amoeba::bench::ParseFlags(app, argc, argv))
    return *exit_code;
  if (o.rounds < 1 || o.lengths.empty()) {
    std::fprintf(stderr, "--rounds >= 1 and at least one length\n");
    return 2;
  }
  return amoeba::bench::Run(o);
}
