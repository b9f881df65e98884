// One-time fine-tuning of a supernet (docs/method.md §4): SMoL adapters trained by in-place
// distillation. Each micro-batch runs the sandwich of subnets: the full shape on the labels, then
// random and smallest shapes on the full shape's detached logits, each loss rescaled to the full
// shape's magnitude. Base weights stay frozen. Checkpoints are atomic single files; a resumed run
// continues bit for bit (data, shapes and router noise are functions of (seed, step)).
#pragma once
#include <atomic>
#include <functional>
#include <optional>
#include <string>
#include "distill/train_loop.h"

#include "absl/status/statusor.h"
#include "distill/train_data.h"
#include "lora/smol.h"
#include "subnet/supernet.h"

namespace amoeba {

struct TuneOptions {
  static LoopOptions DefaultLoop() {
    LoopOptions o;  // (not a designated initializer: GCC 12 warns on those in member defaults)
    o.label = "tune";
    o.steps = 200;
    return o;
  }
  // The training loop's options (steps, lr, schedule, clip, seed, checkpoints, log, progress,
  // multi-process); tuning's defaults: 200 steps, lr 2e-4 constant, clip 0.3.
  LoopOptions loop = DefaultLoop();
  int64_t batch = 4;  // sequences per micro-batch
  int64_t seq_len = 128;
  int64_t subnets = 4;    // sandwich size K: full + (K-2) random + smallest
  bool balancing = true;  // --no-balancing
  bool distill = true;    // --no-distill: CE on labels for every subnet
  // Baseline "one adapter for each shape": every micro-batch trains only this shape, on the
  // labels (no sandwich, no teacher). Unset = the sandwich.
  std::optional<Shape> only_shape;
};

struct TuneResult {
  int64_t step = 0;  // steps completed
  bool interrupted = false;
  double loss_full = 0, loss_smallest = 0;  // last step
};

// Losses of one micro-batch, backpropagated into the adapters' gradients (scaled by 1/accum).
struct SandwichLosses {
  double full = 0, smallest = 0;
  std::vector<Shape> shapes;
};
SandwichLosses SandwichStep(const Supernet& s, const Smol& smol, const TrainBatch& b,
                            const TuneOptions& o, int64_t step, int64_t micro);

absl::StatusOr<TuneResult> Tune(const Supernet& s, Smol& smol, const TrainData& data,
                                const TuneOptions& o, const std::atomic<bool>* stop = nullptr);

// Held-out mean NLL of a shape with the adapters (unmerged, deterministic gate).
double HeldoutNll(const Supernet& s, const Smol* smol, const Shape& shape,
                  const at::Tensor& windows);

// Gate and layer list for a shape.
at::Tensor InferenceGate(const Supernet& s, const Smol& smol, const Shape& shape);

}  // namespace amoeba
