#include "model/stream_prefetch.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <mutex>
#include <vector>

#include "spdlog/spdlog.h"

namespace amoeba {

namespace {
constexpr int kFormats = 4;
std::atomic<int> g_forced{static_cast<int>(StreamPrefetch::kAuto)};
thread_local int t_arm = -1;

struct Trial {
  std::atomic<int> choice{-1};  // -1: on trial
  std::mutex mu;
  int steps = 0;  // arms handed out
  std::vector<double> seconds[2];
};
std::array<Trial, kFormats> g_trials;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}
}  // namespace

bool StreamPrefetchOn(WeightFormat f) {
  if (t_arm >= 0) return t_arm == 1;
  const int forced = g_forced.load(std::memory_order_relaxed);
  if (forced >= 0) return forced == 1;
  return g_trials[static_cast<int>(f)].choice.load(std::memory_order_relaxed) != 0;
}

void ForceStreamPrefetch(StreamPrefetch p) {
  g_forced.store(static_cast<int>(p), std::memory_order_relaxed);
}

int PrefetchTrialArm(WeightFormat f) {
  Trial& t = g_trials[static_cast<int>(f)];
  if (t.choice.load(std::memory_order_relaxed) >= 0) return -1;
  if (g_forced.load(std::memory_order_relaxed) >= 0) return -1;
  std::lock_guard<std::mutex> lock(t.mu);
  return t.steps++ % 2;  // alternating: the shared machine's bandwidth drifts
}

void RecordPrefetchTrial(WeightFormat f, int arm, double seconds) {
  if (arm < 0 || arm > 1) return;
  Trial& t = g_trials[static_cast<int>(f)];
  std::lock_guard<std::mutex> lock(t.mu);
  if (t.choice.load(std::memory_order_relaxed) >= 0) return;
  t.seconds[arm].push_back(seconds);
  if (static_cast<int>(std::min(t.seconds[0].size(), t.seconds[1].size())) < kPrefetchTrialSteps)
    return;
  const double off = Median(t.seconds[0]), on = Median(t.seconds[1]);
  const bool keep_on = !(off * 1.03 < on);
  t.choice.store(keep_on ? 1 : 0, std::memory_order_relaxed);
  spdlog::info(
      "panel kernels, {}: software prefetch {} at batch 1 ({} decode steps each way: {:.3f} ms "
      "with it, {:.3f} ms without)",
      WeightFormatName(f), keep_on ? "on" : "off", kPrefetchTrialSteps, on * 1e3, off * 1e3);
}

int PrefetchTrialChoice(WeightFormat f) {
  return g_trials[static_cast<int>(f)].choice.load(std::memory_order_relaxed);
}

void ResetPrefetchTrial(WeightFormat f) {
  Trial& t = g_trials[static_cast<int>(f)];
  std::lock_guard<std::mutex> lock(t.mu);
  t.choice.store(-1, std::memory_order_relaxed);
  t.steps = 0;
  t.seconds[0].clear();
  t.seconds[1].clear();
}

ScopedPrefetchArm::ScopedPrefetchArm(int arm) : previous_(t_arm) {
  if (arm >= 0) t_arm = arm;
}
ScopedPrefetchArm::~ScopedPrefetchArm() {
  t_arm = previous_;
}

}  // namespace amoeba
