#include "bench/bench_util.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/kernels.h"

namespace amoeba::bench {
namespace {
using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}
}  // namespace

// Prompts of `context` tokens in `batch` slots and one warm-up step, then `steps` decode steps,
// calling after_step(seconds of that step, positions attended over the batch) after each.
template <typename AfterStep>
void RunDecodeSteps(Engine& e, int batch, int steps, int context, AfterStep&& after_step,
                    StepProfile* profile = nullptr) {
  KVCache cache = e.NewCache(batch);
  std::vector<int32_t> prompt(context);
  for (int i = 0; i < context; ++i) prompt[i] = 1 + (4 * i) % 200;
  std::vector<SeqInput> seqs;
  for (int b = 0; b < batch; ++b) {
    seqs.push_back({b, prompt});
    (void)e.Forward(cache, {&seqs.back(), 1});  // one prompt per call: bounded activations
  }
  std::vector<int32_t> next(batch, 7);
  for (int b = 0; b < batch; ++b) seqs[b].tokens = {&next[b], 1};
  (void)e.Forward(cache, seqs);  // warm-up step
  for (int s = 0; s < steps; ++s) {
    const auto t0 = Clock::now();
    absl::StatusOr<at::Tensor> l = [&] {
      ScopedStepProfile attach(profile);  // the timed steps only
      return e.Forward(cache, seqs);
    }();
    // Greedy, as the server's sampler picks (a scalar std::max_element over 16 rows of the
    // 100m preset's 32000 logits took ~0.85 ms, 13% of a q4_0 step).
    const int64_t V = l->size(1);
    const float* logits = l->data_ptr<float>();
    for (int b = 0; b < batch; ++b) next[b] = static_cast<int32_t>(Argmax(logits + b * V, V));
    // This step's token sees the prompt, the warm-up token, the earlier steps and itself.
    after_step(Seconds(t0), static_cast<int64_t>(batch) * (context + 2 + s));
  }
}

double DecodeRate(Engine& e, int batch, int steps, int context) {
  double total = 0;
  RunDecodeSteps(e, batch, steps, context, [&](double s, int64_t) { total += s; });
  return batch * steps / total;
}

std::vector<StepSample> DecodeStepsAgainstProbe(Engine& e, int batch, int steps, int context,
                                                BandwidthProbe& probe, bool paired,
                                                StepProfile* profile) {
  std::vector<StepSample> samples;
  RunDecodeSteps(
      e, batch, steps, context,
      [&](double s, int64_t positions) {
        samples.push_back({s, paired ? probe.ReadGBs(1) : 0.0, positions});
      },
      profile);
  if (!paired) {
    const double gbs = probe.ReadGBs(1);
    for (StepSample& sample : samples) sample.probe_gbs = gbs;
  }
  return samples;
}

std::string StepSplitHeader(const std::string& lead, int lead_columns) {
  std::string md = lead;
  for (int ph = 0; ph < kNumStepPhases; ++ph)
    md += fmt::format(" {} |", StepPhaseName(static_cast<StepPhase>(ph)));
  md += " outside | quantize | wait: first | wait: others |\n|";
  for (int c = 0; c < lead_columns + kNumStepPhases + 4; ++c) md += "---|";
  return md + "\n";
}

std::string StepSplitCells(const StepProfile& p) {
  const double pass_ns = static_cast<double>(std::max<int64_t>(p.pass_ns, 1));
  std::string md;
  for (int ph = 0; ph < kNumStepPhases; ++ph)
    md += fmt::format(" {:.0f}% |", 100.0 * static_cast<double>(p.ns[ph]) / pass_ns);
  return md + fmt::format(" {:.0f}% | {:.0f}% | {:.0f}% | {:.0f}% |\n",
                          100.0 * static_cast<double>(p.pass_ns - p.total_ns()) / pass_ns,
                          100.0 * static_cast<double>(p.quantize_ns) / pass_ns,
                          100.0 * static_cast<double>(p.barrier_wait_ns[0]) / pass_ns,
                          100.0 * static_cast<double>(p.others_wait_ns()) / pass_ns);
}

nlohmann::json StepSplitMs(const StepProfile& p, double per) {
  nlohmann::json ms;
  for (int ph = 0; ph < kNumStepPhases; ++ph)
    ms[std::string(StepPhaseName(static_cast<StepPhase>(ph)))] = p.ns[ph] / 1e6 / per;
  ms["outside_phases"] = (p.pass_ns - p.total_ns()) / 1e6 / per;
  ms["quantize_activations"] = p.quantize_ns / 1e6 / per;
  ms["barrier_wait_first"] = p.barrier_wait_ns[0] / 1e6 / per;
  ms["barrier_wait_others"] = p.others_wait_ns() / 1e6 / per;
  return ms;
}

double PrefillRate(Engine& e, int len) {
  KVCache cache = e.NewCache(1);
  std::vector<int32_t> prompt(len);
  for (int i = 0; i < len; ++i) prompt[i] = (i * 7 + 3) % 200;
  SeqInput in{0, prompt};
  (void)e.Forward(cache, {&in, 1});
  cache.Reset(0);
  const auto t0 = Clock::now();
  (void)e.Forward(cache, {&in, 1});
  return len / Seconds(t0);
}

void WriteReport(const std::string& json_path, const std::string& json_text,
                 const std::string& md_path, const std::string& md) {
  // A bare file name has no parent to create (create_directories("") throws).
  for (const std::string& p : {json_path, md_path})
    if (const auto dir = std::filesystem::path(p).parent_path(); !dir.empty())
      std::filesystem::create_directories(dir);
  std::ofstream(json_path) << json_text << "\n";
  std::ofstream(md_path) << md;
  std::printf("%s", md.c_str());
}

}  // namespace amoeba::bench
