// The optimisation loop shared by tuning and pretraining: LR schedule, gradient accumulation,
// clipping, AdamW, JSONL metrics, a progress bar, atomic single-file checkpoints (parameters +
// optimizer state + step) and bit-for-bit resume. The caller's micro-step does forward and
// backward; everything it draws at random must be a function of (seed, step, micro).
#pragma once
#include <atomic>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "absl/status/statusor.h"

namespace amoeba {

class DataParallel;

struct LoopOptions {
  std::string label = "train";
  int64_t steps = 100;
  int64_t grad_accum = 1;
  double lr = 2e-4;
  std::string schedule = "constant";  // or "cosine"
  int64_t warmup = 0;
  double clip = 0.3;
  double weight_decay = 0.0;
  uint64_t seed = 0;
  std::string checkpoint;  // "" = none
  int64_t checkpoint_every = 50;
  bool resume = false;
  std::string fingerprint;  // a checkpoint with another fingerprint is refused
  std::string metrics_log;  // JSONL
  bool progress = true;
  std::function<void(int64_t step)> on_step;
  // Multi-process: gradients averaged across ranks; rank 0 alone logs and checkpoints. Each
  // rank runs `grad_accum` micro-steps with global micro index micro * world + rank, so N ranks
  // with accumulation A equal one process with accumulation N·A.
  DataParallel* dp = nullptr;
};

struct MicroResult {
  double loss = 0, aux = 0;  // e.g. full and smallest subnet losses
  int64_t tokens = 0;
};

struct LoopResult {
  int64_t step = 0;
  bool interrupted = false;
  double loss = 0, aux = 0;
};

// `micro` is the global micro-batch index of the step (see LoopOptions::dp).
using MicroStep = std::function<MicroResult(int64_t step, int64_t micro)>;

double ScheduledLr(const LoopOptions& o, int64_t step);

// Keeps the rows of the JSONL metrics log at `path` up to `step` (none for step 0): a run that
// resumes from a checkpoint at `step` logs the later steps again, once (atomic rewrite).
absl::Status TruncateMetricsLog(const std::string& path, int64_t step);

absl::StatusOr<LoopResult> RunTrainingLoop(
    const std::vector<std::pair<std::string, at::Tensor>>& params, const LoopOptions& o,
    const MicroStep& micro_step, const std::atomic<bool>* stop = nullptr);

}  // namespace amoeba
