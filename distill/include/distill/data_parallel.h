// Multi-process data parallelism with libtorch's c10d (ProcessGroupGloo over a TCPStore), set up
// from the variables torchrun sets: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT. Gradients are
// averaged with one all-reduce over a flattened buffer (not one call per tensor).
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace amoeba {

class DataParallel {
 public:
  // nullptr (single process) when WORLD_SIZE is unset or 1.
  static absl::StatusOr<std::unique_ptr<DataParallel>> FromEnv();
  ~DataParallel();

  int rank() const { return rank_; }
  int world() const { return world_; }
  // Replaces each gradient by the mean over all processes.
  void AllReduceMeanGradients(const std::vector<std::pair<std::string, at::Tensor>>& params);
  // Copies rank 0's values into every process (identical initial adapters).
  void BroadcastFromRankZero(const std::vector<std::pair<std::string, at::Tensor>>& params);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, world_ = 1;
};

}  // namespace amoeba
