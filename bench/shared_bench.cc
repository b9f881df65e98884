// bench/shared: the shared decode step without a server or a load generator. A supernet of a
// preset (random weights and calibration tokens, panels in one format); 16 sequences (or
// --streams) whose shapes cycle over k distinct grid shapes, k = 1, 2, 4, 8, the same eight shapes
// bench/serve picks (the full shape first, the smallest second); every shape a view of the
// supernet's panels, as the server's lanes are. Each step is one Engine::ForwardShared over every
// shape in flight (one shape: its engine's Forward, as the scheduler runs it). Reported per k:
// aggregate decode tokens/s (median over interleaved rounds), its ratio to one shape in the same
// round, the step time and its split by phase. The client's and the server's own costs are left
// out: bench/serve measures those, with its load generator on the same cores.
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "bench/bench_flags.h"
#include "bench/bench_util.h"
#include "bench/random_supernet.h"
#include "lora/smol.h"
#include "model/engine.h"
#include "model/kernels.h"
#include "model/presets.h"
#include "model/runtime.h"
#include "model/step_profile.h"
#include "subnet/calibrate.h"
#include "subnet/latency_profile.h"
#include "subnet/subnet_builder.h"

namespace amoeba::bench {
namespace {

struct Options {
  std::string preset = "100m";
  std::string weights_dtype = "q8_0";  // decode panels: f32 | f16 | q8_0 | q4_0
  int streams = 16;
  int context = 8;  // prompt tokens per sequence
  int steps = 32;   // timed shared steps per measurement
  int rounds = 3;   // interleaved repetitions; medians reported
  int threads = 0;
  // SMoL adapters (default config, random nonzero factors) attached unmerged to every shape, as the
  // server runs a tuned supernet's shapes that have no merged copy.
  bool adapters = false;
  std::string out_json = "bench/results/shared.json";
  std::string out_md = "bench/results/shared.md";
};

// The CPU's model name (for the report: figures mean little without the machine).
std::string CpuModelName() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      return colon == std::string::npos ? line : line.substr(colon + 2);
    }
  return "unknown CPU";
}

// Eight distinct shapes spread over the grid (bench/serve's pool): the first k are used.
std::vector<Shape> ShapePool(const SupernetSpec& spec) {
  const auto& d = spec.depths;  // ascending
  const auto& w = spec.widths;  // descending
  const int64_t dmax = d.back(), dmin = d.front(), dmid = d[d.size() / 2];
  const double w0 = w.front(), wlast = w.back(), wmid = w[w.size() / 2];
  const double w1 = w[std::min<size_t>(1, w.size() - 1)];
  return {{dmax, w0},    {dmin, wlast}, {dmax, wmid}, {dmid, w1},
          {dmax, wlast}, {dmid, wmid},  {dmin, w0},   {dmid, wlast}};
}

struct Lane {
  Shape shape;
  std::unique_ptr<Engine> engine;
  std::vector<int64_t> layer_keys;
};

struct Mix {
  double tokens_per_s = 0, step_ms = 0;
  StepProfile profile;
};

// `streams` sequences over lanes[0, k): prompts, one untimed step, then `steps` timed steps.
Mix RunMix(std::vector<Lane>& lanes, int k, const Options& o, SharedWorkspace& ws) {
  std::vector<KVCache> caches;
  std::vector<std::vector<SeqInput>> seqs(k);
  std::vector<std::vector<int32_t>> next(k);
  std::vector<int32_t> prompt(o.context);
  for (int i = 0; i < o.context; ++i) prompt[i] = 1 + (4 * i) % 200;
  for (int g = 0; g < k; ++g) {
    const int n = o.streams / k + (g < o.streams % k ? 1 : 0);
    caches.push_back(lanes[g].engine->NewCache(n));
    next[g].assign(n, 7);
    for (int s = 0; s < n; ++s) {
      SeqInput p{s, prompt};
      (void)lanes[g].engine->Forward(caches[g], {&p, 1});
      seqs[g].push_back({s, {&next[g][s], 1}});
    }
  }
  std::vector<SharedForwardGroup> groups(k);
  for (int g = 0; g < k; ++g)
    groups[g] = {.engine = lanes[g].engine.get(),
                 .cache = &caches[g],
                 .seqs = seqs[g],
                 .layer_keys = lanes[g].layer_keys};
  auto step = [&] {
    if (k == 1) {
      auto l = groups[0].engine->Forward(*groups[0].cache, groups[0].seqs);
      groups[0].logits = l.ok() ? *l : at::Tensor();
      return l.ok();
    }
    return Engine::ForwardShared(groups, ws).ok();
  };
  auto greedy = [&] {
    for (int g = 0; g < k; ++g) {
      const int64_t V = groups[g].logits.size(1);
      const float* logits = groups[g].logits.data_ptr<float>();
      for (size_t s = 0; s < seqs[g].size(); ++s)
        next[g][s] = static_cast<int32_t>(Argmax(logits + s * V, V));
    }
  };
  Mix mix;
  if (!step()) return mix;  // warm-up
  greedy();
  double seconds = 0;
  for (int s = 0; s < o.steps; ++s) {
    const auto t0 = std::chrono::steady_clock::now();
    bool ok;
    {
      ScopedStepProfile attach(&mix.profile);
      ok = step();
    }
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!ok) return Mix{};
    greedy();
  }
  mix.tokens_per_s = o.streams * o.steps / seconds;
  mix.step_ms = 1e3 * seconds / o.steps;
  return mix;
}

