#include "distill/data_parallel.h"

#include "model/errors.h"

#include <spdlog/spdlog.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace amoeba {

struct DataParallel::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
};

DataParallel::~DataParallel() = default;

absl::StatusOr<std::unique_ptr<DataParallel>> DataParallel::FromEnv() {
  auto env = [](const char* n) -> std::string {
    const char* v = std::getenv(n);
    return v ? v : "";
  };
  int world = 1, rank = 0, port = 0;
  if (env("WORLD_SIZE").empty() || !absl::SimpleAtoi(env("WORLD_SIZE"), &world) || world <= 1)
    return nullptr;
  if (!absl::SimpleAtoi(env("RANK"), &rank) || rank < 0 || rank >= world)
    return absl::InvalidArgumentError(
        absl::StrCat("RANK must be in [0, ", world, ") when WORLD_SIZE=", world));
  const std::string addr = env("MASTER_ADDR").empty() ? "127.0.0.1" : env("MASTER_ADDR");
  if (!absl::SimpleAtoi(env("MASTER_PORT").empty() ? "29500" : env("MASTER_PORT"), &port) ||
      port <= 0 || port > 65535)
    return absl::InvalidArgumentError("MASTER_PORT must be a TCP port");
  auto dp = std::unique_ptr<DataParallel>(new DataParallel());
  dp->rank_ = rank;
  dp->world_ = world;
  dp->impl_ = std::make_unique<Impl>();
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(port);
    so.isServer = rank == 0;
    so.numWorkers = world;
    so.timeout = std::chrono::seconds(120);
    dp->impl_->store = c10::make_intrusive<c10d::TCPStore>(addr, so);
    auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::seconds(300));
    opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    dp->impl_->pg =
        c10::make_intrusive<c10d::ProcessGroupGloo>(dp->impl_->store, rank, world, opts);
  } catch (...) {
    return StatusFromException(std::current_exception(),
                               absl::StrCat("c10d rendezvous at ", addr, ":", port, " failed"),
                               absl::StatusCode::kUnavailable);
  }
  spdlog::info("data parallel: rank {} of {} (rendezvous {}:{}, gloo)", rank, world, addr, port);
  return dp;
}

void DataParallel::AllReduceMeanGradients(
    const std::vector<std::pair<std::string, at::Tensor>>& params) {
  at::NoGradGuard g;
  std::vector<at::Tensor> grads;
  for (const auto& [n, p] : params)
    grads.push_back(p.grad().defined() ? p.grad().reshape({-1}) : at::zeros({p.numel()}));
  std::vector<at::Tensor> flat = {at::cat(grads)};
  impl_->pg->allreduce(flat)->wait();
  flat[0].div_(world_);
  int64_t off = 0;
  for (const auto& [n, p] : params) {
    at::Tensor part = flat[0].narrow(0, off, p.numel()).view(p.sizes());
    if (p.grad().defined()) {
      p.mutable_grad().copy_(part);
    } else {
      const_cast<at::Tensor&>(p).mutable_grad() = part.clone();
    }
    off += p.numel();
  }
}

void DataParallel::BroadcastFromRankZero(
    const std::vector<std::pair<std::string, at::Tensor>>& params) {
  at::NoGradGuard g;
  std::vector<at::Tensor> parts;
  for (const auto& [n, p] : params) parts.push_back(p.detach().reshape({-1}));
  std::vector<at::Tensor> flat = {at::cat(parts)};
  impl_->pg->broadcast(flat)->wait();
  int64_t off = 0;
  for (const auto& [n, p] : params) {
    const_cast<at::Tensor&>(p).detach().copy_(flat[0].narrow(0, off, p.numel()).view(p.sizes()));
    off += p.numel();
  }
}

}  // namespace amoeba
