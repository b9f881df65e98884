#include "distill/tuner.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "distill/adamw.h"
#include "distill/losses.h"
#include "model/progress.h"
#include "model/safetensors.h"
#include "model/status_macros.h"
#include "model/torch_forward.h"
#include "subnet/metrics.h"

namespace amoeba {

namespace {

int64_t WidthIndex(const Supernet& s, double w) {
  const auto& ws = s.spec().widths;
  for (size_t i = 0; i < ws.size(); ++i)
    if (std::abs(ws[i] - w) < 1e-9) return static_cast<int64_t>(i);
  return 0;
}

// The sandwich: full, K-2 random (depth uniform in [d_min, L), distinct widths), smallest.
std::vector<Shape> SandwichShapes(const Supernet& s, int64_t K, uint64_t seed, int64_t step, int64_t micro) {
  std::mt19937_64 rng(seed * 31 + static_cast<uint64_t>(step) * 7919 + static_cast<uint64_t>(micro) + 17);
  std::vector<Shape> out = {s.FullShape()};
  const auto& depths = s.spec().depths;
  const auto& widths = s.spec().widths;
  std::vector<size_t> widx(widths.size());
  for (size_t i = 0; i < widx.size(); ++i) widx[i] = i;
  std::shuffle(widx.begin(), widx.end(), rng);
  for (int64_t k = 0; k < K - 2; ++k) {
    // depth uniform in [d_min, L): all grid depths but the full one
    const int64_t d = depths.size() > 1 ? depths[rng() % (depths.size() - 1)] : depths[0];
    out.push_back({d, widths[widx[k % widx.size()]]});
  }
  if (K >= 2) out.push_back(s.SmallestShape());
  return out;
}

double LearningRate(const TuneOptions& o, int64_t step) {
  if (o.warmup > 0 && step < o.warmup) return o.lr * (step + 1) / o.warmup;
  if (o.schedule == "cosine") {
    const double p = static_cast<double>(step - o.warmup) / std::max<int64_t>(1, o.steps - o.warmup);
    return o.lr * 0.5 * (1 + std::cos(M_PI * std::min(1.0, p)));
  }
  return o.lr;
}

at::Tensor SubnetLogits(const Supernet& s, const Smol& smol, const Shape& sh, const at::Tensor& tokens, bool training) {
  const auto& layers = s.spec().FindDepth(sh.depth)->layers;
  Model sub = *s.Extract(sh);
  at::Tensor gate = smol.Gate(smol.ShapeFeature(layers, WidthIndex(s, sh.width)), training);
  TorchForwardOptions opt;
  opt.linear = smol.Hook(gate, layers);
  return TorchForward(sub, tokens, opt);
}

std::string Fingerprint(const TuneOptions& o, const Smol& smol) {
  return absl::StrCat(o.batch, "|", o.seq_len, "|", o.grad_accum, "|", o.subnets, "|", o.lr, "|", o.schedule, "|",
                      o.warmup, "|", o.clip, "|", o.seed, "|", o.balancing, "|", o.distill, "|",
                      smol.config().ToJson().dump());
}

absl::Status SaveCheckpoint(const std::string& path, const Smol& smol, const AdamW& opt, int64_t step,
                            const std::string& fp) {
  NamedTensors t = smol.NamedParameters();
  for (auto& e : opt.State()) t.push_back(std::move(e));
  for (auto& [n, x] : t) x = x.detach();
  return WriteSafetensors(path, t, {{"format", "amoeba-tune-checkpoint"}, {"step", std::to_string(step)},
                                    {"adam_t", std::to_string(opt.steps())}, {"fingerprint", fp}});
}

absl::StatusOr<int64_t> LoadCheckpoint(const std::string& path, Smol& smol, AdamW& opt, const std::string& fp) {
  ASSIGN_OR_RETURN(auto f, SafetensorsFile::Open(path));
  auto md = f->metadata();
  if (md["format"] != "amoeba-tune-checkpoint") return absl::DataLossError(path + ": not a tune checkpoint");
  if (md["fingerprint"] != fp) {
    return absl::FailedPreconditionError(path + ": checkpoint was made with other options; resume with the same flags");
  }
  at::NoGradGuard g;
  std::vector<at::Tensor> m, v;
  for (auto& [n, p] : smol.NamedParameters()) {
    ASSIGN_OR_RETURN(at::Tensor x, f->GetF32(n));
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

at::Tensor InferenceGate(const Supernet& s, const Smol& smol, const Shape& shape) {
  return smol.Gate(smol.ShapeFeature(s.spec().FindDepth(shape.depth)->layers, WidthIndex(s, shape.width)), false);
}

SandwichLosses SandwichStep(const Supernet& s, const Smol& smol, const TrainBatch& b, const TuneOptions& o,
                            int64_t step, int64_t micro) {
  SandwichLosses out;
  out.shapes = SandwichShapes(s, o.subnets, o.seed, step, micro);
  at::Tensor teacher, l0;
  const double accum = static_cast<double>(std::max<int64_t>(1, o.grad_accum));
  for (size_t i = 0; i < out.shapes.size(); ++i) {
    at::Tensor logits = SubnetLogits(s, smol, out.shapes[i], b.tokens, /*training=*/true);
    at::Tensor loss;
    if (i == 0) {
      loss = MaskedCrossEntropy(logits, b.tokens, b.mask);
      teacher = logits.detach();
      l0 = loss.detach();
      out.full = loss.item<double>();
    } else {
      loss = o.distill ? MaskedSoftCrossEntropy(logits, teacher, b.mask) : MaskedCrossEntropy(logits, b.tokens, b.mask);
      if (i + 1 == out.shapes.size()) out.smallest = loss.item<double>();
      if (o.balancing) loss = BalanceLoss(loss, l0);
    }
    (loss / accum).backward();
  }
  return out;
}

absl::StatusOr<TuneResult> Tune(const Supernet& s, Smol& smol, const TrainData& data, const TuneOptions& o,
                                const std::atomic<bool>* stop) {
  if (o.steps < 1 || o.batch < 1 || o.seq_len < 2 || o.grad_accum < 1 || o.subnets < 1)
    return absl::InvalidArgumentError("tune: steps, batch, grad-accum and subnets must be >= 1, seq-len >= 2");
  smol.SetRequiresGrad(true);
  AdamWOptions ao;
  ao.weight_decay = o.weight_decay;
  AdamW opt(smol.NamedParameters(), ao);
  const std::string fp = Fingerprint(o, smol);
  TuneResult r;
  if (o.resume && !o.checkpoint.empty() && std::filesystem::exists(o.checkpoint)) {
    ASSIGN_OR_RETURN(r.step, LoadCheckpoint(o.checkpoint, smol, opt, fp));
    spdlog::info("tune: resumed from {} at step {}", o.checkpoint, r.step);
  }
  std::ofstream log;
  if (!o.metrics_log.empty()) log.open(o.metrics_log, std::ios::app);
  std::unique_ptr<Progress> bar;
  if (o.progress) bar = std::make_unique<Progress>("tune", o.steps, r.step);
  const auto t0 = std::chrono::steady_clock::now();
  int64_t tokens = 0;
  while (r.step < o.steps) {
    if (stop && *stop) {
      r.interrupted = true;
      break;
    }
    at::manual_seed(o.seed * 1000003 + static_cast<uint64_t>(r.step));  // router noise of this step
    opt.ZeroGrad();
    double full = 0, small = 0;
    for (int64_t micro = 0; micro < o.grad_accum; ++micro) {
      TrainBatch b = data.Sample(o.seed, r.step, micro, o.batch, o.seq_len);
      SandwichLosses l = SandwichStep(s, smol, b, o, r.step, micro);
      full += l.full / o.grad_accum;
      small += l.smallest / o.grad_accum;
      tokens += b.tokens.numel();
    }
    const double norm = opt.ClipGradNorm(o.clip);
    const double lr = LearningRate(o, r.step);
    opt.Step(lr);
    ++r.step;
    r.loss_full = full;
    r.loss_smallest = small;
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (log) {
      log << nlohmann::json({{"step", r.step}, {"loss_full", full}, {"loss_smallest", small}, {"lr", lr},
                             {"grad_norm", norm}, {"tokens_per_s", tokens / std::max(secs, 1e-9)}}).dump()
          << "\n";
      log.flush();
    }
    if (bar) bar->Advance(1, absl::StrFormat("loss %.3f small %.3f %.0f tok/s", full, small, tokens / std::max(secs, 1e-9)));
    if (!o.checkpoint.empty() && (r.step % o.checkpoint_every == 0 || r.step == o.steps)) {
      RETURN_IF_ERROR(SaveCheckpoint(o.checkpoint, smol, opt, r.step, fp));
    }
    if (o.on_step) o.on_step(r.step);
  }
  if (r.interrupted && !o.checkpoint.empty()) {
    RETURN_IF_ERROR(SaveCheckpoint(o.checkpoint, smol, opt, r.step, fp));
    spdlog::info("tune: interrupted at step {}; checkpoint saved, rerun with --resume to continue", r.step);
  }
  smol.SetRequiresGrad(false);
  return r;
}

double HeldoutNll(const Supernet& s, const Smol* smol, const Shape& shape, const at::Tensor& windows) {
  at::InferenceMode g;
  Model sub = *s.Extract(shape);
  TorchForwardOptions opt;
  if (smol) opt.linear = smol->Hook(InferenceGate(s, *smol, shape), s.spec().FindDepth(shape.depth)->layers);
  return MeanNll(sub, windows, 8, opt);
}

}  // namespace amoeba
