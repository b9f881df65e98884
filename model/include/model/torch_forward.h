// Full-sequence forward in plain libtorch ops, differentiable. It is the reference for the fast
// engine, and the path training and calibration use. A hook may replace any projection (adapters
// plug in here; calibration reads activations here) without the model knowing about them.
#pragma once
#include <ATen/ATen.h>

#include <functional>

#include "model/weights.h"

namespace amoeba {

const char* ProjName(Proj p);

// Computes one projection. Default: at::linear(x, weight, bias).
using LinearHook = std::function<at::Tensor(int layer, Proj proj, const at::Tensor& x,
                                            const at::Tensor& weight, const at::Tensor& bias)>;

struct TorchForwardOptions {
  LinearHook linear;  // empty = at::linear
  // Called after each layer with its input and output hidden states (e.g. block influence).
  std::function<void(int layer, const at::Tensor& input, const at::Tensor& output)> on_layer;
  // Optional [B, T] bool/int mask, 1 = real token (left or right padding both work).
  at::Tensor attention_mask;
};

// tokens: [B, T] int64. Returns logits [B, T, vocab].
at::Tensor TorchForward(const Model& m, const at::Tensor& tokens,
                        const TorchForwardOptions& opt = {});

// Hidden states after the final norm, [B, T, hidden] (for losses that want to chunk the head).
at::Tensor TorchHidden(const Model& m, const at::Tensor& tokens,
                       const TorchForwardOptions& opt = {});

at::Tensor RmsNormTorch(const at::Tensor& x, const at::Tensor& w, double eps);
// Rotate-half RoPE on [B, heads, T, hd] with cos/sin [B or 1, T, hd/2].
at::Tensor ApplyRopeTorch(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

}  // namespace amoeba
