// Budget → shape. Protocol-free: the service converts to and from amoeba.v1 messages.
// Latency comes from this host's measured profile, or from a roofline estimate for the client's
// platform (decode: weight bytes / bandwidth; prefill: 2·params·tokens / compute).
#pragma once
#include <array>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/weight_format.h"
#include "subnet/shape.h"

namespace amoeba {

class Supernet;

struct ShapeProfile {
  Shape shape;
  int64_t params = 0;
  int64_t weight_bytes = 0;                  // resident weights, in the dtype served
  int64_t decode_weight_bytes = 0;           // read per decode step, in the dtype served
  int64_t kv_bytes_per_token = 0;            // in the KV dtype served
  std::optional<double> measured_decode_ms;  // on this host
  std::optional<double> heldout_perplexity;  // from `amoeba-admin eval`
  // Tensor bytes of a GGUF export of the shape, by WeightFormat (0 = unknown: params × bytes
  // per weight).
  std::array<int64_t, 4> gguf_bytes = {0, 0, 0, 0};
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
// Every shape that fits the budget, best quality first (ties: faster first).
std::vector<ShapeEstimateResult> FittingShapes(const std::vector<ShapeProfile>& profiles,
                                               const PlanBudget& b, const HostSpeed& host);
// The best-quality shape that fits; FAILED_PRECONDITION naming the smallest shape's cost if none.
absl::StatusOr<PlanResult> PlanShape(const std::vector<ShapeProfile>& profiles, const PlanBudget& b,
                                     const HostSpeed& host);

// Budget → file: every (shape, dtype) a GGUF export could write (f16, q8_0, q4_0), on the client
// platform's roofline (measured latency is this host's, not the client's). A file holds every
// weight in the dtype (params × bytes per weight); decode reads it less the embedding. The chosen
// one has the best quality of any shape that fits in some dtype, in the most precise dtype it
// fits in: a grid step costs more quality than a dtype step (demo supernet: q4_0 +0.4%
// perplexity, one grid step 0.5-2%).
struct ExportPlanResult {
  ShapeEstimateResult chosen;
  WeightFormat format = WeightFormat::kF16;
  int64_t file_bytes = 0;
  std::string explanation;
};
absl::StatusOr<ExportPlanResult> PlanExport(const std::vector<ShapeProfile>& profiles,
                                            const PlanBudget& b, const HostSpeed& host);

// Profiles of every grid shape: sizes and bytes from the supernet as it is held (pack it first, so
// bytes are those of the served panels) with `kv_element_bytes` per cached K/V value, and the
// held-out perplexities `amoeba-admin eval` recorded. Measured latency is the caller's to fill.
std::vector<ShapeProfile> ProfilesFromSupernet(const Supernet& s, int64_t kv_element_bytes = 4);

}  // namespace amoeba
