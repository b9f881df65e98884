// Width pruning (docs/method.md §1): FLAP activation statistics at the inputs of o_proj and
// down_proj, per-unit importance scores, the global parameter-weighted nested allocation, the
// score-sorted permutation that turns every allocation into per-layer prefixes, and bias
// compensation. Units: KV groups (one k/v head with its query heads) for attention, channels for
// the MLP.
#pragma once
#include <ATen/ATen.h>

#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "model/weights.h"

namespace amoeba {

class Progress;

struct ActivationStats {
  // Per layer, fp32: mean and variance over all calibration tokens of each input channel.
  std::vector<at::Tensor> o_mean, o_var;        // [q_heads * head_dim]
  std::vector<at::Tensor> down_mean, down_var;  // [intermediate]
};

ActivationStats CollectActivationStats(const Model& m, const at::Tensor& windows, int64_t batch = 4,
                                       Progress* progress = nullptr);

struct WidthScores {
  std::vector<at::Tensor> group;    // per layer [kv_heads]
  std::vector<at::Tensor> channel;  // per layer [intermediate]
};

// kFlap: S_j = Var(x_j) ||W[:, j]||² (FLAP's fluctuation metric). kMagnitude: ||W[:, j]||² alone
// (the variance left out). Either is standardised per layer and module, as FLAP does.
enum class WidthScoring { kFlap, kMagnitude };
// "flap" | "magnitude" (calibrate --width-scores).
absl::StatusOr<WidthScoring> ParseWidthScoring(std::string_view name);
WidthScores ComputeWidthScores(const Model& m, const ActivationStats& s,
                               WidthScoring scoring = WidthScoring::kFlap);

// Kept units per layer (prefix counts once the model is permuted by score).
struct WidthAllocation {
  std::vector<int64_t> kv_groups;
  std::vector<int64_t> channels;
  int64_t params = 0;  // attention + MLP parameters kept
};

// Parameters of one unit and of all attention+MLP units.
int64_t GroupParams(const ModelConfig& c);
int64_t ChannelParams(const ModelConfig& c);
int64_t WidthParams(const Model& m);  // of the full width

// Global ranking by score, weighted by parameters, keeping the top units until `ratio` of the
// attention+MLP parameters are kept. Same scores → nested across ratios. Scores must already be
// sorted descending per layer (i.e. the model permuted) so each layer's kept set is a prefix.
WidthAllocation AllocateGlobal(const Model& m, const WidthScores& sorted_scores, double ratio);
// The same fraction of units in every layer (for exports that plain HF loaders read).
WidthAllocation AllocateUniform(const Model& m, double ratio);

// Reorders every layer's groups and channels by descending score (q,k,v,gate,up rows; o,down
// columns; biases; stats; scores). The permuted model computes the same function.
void PermuteByScore(Model& m, WidthScores& scores, ActivationStats& stats);

// b = W[:, kept:] · mean[kept:] — the removed input channels' mean contribution as an output bias.
at::Tensor CompensationBias(const at::Tensor& weight, const at::Tensor& mean, int64_t kept_columns);

}  // namespace amoeba
