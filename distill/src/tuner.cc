#include "distill/tuner.h"

#include "model/status_macros.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "losses.h"
#include "distill/train_loop.h"
#include "model/torch_forward.h"
#include "subnet/metrics.h"

namespace amoeba {

namespace {

// The sandwich: full, K-2 random (depth uniform in [d_min, L), distinct widths), smallest.
std::vector<Shape> SandwichShapes(const Supernet& s, int64_t K, uint64_t seed, int64_t step,
                                  int64_t micro) {
  std::mt19937_64 rng(seed * 31 + static_cast<uint64_t>(step) * 7919 +
                      static_cast<uint64_t>(micro) + 17);
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

at::Tensor SubnetLogits(const Supernet& s, const Smol& smol, const Shape& sh,
                        const at::Tensor& tokens, bool training) {
  const auto& layers = s.spec().FindDepth(sh.depth)->layers;
  Model sub = *s.Extract(sh);
  at::Tensor gate = smol.Gate(smol.ShapeFeature(layers, s.WidthIndex(sh.width)), training);
  TorchForwardOptions opt;
  opt.linear = smol.Hook(gate, layers);
  return TorchForward(sub, tokens, opt);
}

std::string Fingerprint(const TuneOptions& o, const Smol& smol) {
  return absl::StrCat(o.batch, "|", o.seq_len, "|", o.loop.grad_accum, "|", o.subnets, "|",
                      o.loop.lr, "|", o.loop.schedule, "|", o.loop.warmup, "|", o.loop.clip, "|",
                      o.loop.seed, "|", o.balancing, "|", o.distill, "|",
                      smol.config().ToJson().dump(), "|",
                      o.only_shape ? o.only_shape->ToString() : "sandwich");
}

}  // namespace

at::Tensor InferenceGate(const Supernet& s, const Smol& smol, const Shape& shape) {
  return smol.Gate(
      smol.ShapeFeature(s.spec().FindDepth(shape.depth)->layers, s.WidthIndex(shape.width)), false);
}

SandwichLosses SandwichStep(const Supernet& s, const Smol& smol, const TrainBatch& b,
                            const TuneOptions& o, int64_t step, int64_t micro) {
  SandwichLosses out;
  out.shapes = o.only_shape ? std::vector<Shape>{*o.only_shape}
                            : SandwichShapes(s, o.subnets, o.loop.seed, step, micro);
  at::Tensor teacher, l0;
  const double accum = static_cast<double>(std::max<int64_t>(1, o.loop.grad_accum));
  for (size_t i = 0; i < out.shapes.size(); ++i) {
    at::Tensor logits = SubnetLogits(s, smol, out.shapes[i], b.tokens, /*training=*/true);
    at::Tensor loss;
    if (i == 0) {
      loss = MaskedCrossEntropy(logits, b.tokens, b.mask);
      teacher = logits.detach();
      l0 = loss.detach();
      out.full = loss.item<double>();
      if (out.shapes.size() == 1) out.smallest = out.full;
    } else {
      loss = o.distill ? MaskedSoftCrossEntropy(logits, teacher, b.mask)
                       : MaskedCrossEntropy(logits, b.tokens, b.mask);
      if (i + 1 == out.shapes.size()) out.smallest = loss.item<double>();
      if (o.balancing) loss = BalanceLoss(loss, l0);
    }
    (loss / accum).backward();
  }
  return out;
}

absl::StatusOr<TuneResult> Tune(const Supernet& s, Smol& smol, const TrainData& data,
                                const TuneOptions& o, const std::atomic<bool>* stop) {
  if (o.batch < 1 || o.seq_len < 2 || o.subnets < 1)
    return absl::InvalidArgumentError("tune: batch and subnets must be >= 1, seq-len >= 2");
  if (o.only_shape) RETURN_IF_ERROR(s.Validate(*o.only_shape));
  smol.SetRequiresGrad(true);
  LoopOptions lo = o.loop;
  lo.fingerprint = Fingerprint(o, smol);
  auto r = RunTrainingLoop(
      smol.NamedParameters(), lo,
      [&](int64_t step, int64_t micro) {
        TrainBatch b = data.Sample(o.loop.seed, step, micro, o.batch, o.seq_len);
        SandwichLosses l = SandwichStep(s, smol, b, o, step, micro);
        return MicroResult{l.full, l.smallest, b.tokens.numel()};
      },
      stop);
  smol.SetRequiresGrad(false);
  if (!r.ok()) return r.status();
  return TuneResult{r->step, r->interrupted, r->loss, r->aux};
}

double HeldoutNll(const Supernet& s, const Smol* smol, const Shape& shape,
                  const at::Tensor& windows) {
  at::InferenceMode g;
  Model sub = *s.Extract(shape);
  TorchForwardOptions opt;
  if (smol)
    opt.linear =
        smol->Hook(InferenceGate(s, *smol, shape), s.spec().FindDepth(shape.depth)->layers);
  return MeanNll(sub, windows, 8, opt);
}

}  // namespace amoeba
