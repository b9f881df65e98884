// The supernet the subnet and shared-step benches measure: a preset's shape with random weights,
// calibrated on random tokens (4 windows of 64, the depth DP on 2 of them), its projections packed
// into decode panels of one format as the server packs them.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/weight_format.h"
#include "subnet/supernet.h"

namespace amoeba::bench {

// A bench's --preset and --weights-dtype, checked before anything is built.
struct RandomSupernetFlags {
  ModelConfig config;
  WeightFormat format;
};
// InvalidArgument naming the flag that is wrong.
absl::StatusOr<RandomSupernetFlags> ParseRandomSupernetFlags(const std::string& preset,
                                                             const std::string& weights_dtype);

absl::StatusOr<std::unique_ptr<Supernet>> RandomSupernet(const ModelConfig& cfg,
                                                         const std::vector<double>& widths,
                                                         double min_depth_ratio,
                                                         WeightFormat format);

}  // namespace amoeba::bench
