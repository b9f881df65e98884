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
};

struct ShapeLatency {
  Shape shape;
  double ms_per_token = 0;  // median of the rounds
  double predicted_ms = 0;  // decode bytes / bandwidth (0 without a bandwidth)
  int64_t decode_weight_bytes = 0;
  std::vector<double> rounds;  // every round's ms per token, in order
  bool outlier = false;
};

// Measures batch-1 decode of each model (a subnet as served: packed panels, merged or not).
std::vector<ShapeLatency> ProfileDecodeLatency(
    const std::vector<std::pair<Shape, std::shared_ptr<const Model>>>& models,
    const LatencyOptions& options = {});

// One log line per shape: measured, predicted, the ratio, and a flag when it is an outlier.
void LogLatencyProfile(const std::vector<ShapeLatency>& profile, const char* who);

}  // namespace amoeba
