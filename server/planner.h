// Budget → shape. Protocol-free: the service converts to and from amoeba.v1 messages.
// Latency comes from this host's measured profile, or from a roofline estimate for the client's
// platform (decode: weight bytes / bandwidth; prefill: 2·params·tokens / compute).
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "subnet/supernet.h"

namespace amoeba {

struct ShapeProfile {
  Shape shape;
  int64_t params = 0;
  int64_t weight_bytes = 0;                  // resident weights, in the dtype served
  int64_t decode_weight_bytes = 0;           // read per decode step, in the dtype served
  int64_t kv_bytes_per_token = 0;            // in the KV dtype served
  std::optional<double> measured_decode_ms;  // on this host
  std::optional<double> heldout_perplexity;  // from `amoeba-admin eval`
};

struct PlanBudget {
  std::optional<int64_t> max_params, max_memory_bytes;
  std::optional<double> max_decode_ms_per_token, max_prefill_ms;
  int64_t prompt_tokens = 128;
  int64_t max_context_tokens = 2048;
  // Client platform; unset fields fall back to this host.
  std::optional<double> bandwidth_gbs, compute_gflops;
  std::optional<int64_t> platform_memory_bytes;
};

struct HostSpeed {
  double bandwidth_gbs = 20;
  double compute_gflops = 50;
};

struct ShapeEstimateResult {
  ShapeProfile profile;
  double decode_ms = 0, prefill_ms = 0;
  int64_t memory_bytes = 0;
  double quality = 0;
  std::string quality_source, latency_source;
};

struct PlanResult {
  ShapeEstimateResult chosen;
  std::vector<ShapeEstimateResult> frontier;
  std::string explanation;
};

// Estimates for all shapes (no budget filter).
std::vector<ShapeEstimateResult> EstimateAll(const std::vector<ShapeProfile>& profiles,
                                             const PlanBudget& b, const HostSpeed& host);
// The best-quality shape that fits; FAILED_PRECONDITION naming the smallest shape's cost if none.
absl::StatusOr<PlanResult> PlanShape(const std::vector<ShapeProfile>& profiles, const PlanBudget& b,
                                     const HostSpeed& host);

// Profiles of every grid shape: sizes and bytes from the supernet as it is held (pack it first, so
// bytes are those of the served panels) with `kv_element_bytes` per cached K/V value, and the
// held-out perplexities `amoeba-admin eval` recorded. Measured latency is the caller's to fill.
std::vector<ShapeProfile> ProfilesFromSupernet(const Supernet& s, int64_t kv_element_bytes = 4);

}  // namespace amoeba
