#include "distill/train_loop.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_format.h"
#include "adamw.h"
#include "distill/data_parallel.h"
#include "model/file_util.h"
#include "model/progress.h"
#include "model/safetensors.h"
#include "model/status_macros.h"

namespace amoeba {

double ScheduledLr(const LoopOptions& o, int64_t step) {
  if (o.warmup > 0 && step < o.warmup) return o.lr * (step + 1) / o.warmup;
  if (o.schedule == "cosine") {
    const double p =
        static_cast<double>(step - o.warmup) / std::max<int64_t>(1, o.steps - o.warmup);
    return o.lr *
           (0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * std::min(1.0, p))));  // to 10% of the peak
  }
  return o.lr;
}

namespace {

absl::Status Save(const std::string& path, const AdamW& opt, int64_t step, const std::string& fp) {
  NamedTensors t;
  for (const auto& [n, p] : opt.params()) t.emplace_back(n, p.detach());
  for (auto& e : opt.State()) t.push_back(std::move(e));
  return WriteSafetensors(path, t,
                          {{"format", "amoeba-checkpoint"},
                           {"step", std::to_string(step)},
                           {"adam_t", std::to_string(opt.steps())},
                           {"fingerprint", fp}});
}

absl::StatusOr<int64_t> Load(const std::string& path, AdamW& opt, const std::string& fp) {
  ASSIGN_OR_RETURN(auto f, SafetensorsFile::Open(path));
  auto md = f->metadata();
  if (md["format"] != "amoeba-checkpoint")
    return absl::DataLossError(path + ": not an Amoeba checkpoint");
  if (md["fingerprint"] != fp) {
    return absl::FailedPreconditionError(
        path + ": checkpoint was made with other options; resume with the same flags");
  }
  at::NoGradGuard g;
  std::vector<at::Tensor> m, v;
  for (const auto& [n, p] : opt.params()) {
    ASSIGN_OR_RETURN(at::Tensor x, f->GetF32(n));
    if (x.sizes() != p.sizes())
      return absl::DataLossError(path + ": tensor '" + n + "' has the wrong shape");
    const_cast<at::Tensor&>(p).copy_(x);
    ASSIGN_OR_RETURN(at::Tensor mm, f->GetF32("adam.m." + n));
    ASSIGN_OR_RETURN(at::Tensor vv, f->GetF32("adam.v." + n));
    m.push_back(mm);
    v.push_back(vv);
  }
  opt.LoadState(m, v, std::stoll(md["adam_t"]));
  return std::stoll(md["step"]);
}

}  // namespace

absl::Status TruncateMetricsLog(const std::string& path, int64_t step) {
  std::string kept;
  if (step > 0 && std::filesystem::exists(path)) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(path));
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) {
      const auto row = nlohmann::json::parse(line, nullptr, false);
      if (row.is_object() && row.value("step", int64_t{0}) <= step) kept += line + "\n";
    }
  }
  return WriteFileAtomic(path, kept);
}

absl::StatusOr<LoopResult> RunTrainingLoop(
    const std::vector<std::pair<std::string, at::Tensor>>& params, const LoopOptions& o,
    const MicroStep& micro_step, const std::atomic<bool>* stop) {
  if (o.steps < 1 || o.grad_accum < 1)
    return absl::InvalidArgumentError("steps and grad-accum must be >= 1");
  AdamWOptions ao;
  ao.weight_decay = o.weight_decay;
  AdamW opt(params, ao);
  LoopResult r;
  const int rank = o.dp ? o.dp->rank() : 0, world = o.dp ? o.dp->world() : 1;
  const bool lead = rank == 0;
  if (o.resume && !o.checkpoint.empty() && std::filesystem::exists(o.checkpoint)) {
    ASSIGN_OR_RETURN(r.step, Load(o.checkpoint, opt, o.fingerprint));
    spdlog::info("{}: resumed from {} at step {}", o.label, o.checkpoint, r.step);
  }
  if (o.dp) o.dp->BroadcastFromRankZero(params);  // identical starting point on every rank
  std::ofstream log;
  if (lead && !o.metrics_log.empty()) {
    RETURN_IF_ERROR(TruncateMetricsLog(o.metrics_log, r.step));
    log.open(o.metrics_log, std::ios::app);
  }
  std::unique_ptr<Progress> bar;
  if (lead && o.progress) bar = std::make_unique<Progress>(o.label, o.steps, r.step);
  const auto t0 = std::chrono::steady_clock::now();
  int64_t tokens = 0;
  while (r.step < o.steps) {
    if (stop && *stop) {
      r.interrupted = true;
      break;
    }
    opt.ZeroGrad();
    double loss = 0, aux = 0;
    for (int64_t local = 0; local < o.grad_accum; ++local) {
      const int64_t micro = local * world + rank;
      // In-step randomness (router noise) is a function of (seed, step, global micro).
      at::manual_seed(o.seed * 1000003 + static_cast<uint64_t>(r.step) * 1009 +
                      static_cast<uint64_t>(micro));
      MicroResult m = micro_step(r.step, micro);
      loss += m.loss / o.grad_accum;
      aux += m.aux / o.grad_accum;
      tokens += m.tokens;
    }
    if (o.dp) o.dp->AllReduceMeanGradients(params);
    const double norm = opt.ClipGradNorm(o.clip);
    const double lr = ScheduledLr(o, r.step);
    opt.Step(lr);
    ++r.step;
    r.loss = loss;
    r.aux = aux;
    const double rate =
        tokens /
        std::max(1e-9,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    if (log) {
      log << nlohmann::json({{"step", r.step},
                             {"loss", loss},
                             {"aux_loss", aux},
                             {"lr", lr},
                             {"grad_norm", norm},
                             {"tokens_per_s", rate}})
                 .dump()
          << "\n";
      log.flush();
    }
    if (bar) bar->Advance(1, absl::StrFormat("loss %.3f (%.3f) %.0f tok/s", loss, aux, rate));
    if (lead && !o.checkpoint.empty() && (r.step % o.checkpoint_every == 0 || r.step == o.steps)) {
      RETURN_IF_ERROR(Save(o.checkpoint, opt, r.step, o.fingerprint));
    }
    if (o.on_step) o.on_step(r.step);
  }
  if (lead && r.interrupted && !o.checkpoint.empty()) {
    RETURN_IF_ERROR(Save(o.checkpoint, opt, r.step, o.fingerprint));
    spdlog::info("{}: stopped at step {}; checkpoint saved, rerun with --resume to continue",
                 o.label, r.step);
  }
  return r;
}

}  // namespace amoeba
