// Decode latency of grid shapes on this host, measured so that a planner can rely on it: a warm-up
// first (the first shape measured is otherwise cold), shapes measured in interleaved rounds (the
// machine's state drifts; every shape sees the same drift), the median round per shape, and each
// figure set next to its roofline prediction (bytes read per token / bandwidth) with outliers
// flagged.
#pragma once
#include <memory>
#include <vector>

#include "model/weights.h"
#include "subnet/supernet.h"

namespace amoeba {

struct LatencyOptions {
  int rounds = 5;               // interleaved rounds; the median is reported
  double min_round_ms = 20;     // steps per round grow until one round takes at least this long
  int max_steps = 64;           // ... but never more steps per round than this
  double warmup_ms = 200;       // decode on the largest shape first, discarded
  double bandwidth_gbs = 0;     // for the predictions; 0 = no prediction, no outliers
  double outlier_factor = 1.5;  // flag a shape whose measured/predicted ratio is off the median
                                // ratio by more than this factor either way
  int64_t check_tokens = 0;     // > 0: also time steps that check this many drafted tokens
};

struct ShapeLatency {
  Shape shape;
  double ms_per_token = 0;  // median of the rounds
  double predicted_ms = 0;  // decode bytes / bandwidth (0 without a bandwidth)
  int64_t decode_weight_bytes = 0;
  std::vector<double> rounds;  // every round's ms per token, in order
  bool outlier = false;
  // ms_per_token smoothed across shapes: the least-squares line ms = a + b · decode bytes through
  // every non-outlier median. One noisy shape cannot then look faster than a smaller one; this is
  // what a planner should use. 0 until FitLatencyLine runs.
  double fitted_ms = 0;
  // With LatencyOptions::check_tokens = k: (median ms of a step checking k drafted tokens, i.e.
  // 1 + k rows, minus ms_per_token) / k, at least 0.
  double check_extra_ms = 0;
};

// Measures batch-1 decode of each model (a subnet as served: packed panels, merged or not).
std::vector<ShapeLatency> ProfileDecodeLatency(
    const std::vector<std::pair<Shape, std::shared_ptr<const Model>>>& models,
    const LatencyOptions& options = {});

// Flags the shapes whose measured/predicted ratio is more than `factor` off the median ratio.
void MarkLatencyOutliers(std::vector<ShapeLatency>& profile, double factor);

// Fills fitted_ms (falls back to the median when fewer than two shapes or no spread in bytes).
void FitLatencyLine(std::vector<ShapeLatency>& profile);

// The median of `v` (0 when empty).
double MedianOf(std::vector<double> v);

// One log line per shape: measured, predicted, the ratio, and a flag when it is an outlier.
void LogLatencyProfile(const std::vector<ShapeLatency>& profile, const char* who);

}  // namespace amoeba
