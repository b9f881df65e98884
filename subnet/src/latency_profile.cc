#include "subnet/latency_profile.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>

#include "model/engine.h"

namespace amoeba {
namespace {

using SteadyClock = std::chrono::steady_clock;

// One model's engine and single-sequence cache; decodes `steps` tokens per call, restarting the
// sequence when the cache would fill.
struct Runner {
  std::unique_ptr<Engine> engine;
  KVCache cache;
  int32_t token = 0;

  explicit Runner(std::shared_ptr<const Model> m, int64_t max_len)
      : engine(std::make_unique<Engine>(std::move(m), EngineOptions{.max_len = max_len})),
        cache(engine->NewCache(1)) {}

  // `rows` > 1: steps as speculative checks, 1 + drafted tokens each, all but one rolled back.
  double Run(int steps, int64_t rows = 1) {
    if (cache.length(0) + steps + rows >= cache.max_len()) cache.Reset(0);
    std::vector<int32_t> tokens(rows, token);
    SeqInput in{0, tokens, /*all_logits=*/rows > 1};
    const auto t0 = SteadyClock::now();
    for (int i = 0; i < steps; ++i) {
      (void)engine->Forward(cache, {&in, 1});
      if (rows > 1) cache.set_length(0, cache.length(0) - rows + 1);
    }
    return std::chrono::duration<double, std::milli>(SteadyClock::now() - t0).count();
  }
};

}  // namespace

double MedianOf(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

void MarkLatencyOutliers(std::vector<ShapeLatency>& profile, double factor) {
  std::vector<double> ratios;
  for (const auto& s : profile)
    if (s.predicted_ms > 0) ratios.push_back(s.ms_per_token / s.predicted_ms);
  if (ratios.empty()) return;
  const double typical = MedianOf(ratios);
  for (auto& s : profile) {
    if (s.predicted_ms <= 0) continue;
    const double rel = s.ms_per_token / s.predicted_ms / typical;
    s.outlier = rel > factor || rel < 1 / factor;
  }
}

void FitLatencyLine(std::vector<ShapeLatency>& profile) {
  double n = 0, sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (const auto& s : profile) {
    if (s.outlier || s.ms_per_token <= 0) continue;
    const double x = static_cast<double>(s.decode_weight_bytes), y = s.ms_per_token;
    n += 1;
    sx += x;
    sy += y;
    sxx += x * x;
    sxy += x * y;
  }
  const double det = n * sxx - sx * sx;
  const bool line = n >= 2 && det > 1e-9 * sxx * n;
  const double b = line ? std::max(0.0, (n * sxy - sx * sy) / det) : 0;
  const double a = line ? (sy - b * sx) / n : 0;
  for (auto& s : profile) {
    const double fit = a + b * static_cast<double>(s.decode_weight_bytes);
    s.fitted_ms = line && fit > 0 ? fit : s.ms_per_token;
  }
}

std::vector<ShapeLatency> ProfileDecodeLatency(
    const std::vector<std::pair<Shape, std::shared_ptr<const Model>>>& models,
    const LatencyOptions& o) {
  at::InferenceMode guard;
  std::vector<ShapeLatency> out(models.size());
  if (models.empty()) return out;
  const int64_t max_len = o.max_steps + 8 + o.check_tokens;
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
  std::vector<std::vector<double>> checks(models.size());
  for (int r = 0; r < o.rounds; ++r) {
    for (size_t k = 0; k < models.size(); ++k) {
      // Alternate the order between rounds so no shape always follows the same one.
      const size_t i = r % 2 ? models.size() - 1 - k : k;
      out[i].rounds.push_back(runners[i].Run(steps[i]) / steps[i]);
      if (o.check_tokens > 0)
        checks[i].push_back(runners[i].Run(steps[i], 1 + o.check_tokens) / steps[i]);
    }
  }
  for (size_t i = 0; i < out.size(); ++i) {
    out[i].ms_per_token = MedianOf(out[i].rounds);
    if (o.check_tokens > 0)
      out[i].check_extra_ms = std::max(
          0.0, (MedianOf(checks[i]) - out[i].ms_per_token) / static_cast<double>(o.check_tokens));
  }
  MarkLatencyOutliers(out, o.outlier_factor);
  FitLatencyLine(out);
  return out;
}

void LogLatencyProfile(const std::vector<ShapeLatency>& profile, const char* who) {
  for (const auto& s : profile) {
    const auto [lo, hi] = std::minmax_element(s.rounds.begin(), s.rounds.end());
    spdlog::info(
        "{}: {} decode {:.3f} ms/token (rounds {:.3f}-{:.3f}; fitted {:.3f}), roofline {:.3f} ms "
        "from {} MB/token{}",
        who, s.shape.ToString(), s.ms_per_token, s.rounds.empty() ? 0 : *lo,
        s.rounds.empty() ? 0 : *hi, s.fitted_ms, s.predicted_ms, s.decode_weight_bytes >> 20,
        s.outlier ? "  OUTLIER: far from the other shapes' measured/roofline ratio" : "");
  }
}

}  // namespace amoeba
