// Shape-aware mixture of LoRAs (docs/method.md §3). E experts of rank r on each adapted linear of
// every layer, mixed by one router whose input is the subnet's shape:
//   φ = [active-layer mask (L) ; one-hot width index (W)],
//   logits = Linear(16→E)(Linear(φ→16)(φ)) (+ randn · softplus(Linear(φ→E)(φ)) while training),
//   gate = softmax over the top-k logits, zeros elsewhere.
// Weights are mixed, not outputs: y = W x + s · B_mix (A_mix x), A_mix = Σ g_k A_k, B_mix = Σ g_k
// B_k. Adapters are defined on the supernet's full widths; a sliced subnet uses their prefixes.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "model/torch_forward.h"
#include "model/weights.h"

namespace amoeba {

struct SmolConfig {
  int64_t experts = 5;
  int64_t rank = 0;  // 0: min(64, hidden_size / 8), at least 4
  double alpha = 16;
  int64_t router_hidden = 16;
  int64_t top_k = 2;
  std::array<bool, kNumProj> targets = {true, true, true, true, true, true, true};
  nlohmann::json ToJson() const;
  static SmolConfig FromJson(const nlohmann::json& j);
};

class Smol {
 public:
  Smol() = default;
  // Fresh adapters for `base` (the full supernet): A Kaiming-uniform, B zeros; seeded.
  Smol(const Model& base, int64_t num_widths, SmolConfig config, uint64_t seed);

  const SmolConfig& config() const { return cfg_; }
  double scale() const { return cfg_.alpha / static_cast<double>(cfg_.rank); }
  int64_t num_layers() const { return num_layers_; }
  int64_t num_widths() const { return num_widths_; }

  // φ for a subnet running `active_layers` (supernet ids) at width index `width_index`.
  at::Tensor ShapeFeature(const std::vector<int>& active_layers, int64_t width_index) const;
  // [E] gate; noise only when `training` (the reference code keeps it at inference: a bug).
  at::Tensor Gate(const at::Tensor& phi, bool training) const;

  // A projection hook applying the adapters unmerged. `layer_ids[i]` is the supernet id of the
  // subnet's layer i; weights may be prefix slices (the adapters are sliced to match).
  LinearHook Hook(const at::Tensor& gate, const std::vector<int>& layer_ids) const;
  // The subnet with ΔW = s · B_mix A_mix folded into (copies of) its sliced weights.
  // `between_matrices`, when set, is called after each merged projection: a background caller
  // may block in it to let foreground work have the cores.
  Model Merge(const Model& subnet, const at::Tensor& gate, const std::vector<int>& layer_ids,
              const std::function<void()>& between_matrices = {}) const;

  // The subnet (still views of the supernet) with each adapted projection carrying ΔW unmerged as
  // a low-rank delta: down = s · A_mix, up = B_mix, sliced to the subnet's widths. Costs only the
  // adapters' size, so any shape can run at once; Merge is the faster copy for hot shapes.
  Model AttachUnmerged(const Model& subnet, const at::Tensor& gate,
                       const std::vector<int>& layer_ids) const;

  // Trainable tensors (experts and router), in a stable order with names.
  std::vector<std::pair<std::string, at::Tensor>> NamedParameters() const;
  void SetRequiresGrad(bool on);

  absl::Status Save(const std::string& path) const;
  static absl::StatusOr<Smol> Load(const std::string& path, const Model& base);

 private:
  struct Adapter {
    at::Tensor A;  // [E, r, in]
    at::Tensor B;  // [E, out, r]
  };
  const Adapter* Find(int layer, Proj p) const;

  SmolConfig cfg_;
  int64_t num_layers_ = 0, num_widths_ = 0;
  std::vector<std::array<Adapter, kNumProj>>
      adapters_;  // [layer][proj]; undefined when not targeted
  at::Tensor r1_w, r1_b, r2_w, r2_b, noise_w, noise_b;  // router
};

}  // namespace amoeba
