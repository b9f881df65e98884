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

#include "absl/status/statusor.h"
#include "distill/train_data.h"
#include "lora/smol.h"
#include "subnet/supernet.h"

namespace amoeba {

struct TuneOptions {
  int64_t steps = 200;
  int64_t batch = 4;  // sequences per micro-batch
  int64_t seq_len = 128;
  int64_t grad_accum = 1;  // micro-batches per optimizer step
  int64_t subnets = 4;     // sandwich size K: full + (K-2) random + smallest
  double lr = 2e-4;
  std::string schedule = "constant";  // or "cosine"
  int64_t warmup = 0;
  double clip = 0.3;
  double weight_decay = 0.0;
  uint64_t seed = 0;
  bool balancing = true;  // --no-balancing
  bool distill = true;    // --no-distill: CE on labels for every subnet
  // Baseline "one adapter for each shape": every micro-batch trains only this shape, on the
  // labels (no sandwich, no teacher). Unset = the sandwich.
  std::optional<Shape> only_shape;
  std::string checkpoint;  // file; "" = none
  int64_t checkpoint_every = 50;
  bool resume = false;
  std::string metrics_log;  // JSONL, one line per step
  bool progress = true;
  std::function<void(int64_t step)> on_step;  // after each optimizer step (e.g. to request a stop)
  class DataParallel* dp = nullptr;           // multi-process (see LoopOptions::dp)
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
