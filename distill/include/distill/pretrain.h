// Plain language-model training of all weights (small models from scratch, e.g. the demo).
#pragma once
#include <atomic>
#include <string>

#include "absl/status/statusor.h"
#include "distill/train_data.h"
#include "distill/train_loop.h"
#include "model/weights.h"

namespace amoeba {

struct PretrainOptions {
  LoopOptions loop;  // label "pretrain"; lr/schedule/warmup/clip/weight decay/checkpoints
  int64_t batch = 8;
  int64_t seq_len = 128;
};

// Trains `m` in place (its tensors become owned, trainable copies).
absl::StatusOr<LoopResult> Pretrain(Model& m, const TrainData& data, const PretrainOptions& o,
                                    const std::atomic<bool>* stop = nullptr);

}  // namespace amoeba
