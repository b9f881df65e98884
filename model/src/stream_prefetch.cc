#include "stream_prefetch.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "model/kernels.h"
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
  std::vector<double> seconds[3];
};
std::array<Trial, 2 * kFormats> g_trials;  // per format and size class

WeightFormat FormatOf(int key) {
  return static_cast<WeightFormat>(key / 2);
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// The arms a format's kernels tell apart (the AVX-512 fp32/fp16 kernel has both distances, the
// AVX2 one only one).
// A span over constants: trial steps are decode steps, which allocate nothing.
std::span<const int> Arms(WeightFormat f) {
  static constexpr int kAll[] = {0, 1, 2}, kOffFar[] = {0, 2};
  if (IsQuantized(f) || ActiveKernelIsa() == KernelIsa::kAvx512) return kAll;
  return kOffFar;
}
}  // namespace

int StreamPrefetchArm() {
  if (t_arm >= 0) return t_arm;
  const int forced = g_forced.load(std::memory_order_relaxed);
  return forced >= 0 ? forced : kDefaultPrefetchArm;
}

void ForceStreamPrefetch(StreamPrefetch p) {
  g_forced.store(static_cast<int>(p), std::memory_order_relaxed);
}

int PrefetchTrialKey(WeightFormat f, size_t weight_bytes) {
  if (weight_bytes <= kPrefetchTrialMinBytes) return -1;
  return 2 * static_cast<int>(f) + (weight_bytes > kPrefetchTrialLargeBytes ? 1 : 0);
}

int PrefetchArmForStep(int key, bool* on_trial) {
  *on_trial = false;
  if (key < 0 || g_forced.load(std::memory_order_relaxed) >= 0) return -1;
  Trial& t = g_trials[key];
  const int choice = t.choice.load(std::memory_order_relaxed);
  if (choice >= 0) return choice;
  const std::span<const int> arms = Arms(FormatOf(key));
  std::lock_guard<std::mutex> lock(t.mu);
  *on_trial = true;
  return arms[t.steps++ % arms.size()];  // in turn: the shared machine's bandwidth drifts
}

void RecordPrefetchTrial(int key, int arm, double seconds) {
  if (key < 0 || arm < 0 || arm > 2) return;
  Trial& t = g_trials[key];
  const WeightFormat f = FormatOf(key);
  const std::span<const int> arms = Arms(f);
  std::lock_guard<std::mutex> lock(t.mu);
  if (t.choice.load(std::memory_order_relaxed) >= 0) return;
  t.seconds[arm].push_back(seconds);
  for (int a : arms)
    if (static_cast<int>(t.seconds[a].size()) < kPrefetchTrialSteps) return;
  double median[3] = {0, 0, 0};
  int best = kDefaultPrefetchArm;
  for (int a : arms) median[a] = Median(t.seconds[a]);
  for (int a : arms)
    if (median[a] * 1.03 < median[kDefaultPrefetchArm] && median[a] < median[best]) best = a;
  t.choice.store(best, std::memory_order_relaxed);
  static constexpr const char* kNames[3] = {"off", "near", "far"};
  spdlog::info(
      "panel kernels, {} ({} MB of weights): software prefetch {} at batch 1 ({} decode steps "
      "each: far {:.3f} ms, near {}, off {:.3f} ms)",
      WeightFormatName(f), key % 2 ? "over 512" : "32-512", kNames[best], kPrefetchTrialSteps,
      median[2] * 1e3,
      arms.size() == 3 ? fmt::format("{:.3f} ms", median[1] * 1e3) : std::string("(the same)"),
      median[0] * 1e3);
}

int PrefetchTrialChoice(int key) {
  return key < 0 ? -1 : g_trials[key].choice.load(std::memory_order_relaxed);
}

void ResetPrefetchTrial(int key) {
  if (key < 0) return;
  Trial& t = g_trials[key];
  std::lock_guard<std::mutex> lock(t.mu);
  t.choice.store(-1, std::memory_order_relaxed);
  t.steps = 0;
  for (auto& v : t.seconds) v.clear();
}

ScopedPrefetchArm::ScopedPrefetchArm(int arm) : previous_(t_arm) {
  if (arm >= 0) t_arm = arm;
}
ScopedPrefetchArm::~ScopedPrefetchArm() {
  t_arm = previous_;
}

}  // namespace amoeba