int Run(const Options& o) {
  InitRuntime(o.threads);
  at::InferenceMode guard;
  const auto flags = ParseRandomSupernetFlags(o.preset, o.weights_dtype);
  if (!flags.ok()) {
    spdlog::error("{}", std::string(flags.status().message()));
    return 2;
  }
  if (o.streams < 8) {
    spdlog::error("--streams must be at least 8 (one per shape of the largest mix)");
    return 2;
  }
  spdlog::info("bench/shared: building a {} supernet (random weights and calibration tokens)",
               o.preset);
  const CalibrateOptions defaults;
  auto built =
      RandomSupernet(flags->config, defaults.widths, defaults.min_depth_ratio, flags->format);
  if (!built.ok()) {
    spdlog::error("{}", built.status().ToString());
    return 1;
  }
  const Supernet& s = **built;
  std::unique_ptr<Smol> smol;
  if (o.adapters) {
    smol = std::make_unique<Smol>(s.base(), static_cast<int64_t>(s.spec().widths.size()),
                                  SmolConfig{}, 7);
    // B starts at zero (a fresh LoRA); nonzero factors make the deltas' arithmetic real.
    for (auto& [name, t] : smol->NamedParameters())
      if (name.ends_with(".lora_B")) const_cast<at::Tensor&>(t).normal_(0, 0.01);
  }
  std::vector<Lane> lanes;
  std::vector<double> build_ms;  // each lane's BuildSubnet (with adapters: packing its deltas)
  for (const Shape& sh : ShapePool(s.spec())) {
    const auto build_started = std::chrono::steady_clock::now();
    auto m = BuildSubnet(s, smol.get(), sh, {.adapters = AdapterMode::kUnmerged});
    build_ms.push_back(
        1e3 *
        std::chrono::duration<double>(std::chrono::steady_clock::now() - build_started).count());
    if (!m.ok()) {
      spdlog::error("{}: {}", sh.ToString(), m.status().ToString());
      return 1;
    }
    Lane lane;
    lane.shape = sh;
    lane.engine = std::make_unique<Engine>(std::make_shared<const Model>(std::move(*m)),
                                           EngineOptions{.max_len = o.context + o.steps + 8});
    for (int64_t layer : s.spec().FindDepth(sh.depth)->layers) lane.layer_keys.push_back(layer);
    lanes.push_back(std::move(lane));
  }
  SharedWorkspace ws;
  const std::vector<int> ks = {1, 2, 4, 8};
  std::vector<std::vector<Mix>> runs(ks.size());
  for (int r = 0; r < o.rounds; ++r)
    for (size_t i = 0; i < ks.size(); ++i) {
      runs[i].push_back(RunMix(lanes, ks[i], o, ws));
      if (runs[i].back().tokens_per_s == 0) {
        spdlog::error("a shared step failed ({} shapes)", ks[i]);
        return 1;
      }
      spdlog::info("round {}, {} shapes: {:.1f} tok/s ({:.2f} ms a step)", r + 1, ks[i],
                   runs[i].back().tokens_per_s, runs[i].back().step_ms);
    }
  nlohmann::json out = {{"preset", o.preset},
                        {"weights_dtype", o.weights_dtype},
                        {"streams", o.streams},
                        {"context", o.context},
                        {"steps", o.steps},
                        {"rounds", o.rounds},
                        {"threads", at::get_num_threads()},
                        {"adapters", o.adapters},
                        {"lane_build_ms", build_ms},
                        {"machine", CpuModelName()},
                        {"mixes", nlohmann::json::array()}};
  std::string md = fmt::format(
      "# bench/shared\n\n{}; {} preset, {} panels{}, {} threads; {} sequences over k shapes, one "
      "shared step each ({}-token prompts, {} timed steps), {} interleaved rounds, medians\n\n"
      "| shapes | tok/s (aggregate) | vs 1 shape (same round) | step ms |\n|---|---|---|---|\n",
      CpuModelName(), o.preset, o.weights_dtype,
      o.adapters ? ", SMoL adapters unmerged (low-rank deltas)" : "", at::get_num_threads(),
      o.streams, o.context, o.steps, o.rounds);
  std::string split = StepSplitHeader("| shapes | pass ms |", 2);
  for (size_t i = 0; i < ks.size(); ++i) {
    std::vector<double> rates, ratios, ms;
    StepProfile total;
    for (int r = 0; r < o.rounds; ++r) {
      const Mix& m = runs[i][r];
      rates.push_back(m.tokens_per_s);
      ratios.push_back(m.tokens_per_s / runs[0][r].tokens_per_s);
      ms.push_back(m.step_ms);
      total.Add(m.profile);
    }
    const double rate = MedianOf(rates), ratio = MedianOf(ratios), step_ms = MedianOf(ms);
    std::vector<std::string> names;
    for (int g = 0; g < ks[i]; ++g) names.push_back(lanes[g].shape.ToString());
    out["mixes"].push_back({{"shapes", names},
                            {"tokens_per_s", rate},
                            {"tokens_per_s_rounds", rates},
                            {"ratio_to_one_shape", ratio},
                            {"step_ms", step_ms},
                            {"split_ms", StepSplitMs(total, total.passes)}});
    md += fmt::format("| {} | {:.1f} | {:.2f}x | {:.2f} |\n", ks[i], rate, ratio, step_ms);
    split += fmt::format("| {} | {:.2f} |", ks[i],
                         total.pass_ns / 1e6 / std::max<int64_t>(total.passes, 1)) +
             StepSplitCells(total);
  }
  md += fmt::format(
      "\nLane builds (BuildSubnet{}): median {:.1f} ms, max {:.1f} ms over {} shapes\n",
      o.adapters ? ", views plus the shape's deltas packed as panels" : ", views",
      MedianOf(build_ms), *std::max_element(build_ms.begin(), build_ms.end()), build_ms.size());
  md += "\nStep time split (every timed step of every round; the phases' share of the pass):\n\n" +
        split;
  WriteReport(o.out_json, out.dump(2), o.out_md, md);
  return 0;
}

}  // namespace
}  // namespace amoeba::bench

