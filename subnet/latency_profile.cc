#include "subnet/latency_profile.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>

#include "model/engine.h"

namespace amoeba {
namespace {

using SteadyClock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// One model's engine and single-sequence cache; decodes `steps` tokens per call, restarting the
// sequence when the cache would fill.
struct Runner {
  std::unique_ptr<Engine> engine;
  KVCache cache;
  int32_t token = 0;

  explicit Runner(std::shared_ptr<const Model> m, int64_t max_len)
      : engine(std::make_unique<Engine>(std::move(m), EngineOptions{.max_len = max_len})),
        cache(engine->NewCache(1)) {}

  double Run(int steps) {
    if (cache.length(0) + steps + 1 >= cache.max_len()) cache.Reset(0);
    SeqInput in{0, {&token, 1}};
    const auto t0 = SteadyClock::now();
    for (int i = 0; i < steps; ++i) (void)engine->Forward(cache, {&in, 1});
    return std::chrono::duration<double, std::milli>(SteadyClock::now() - t0).count();
  }
};

}  // namespace

std::vector<ShapeLatency> ProfileDecodeLatency(
    const std::vector<std::pair<Shape, std::shared_ptr<const Model>>>& models,
    const LatencyOptions& o) {
  at::InferenceMode guard;
  std::vector<ShapeLatency> out(models.size());
  if (models.empty()) return out;
  const int64_t max_len = o.max_steps + 8;
  std::vector<Runner> runners;
  runners.reserve(models.size());
  size_t largest = 0;
  for (size_t i = 0; i < models.size(); ++i) {
    runners.emplace_back(models[i].second, max_len);
    out[i].shape = models[i].first;
    out[i].decode_weight_bytes = models[i].second->DecodeWeightBytes();
    if (out[i].decode_weight_bytes > out[largest].decode_weight_bytes) largest = i;
    if (o.bandwidth_gbs > 0)
      out[i].predicted_ms =
          static_cast<double>(out[i].decode_weight_bytes) / (o.bandwidth_gbs * 1e6);
  }
  // Warm-up: caches, page tables, the thread pool and the CPU clock, on the largest shape.
  for (double spent = 0; spent < o.warmup_ms;) spent += runners[largest].Run(4);
  // Steps per round: enough for `min_round_ms` on the fastest shape, the same for all.
  std::vector<int> steps(models.size(), 1);
  for (size_t i = 0; i < models.size(); ++i) {
    const double ms = std::max(1e-3, runners[i].Run(2) / 2);
    steps[i] = std::clamp(static_cast<int>(o.min_round_ms / ms) + 1, 2, o.max_steps);
  }
  for (int r = 0; r < o.rounds; ++r) {
    for (size_t k = 0; k < models.size(); ++k) {
      // Alternate the order between rounds so no shape always follows the same one.
      const size_t i = r % 2 ? models.size() - 1 - k : k;
      out[i].rounds.push_back(runners[i].Run(steps[i]) / steps[i]);
    }
  }
  std::vector<double> ratios;
  for (auto& s : out) {
    s.ms_per_token = Median(s.rounds);
    if (s.predicted_ms > 0) ratios.push_back(s.ms_per_token / s.predicted_ms);
  }
  if (!ratios.empty()) {
    const double typical = Median(ratios);
    for (auto& s : out) {
      if (s.predicted_ms <= 0) continue;
      const double rel = s.ms_per_token / s.predicted_ms / typical;
      s.outlier = rel > o.outlier_factor || rel < 1 / o.outlier_factor;
    }
  }
  return out;
}

void LogLatencyProfile(const std::vector<ShapeLatency>& profile, const char* who) {
  for (const auto& s : profile) {
    const auto [lo, hi] = std::minmax_element(s.rounds.begin(), s.rounds.end());
    spdlog::info(
        "{}: {} decode {:.3f} ms/token (rounds {:.3f}-{:.3f}), predicted {:.3f} ms from {} "
        "MB/token{}",
        who, s.shape.ToString(), s.ms_per_token, s.rounds.empty() ? 0 : *lo,
        s.rounds.empty() ? 0 : *hi, s.predicted_ms, s.decode_weight_bytes >> 20,
        s.outlier ? "  OUTLIER: far from the other shapes' measured/predicted ratio" : "");
  }
}

}  // namespace amoeba
