// Decode latency of each grid shape as a request sees it: jobs run through the scheduler (lane
// steps, sampling, streaming callbacks; adapters as a cold shape runs them), after a warm-up, in
// interleaved rounds, median per shape. For a small model the serving path's fixed costs are a
// large part of a token's time, so the bare engine's figure would promise budgets the server
// cannot keep. Profiling jobs count toward no statistics and start no merged-copy build.
#pragma once
#include <vector>

#include "server/planner.h"
#include "server/scheduler.h"
#include "subnet/latency_profile.h"

namespace amoeba {

struct ServedLatencyOptions {
  int rounds = 3;
  double min_round_ms = 30;  // tokens per measurement grow until one takes about this long
  int min_tokens = 4, max_tokens = 32;
  double bandwidth_gbs = 0;  // for the roofline predictions next to each figure
  double outlier_factor = 1.5;
};

std::vector<ShapeLatency> ProfileServedLatency(Scheduler& scheduler,
                                               const std::vector<ShapeProfile>& shapes,
                                               int32_t bos_token_id,
                                               const ServedLatencyOptions& options = {});

}  // namespace amoeba