int main(int argc, char** argv) {
  amoeba::InitLogging();
  amoeba::bench::Options o;
  CLI::App app{"bench/shared: shared decode steps over 1, 2, 4 and 8 shapes, without a server"};
  app.add_option("--preset", o.preset, "tiny | 100m | tinyllama")->capture_default_str();
  app.add_option("--weights-dtype", o.weights_dtype, "Decode panels: f32 | f16 | q8_0 | q4_0")
      ->capture_default_str();
  app.add_option("--streams", o.streams, "Sequences in every step (at least 8)")
      ->capture_default_str();
  app.add_option("--context", o.context, "Prompt tokens per sequence")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--steps", o.steps, "Timed shared steps per measurement")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--rounds", o.rounds, "Interleaved repetitions (medians reported)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--threads", o.threads, "Threads (0 = all cores)")->capture_default_str();
  app.add_flag("--adapters", o.adapters,
               "Attach SMoL adapters (random factors) unmerged to every shape");
  app.add_option("--json", o.out_json, "JSON output")->capture_default_str();
  app.add_option("--md", o.out_md, "Markdown output")->capture_default_str();
  if (const std::optional<int> exit_code = amoeba::bench::ParseFlags(app, argc, argv))
    return *exit_code;
  return amoeba::bench::Run(o);
}
