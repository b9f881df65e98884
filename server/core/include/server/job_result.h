// How a generation ended, as the scheduler reports it and both front ends translate it. Free of
// ATen: front ends include it.
#pragma once
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "model/finish_reason.h"
#include "subnet/shape.h"

namespace amoeba {

using Clock = std::chrono::steady_clock;

// A budget request planned against the load in flight rather than the idle profile.
struct LoadPlan {
  Shape idle_choice;                 // what the idle profile picks for the budget
  double idle_decode_ms = 0;         // its decode ms/token alone
  double predicted_decode_ms = 0;    // the shape used, at the load when it was planned
  int64_t sequences_in_flight = 0;   // running and waiting when it was planned
  bool load_changed_choice = false;  // the idle choice would have missed the target
};

struct JobResult {
  FinishReason reason = FinishReason::kNone;
  absl::Status error;  // with kError: why (the front ends map its code)
  int64_t prompt_tokens = 0, completion_tokens = 0;
  int64_t cached_tokens = 0;  // prompt tokens restored from the prompt cache (not prefilled)
  double queue_ms = 0, ttft_ms = 0, total_ms = 0;
  Shape shape;
  std::optional<Shape> draft;  // speculative decoding: the shape that drafted
  int64_t drafted_tokens = 0, accepted_tokens = 0, draft_rounds = 0;
};

}  // namespace amoeba
