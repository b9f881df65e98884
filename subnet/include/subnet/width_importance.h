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
  // Per layer, fp32: the centred covariance of each KV group's o_proj input channels (its query
  // heads), [kv_groups, group_size * head_dim, group_size * head_dim].
  std::vector<at::Tensor> o_cov;
  int64_t tokens = 0;
};

ActivationStats CollectActivationStats(const Model& m, const at::Tensor& windows, int64_t batch = 4,
                                       Progress* progress = nullptr);

struct WidthScores {
  std::vector<at::Tensor> group;    // per layer [kv_heads]
  std::vector<at::Tensor> channel;  // per layer [intermediate]
};

// kFlap: S_j = Var(x_j) ||W[:, j]||² (FLAP's fluctuation metric). kMagnitude: ||W[:, j]||² alone
// (the variance left out). Either is standardised per layer and module, as FLAP does.
// kRemoval: the expected loss increase per parameter when the unit is removed with its
// compensation bias: the removal error (the expected squared change of the layer's output, see
// RemovalErrors) times the layer's measured sensitivity (LayerSensitivity), over the unit's
// parameters.
enum class WidthScoring { kFlap, kMagnitude, kRemoval };
// "flap" | "magnitude" | "removal" (calibrate --width-scores).
absl::StatusOr<WidthScoring> ParseWidthScoring(std::string_view name);

// Per unit, the expected squared change of the o_proj / down_proj output when the unit's inputs
// are replaced by their calibration means (the removal plus its compensation bias): a KV group
// g, tr(W_g Σ_g W_gᵀ) with Σ_g its channels' covariance; an MLP channel j, Var(x_j) ||W[:, j]||².
WidthScores RemovalErrors(const Model& m, const ActivationStats& s);

// Per layer and module, the calibration loss added per unit of removal error: the mean NLL
// increase on `windows` when the quarter of the module's units with the smallest errors is
// removed (inputs replaced by their means) in that layer alone, over the sum of their errors.
// It makes errors of different layers comparable where FLAP standardises each layer's scores.
// A layer whose cheapest quarter costs nothing measurable gets the module's floor, a tenth of
// the median of the layers that measured a cost (1 if none did), so that its units still rank
// by their errors instead of all tying at zero.
struct LayerSensitivity {
  std::vector<double> attention, mlp;  // per layer, > 0
  double attention_floor = 1, mlp_floor = 1;
  double base_nll = 0;
};
LayerSensitivity MeasureSensitivity(const Model& m, const ActivationStats& s,
                                    const at::Tensor& windows, int64_t batch = 4,
                                    Progress* progress = nullptr);

// kRemoval needs `sensitivity` (without it every layer counts alike).
WidthScores ComputeWidthScores(const Model& m, const ActivationStats& s,
                               WidthScoring scoring = WidthScoring::kFlap,
                               const LayerSensitivity* sensitivity = nullptr);

// Units to remove, per layer: input channels of o_proj and of down_proj (a missing or undefined
// tensor removes nothing there).
struct UnitRemoval {
  std::vector<at::Tensor> o_channels, down_channels;
};
// The mean NLL on `windows` with the units removed and compensated (their inputs replaced by
// their calibration means). For sensitivities and removal studies.
double NllWithUnitsRemoved(const Model& m, const ActivationStats& s, const at::Tensor& windows,
                           int64_t batch, const UnitRemoval& removal);
// The same with units of one layer only (either tensor may be undefined).
double NllWithUnitsRemoved(const Model& m, const ActivationStats& s, const at::Tensor& windows,
                           int64_t batch, int layer, const at::Tensor& o_channels,
                           const at::Tensor& down_channels);

// The o_proj input channels (the query heads' channels) of KV groups `groups`, group by group.
at::Tensor KvGroupChannels(const ModelConfig& c, const at::Tensor& groups);

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
