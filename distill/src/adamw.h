// AdamW (decoupled weight decay) with state that saves into safetensors, so a checkpoint is one
// atomic file and a resumed run continues bit for bit.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "model/safetensors.h"

namespace amoeba {

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
};

class AdamW {
 public:
  AdamW(std::vector<std::pair<std::string, at::Tensor>> params, AdamWOptions o = {});
  void Step(double lr);
  void ZeroGrad();
  // Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before.
  double ClipGradNorm(double max_norm);
  int64_t steps() const { return t_; }
  NamedTensors State() const;  // "adam.m.<name>", "adam.v.<name>"
  void LoadState(const std::vector<at::Tensor>& m, const std::vector<at::Tensor>& v, int64_t t);
  const std::vector<std::pair<std::string, at::Tensor>>& params() const { return params_; }

 private:
  std::vector<std::pair<std::string, at::Tensor>> params_;
  std::vector<at::Tensor> m_, v_;
  AdamWOptions o_;
  int64_t t_ = 0;
};

}  // namespace amoeba
