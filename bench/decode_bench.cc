// bench/decode: prefill and decode throughput of the engine against the memory roofline.
// For each preset and batch size it runs the libtorch-linear baseline and Amoeba's kernels side
// by side in one process, and writes JSON plus a Markdown summary.
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_flags.h"
#include "bench/bench_util.h"
#include "bench/compute_peak.h"
#include "model/engine.h"
#include "model/packed_linear.h"
#include "model/presets.h"
#include "model/quantized_panels.h"
#include "model/runtime.h"
#include "subnet/latency_profile.h"

namespace amoeba::bench {
namespace {

struct Options {
  std::string presets = "100m";
  std::string batches = "1,8";
  int prompt_len = 128;
  int decode_steps = 64;
  int context = 8;  // prompt tokens before the decode steps (KV read per step grows with it)
  int threads = 0;
  int rounds = 3;                     // interleaved repetitions; the median is reported
  bool warm_cache = false;            // decode steps back to back, without a probe after each
  std::string paths;                  // comma-separated path names to run; empty = all
  std::string quant_kernel = "auto";  // the q8_0 / q4_0 kernel (QuantKernelName) or auto
  std::string out_json = "bench/results/decode.json";
  std::string out_md = "bench/results/decode.md";
};

int Run(const Options& o) {
  InitRuntime(o.threads);
  at::InferenceMode guard;
  // Another integer kernel than the CPU's best (e.g. AVX512-VNNI on an AMX Xeon, as a Zen core
  // runs q8_0 / q4_0).
  if (o.quant_kernel != "auto") {
    const std::vector<QuantKernel> kernels = AvailableQuantKernels();
    const auto k = std::find_if(kernels.begin(), kernels.end(), [&](QuantKernel q) {
      return o.quant_kernel == QuantKernelName(q);
    });
    if (k == kernels.end()) {
      std::string names;
      for (QuantKernel q : kernels)
        names += absl::StrCat(names.empty() ? "" : ", ", QuantKernelName(q));
      std::fprintf(stderr, "bench/decode: --quant-kernel %s: this CPU runs %s\n",
                   o.quant_kernel.c_str(), names.c_str());
      return 2;
    }
    ForceQuantKernel(*k);
  }
  const double bw = MeasureReadBandwidthGBs();
  spdlog::info("bench/decode: memory read bandwidth {:.1f} GB/s", bw);
  // The multiply-add ceilings of the projections' instructions on this machine's threads.
  const ComputePeak fp32_peak = MeasureFp32Peak(at::get_num_threads());
  const ComputePeak int8_peak = MeasureInt8Peak(ActiveQuantKernel(), at::get_num_threads());
  for (const ComputePeak* p : {&fp32_peak, &int8_peak})
    if (p->multiply_adds_per_s > 0)
      spdlog::info("bench/decode: {} peak {:.0f} G multiply-adds/s on {} threads", p->instruction,
                   p->multiply_adds_per_s / 1e9, at::get_num_threads());
  auto peak_json = [](const ComputePeak& p) {
    return nlohmann::json{{"instruction", p.instruction},
                          {"multiply_adds_per_s", p.multiply_adds_per_s}};
  };
  nlohmann::json out = {{"bandwidth_gbs", bw},
                        {"fp32_peak", peak_json(fp32_peak)},
                        {"int8_peak", peak_json(int8_peak)},
                        {"quant_kernel", QuantKernelName(ActiveQuantKernel())},
                        {"threads", at::get_num_threads()},
                        {"rounds", o.rounds},
                        {"results", nlohmann::json::array()}};
  std::vector<int> batches;
  for (auto s : absl::StrSplit(o.batches, ',')) batches.push_back(std::stoi(std::string(s)));
  std::string md = fmt::format(
      "# bench/decode\n\n{} threads, {} rounds, q8_0 / q4_0 kernel {}, decode after {}-token "
      "prompts: every (path, batch) is measured once per round after one untimed pass, "
      "rounds interleaved, and the median is reported (this shared machine's bandwidth drifts by "
      "~1.5x within minutes). {}; a step's "
      "roofline is that probe's bandwidth / the bytes the step reads: the path's own weight bytes "
      "(its format: fp32, fp16, q8_0 = 8.5 bits, q4_0 = 4.5 bits per weight) plus the KV cache "
      "its sequences attend to (KV MB/step: the mean over the steps), and % of roofline is the "
      "median over every step of every round. GB/s probed: the median probe; roofline tok/s per "
      "stream: "
      "that probe over the mean bytes per step.\n\n"
      "| preset | params | path | weight MB/step | KV MB/step | prefill tok/s | batch | decode "
      "tok/s (aggregate) | per stream | GB/s probed | roofline tok/s per stream | % of roofline "
      "per step "
      "|\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|\n",
      at::get_num_threads(), o.rounds, QuantKernelName(ActiveQuantKernel()), o.context,
      o.warm_cache ? "--warm-cache: the decode steps run back to back (weights that fit in the L3 "
                     "stay there, as llama-bench runs them), one 256 MiB read probe after them"
                   : "Every decode step is followed by one 256 MiB read probe");
  auto wanted = [&](const std::string& path) {
    return o.paths.empty() ||
           absl::StrContains(absl::StrCat(",", o.paths, ","), absl::StrCat(",", path, ","));
  };
  // How close to the roofline a step could get at all: its projections' multiply-adds at the
  // instruction's peak take `compute floor` ms; the projections cannot be shorter than that nor
  // than their weights' bytes at the probe's rate, and attention's KV bytes come on top (between
  // a layer's projections), so roofline ms / (max(weights ms, compute floor ms) + KV ms) bounds
  // its % of the roofline (generously: the per-block scales and everything else cost more).
  std::string ceiling_md = fmt::format(
      "\nCompute ceiling (the projections' multiply-adds per step at the peak of their "
      "instruction on {} threads, measured on registers before the run: fp32 / fp16 panels {} "
      "{:.0f} G/s, q8_0 / q4_0 panels {} {:.0f} G/s; highest reachable = roofline ms / "
      "(max(weight bytes ms, compute floor ms) + KV bytes ms), an upper bound on % of roofline "
      "(attention reads the KV cache between a layer's projections); projections ms: the "
      "q/k/v, o, gate/up, down and head phases of the step split below, and the peak's share "
      "of them):\n\n"
      "| preset | path | batch | roofline ms/step | compute floor ms/step | highest reachable % "
      "of roofline | projections ms/step | projections at % of the peak |\n"
      "|---|---|---|---|---|---|---|---|\n",
      at::get_num_threads(), fp32_peak.instruction, fp32_peak.multiply_adds_per_s / 1e9,
      int8_peak.instruction.empty() ? "-" : int8_peak.instruction,
      int8_peak.multiply_adds_per_s / 1e9);
  // Where a decode step's time goes (model/step_profile.h: wall time per phase on the first
  // thread, barrier waits included; activation quantization is part of the projections).
  std::string split_md = StepSplitHeader(
      "\nStep time split (the timed decode steps of every round: mean pass time, and each "
      "phase's share of it; outside = before and after the phases: input checks, KV growth, "
      "starting the team; quantize = activation quantization, part of the projections; wait = "
      "time in the team's barriers, of its first thread and the mean of the others, part of "
      "the phases):\n\n| "
      "preset | path | batch | pass ms |",
      4);
  for (auto name : absl::StrSplit(o.presets, ',')) {
    auto cfg = PresetConfig(std::string(name));
    if (!cfg.ok()) {
      spdlog::error("{}", cfg.status().ToString());
      return 2;
    }
    spdlog::info("bench/decode: building random {} model", std::string(name));
    // Row-major weights (libtorch baseline, Amoeba's row-major GEMV/skinny kernels) and the same
    // weights as packed panels, fp32 and fp16 (what the engine decodes from by default).
    auto rowmajor = std::make_shared<const Model>(RandomModel(*cfg, 0));
    auto packed = [&](WeightFormat f) {
      Model m = *rowmajor;
      PackWeights(m, f);
      if (f != WeightFormat::kF32) DropPackedRowMajor(m);  // panels only: TinyLlama's memory
      return std::make_shared<const Model>(std::move(m));
    };
    struct Variant {
      LinearPath path;
      const char* name;
      std::shared_ptr<const Model> model;
      std::unique_ptr<Engine> engine = nullptr;
      std::vector<double> prefills = {};                      // [round]
      std::vector<std::vector<double>> rates = {}, bws = {};  // [batch][round]
      std::vector<std::vector<double>> pcts = {};             // [batch][step of every round]
      std::vector<double> kv_bytes = {};                      // [batch]: mean KV read per step
      std::vector<StepProfile> split = {};                    // [batch]: over every round
      at::ScalarType kv_dtype = at::kFloat;
    };
    std::vector<Variant> variants;
    variants.push_back({LinearPath::kTorch, "libtorch-linear", rowmajor});
    variants.push_back({LinearPath::kAuto, "amoeba-fp32-rowmajor", rowmajor});
    auto packed32 = packed(WeightFormat::kF32);
    variants.push_back({LinearPath::kAuto, "amoeba-fp32", packed32});
    variants.push_back({.path = LinearPath::kAuto,
                        .name = "amoeba-fp32-kv16",
                        .model = packed32,
                        .kv_dtype = at::kHalf});
    for (auto [f, path] : {std::pair{WeightFormat::kF16, "amoeba-fp16"},
                           std::pair{WeightFormat::kQ8_0, "amoeba-q8_0"},
                           std::pair{WeightFormat::kQ4_0, "amoeba-q4_0"}})
      if (wanted(path) || wanted(std::string(path) + "-kv16")) {
        auto m = packed(f);
        variants.push_back({LinearPath::kAuto, path, m});
        if (f != WeightFormat::kF16)  // fp16 keys and values, as llama.cpp caches them by default
          variants.push_back(
              {.path = LinearPath::kAuto,
               .name = f == WeightFormat::kQ8_0 ? "amoeba-q8_0-kv16" : "amoeba-q4_0-kv16",
               .model = m,
               .kv_dtype = at::kHalf});
      }
    std::erase_if(variants, [&](const Variant& v) { return !wanted(v.name); });
    for (Variant& v : variants) {
      v.engine = std::make_unique<Engine>(
          v.model, EngineOptions{.max_len = std::max(
                                     256, std::max(o.prompt_len, o.context) + o.decode_steps + 8),
                                 .linear_path = v.path,
                                 .kv_dtype = v.kv_dtype});
      v.rates.assign(batches.size(), {});
      v.bws.assign(batches.size(), {});
      v.pcts.assign(batches.size(), {});
      v.kv_bytes.assign(batches.size(), 0);
      v.split.assign(batches.size(), {});
    }
    auto bytes_of = [](const Variant& v) {
      return static_cast<double>(v.model->DecodeWeightBytes());
    };
    BandwidthProbe probe(256);
    // One untimed pass of every (path, batch) first: the first decode steps of the process touch
    // the KV cache's memory for the first time (page faults; its arenas are then pooled), which
    // made the first round of the first path up to 2x slower and put ~15 points of "outside" in
    // its time split.
    for (Variant& v : variants) {
      (void)PrefillRate(*v.engine, o.prompt_len);
      for (int b : batches)
        (void)DecodeStepsAgainstProbe(*v.engine, b, o.decode_steps, o.context, probe, false);
    }
    for (int r = 0; r < o.rounds; ++r) {
      for (Variant& v : variants) {
        v.prefills.push_back(PrefillRate(*v.engine, o.prompt_len));
        for (size_t bi = 0; bi < batches.size(); ++bi) {
          const std::vector<StepSample> steps =
              DecodeStepsAgainstProbe(*v.engine, batches[bi], o.decode_steps, o.context, probe,
                                      !o.warm_cache, &v.split[bi]);
          double seconds = 0;
          std::vector<double> probes;
          const double kv_per_position =
              static_cast<double>(v.model->KvBytesPerPosition(at::elementSize(v.kv_dtype)));
          double kv_sum = 0;
          for (const StepSample& st : steps) {
            seconds += st.seconds;
            probes.push_back(st.probe_gbs);
            // One step reads the weights once, whatever the batch, and every sequence's cached
            // keys and values: its share of the roofline.
            const double kv = kv_per_position * static_cast<double>(st.positions);
            kv_sum += kv;
            v.pcts[bi].push_back(100.0 * (bytes_of(v) + kv) / (st.seconds * st.probe_gbs * 1e9));
          }
          v.kv_bytes[bi] = kv_sum / static_cast<double>(std::max<size_t>(steps.size(), 1));
          v.rates[bi].push_back(batches[bi] * static_cast<double>(steps.size()) / seconds);
          v.bws[bi].push_back(MedianOf(probes));
          spdlog::info("{} {} batch {} round {}: {:.1f} tok/s ({:.1f} GB/s probed)",
                       std::string(name), v.name, batches[bi], r + 1, v.rates[bi].back(),
                       v.bws[bi].back());
        }
      }
    }
    for (const Variant& v : variants) {
      for (size_t bi = 0; bi < batches.size(); ++bi) {
        const int b = batches[bi];
        const double bytes = bytes_of(v);
        const double rate = MedianOf(v.rates[bi]), bw_now = MedianOf(v.bws[bi]);
        const double prefill = MedianOf(v.prefills);
        const double roof = bw_now * 1e9 / (bytes + v.kv_bytes[bi]);
        const double pct = MedianOf(v.pcts[bi]);  // each step against its own probe
        out["results"].push_back({{"preset", std::string(name)},
                                  {"params", cfg->ParameterCount()},
                                  {"weight_bytes_per_step", bytes},
                                  {"kv_bytes_per_step", v.kv_bytes[bi]},
                                  {"path", v.name},
                                  {"batch", b},
                                  {"prefill_tokens_per_s", prefill},
                                  {"prefill_tokens_per_s_rounds", v.prefills},
                                  {"decode_tokens_per_s", rate},
                                  {"decode_tokens_per_s_rounds", v.rates[bi]},
                                  {"decode_tokens_per_s_per_stream", rate / b},
                                  {"bandwidth_gbs", bw_now},
                                  {"bandwidth_gbs_rounds", v.bws[bi]},
                                  {"roofline_tokens_per_s", roof},
                                  {"percent_of_roofline_per_step", pct},
                                  {"percent_of_roofline_steps", v.pcts[bi]}});
        const bool int8 =
            v.model->head_panels.defined() && IsQuantized(PanelsFormat(v.model->head_panels));
        const double peak = (int8 ? int8_peak : fp32_peak).multiply_adds_per_s;
        const double macs = static_cast<double>(b) * v.model->DecodeMultiplyAdds();
        const double roof_ms = 1e3 / roof;  // one step: the roofline's tokens per stream
        const double floor_ms = peak > 0 ? macs / peak * 1e3 : 0;
        // The projections cannot take less than their weights' bytes or their multiply-adds
        // allow, and attention reads the KV cache between them (a layer's o projection needs its
        // attention's output): the step cannot be shorter than the slower of the first two plus
        // the KV's bytes.
        const double weights_ms = bytes / (bw_now * 1e9) * 1e3,
                     kv_ms = v.kv_bytes[bi] / (bw_now * 1e9) * 1e3;
        const double reachable =
            100.0 * roof_ms / std::max(roof_ms, std::max(weights_ms, floor_ms) + kv_ms);
        out["results"].back()["multiply_adds_per_step"] = macs;
        out["results"].back()["roofline_ms_per_step"] = roof_ms;
        out["results"].back()["compute_floor_ms_per_step"] = floor_ms;
        out["results"].back()["highest_reachable_percent_of_roofline"] = reachable;
        const StepProfile& sp = v.split[bi];
        const double passes = static_cast<double>(std::max<int64_t>(sp.passes, 1));
        double proj_ns = 0;
        for (StepPhase ph : {StepPhase::kQkv, StepPhase::kO, StepPhase::kGateUp, StepPhase::kDown,
                             StepPhase::kHead})
          proj_ns += static_cast<double>(sp.ns[static_cast<int>(ph)]);
        const double proj_ms = proj_ns / 1e6 / passes;
        out["results"].back()["projections_ms_per_step"] = proj_ms;
        ceiling_md += peak > 0 && proj_ms > 0
                          ? fmt::format(
                                "| {} | {} | {} | {:.2f} | {:.2f} | {:.0f}% | {:.2f} | "
                                "{:.0f}% |\n",
                                std::string(name), v.name, b, roof_ms, floor_ms, reachable, proj_ms,
                                100 * floor_ms / proj_ms)
                          : fmt::format("| {} | {} | {} | {:.2f} | - | - | - | - |\n",
                                        std::string(name), v.name, b, roof_ms);
        out["results"].back()["step_split_ms"] = StepSplitMs(sp, passes);
        out["results"].back()["pass_ms"] = sp.pass_ns / 1e6 / passes;
        split_md += fmt::format("| {} | {} | {} | {:.2f} |", std::string(name), v.name, b,
                                sp.pass_ns / 1e6 / passes) +
                    StepSplitCells(sp);
        md += fmt::format(
            "| {} | {:.0f}M | {} | {:.0f} | {:.1f} | {:.0f} | {} | {:.1f} | {:.1f} | {:.1f} | "
            "{:.1f} | {:.0f}% |\n",
            std::string(name), cfg->ParameterCount() / 1e6, v.name, bytes / 1e6,
            v.kv_bytes[bi] / 1e6, prefill, b, rate, rate / b, bw_now, roof, pct);
      }
    }
  }
  // Ratios of medians measured side by side ("-" where a path was not run).
  auto find = [&](const std::string& preset, const std::string& path, int batch) -> double {
    for (const auto& r : out["results"])
      if (r["preset"] == preset && r["path"] == path && r["batch"] == batch)
        return r["decode_tokens_per_s"].get<double>();
    return 0;
  };
  auto ratio = [](double a, double b) {
    return a > 0 && b > 0 ? fmt::format("{:.2f}x", a / b) : std::string("-");
  };
  md += ceiling_md;
  md += split_md;
  md +=
      "\nRatios (same run; amoeba-fp32 = packed panels, the default path):\n\n| preset | batch | "
      "fp32 / libtorch | fp32 / fp32-rowmajor | fp16 / fp32 | q8_0 / fp16 | q4_0 / q8_0 | "
      "fp32-kv16 / fp32 | fp32 batch / fp32 batch 1 | fp16 batch / fp16 batch 1 | q8_0 batch / "
      "q8_0 batch 1 |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (auto name : absl::StrSplit(o.presets, ',')) {
    const std::string p(name);
    for (int b : batches) {
      const double f = find(p, "amoeba-fp32", b), h = find(p, "amoeba-fp16", b);
      const double q8 = find(p, "amoeba-q8_0", b), q4 = find(p, "amoeba-q4_0", b);
      md += fmt::format("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n", p, b,
                        ratio(f, find(p, "libtorch-linear", b)),
                        ratio(f, find(p, "amoeba-fp32-rowmajor", b)), ratio(h, f), ratio(q8, h),
                        ratio(q4, q8), ratio(find(p, "amoeba-fp32-kv16", b), f),
                        ratio(f, find(p, "amoeba-fp32", 1)), ratio(h, find(p, "amoeba-fp16", 1)),
                        ratio(q8, find(p, "amoeba-q8_0", 1)));
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
  app.add_option("--context", o.context, "Prompt tokens before the decode steps")
      ->capture_default_str()
      ->check(CLI::Range(1, 8192));
  app.add_option("--threads", o.threads, "Threads (0 = all cores)")->capture_default_str();
  app.add_option("--rounds", o.rounds, "Interleaved repetitions (median reported)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option(
      "--paths", o.paths,
      "Comma-separated paths to run (libtorch-linear, amoeba-fp32-rowmajor, "
      "amoeba-fp32, amoeba-fp16, amoeba-fp32-kv16, amoeba-q8_0, amoeba-q4_0); empty = all");
  app.add_option("--quant-kernel", o.quant_kernel,
                 "The q8_0 / q4_0 kernel: auto (the CPU's best), or amx-int8, avx512-vnni, "
                 "avx-vnni, avx2, scalar where the CPU runs it")
      ->capture_default_str();
  app.add_flag("--warm-cache", o.warm_cache,
               "Decode steps back to back, one probe after them (weights that fit in the L3 stay "
               "there, as llama-bench runs them); default: a probe after every step");
  app.add_option("--json", o.out_json, "JSON output")->capture_default_str();
  app.add_option("--md", o.out_md, "Markdown output")->capture_default_str();
  if (const std::optional<int> exit_code = amoeba::bench::ParseFlags(app, argc, argv))
    return *exit_code;
  return amoeba::bench::Run(o);
}
