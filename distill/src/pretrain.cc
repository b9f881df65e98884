#include "distill/pretrain.h"

#include "absl/strings/str_cat.h"
#include "losses.h"
#include "model/torch_forward.h"

namespace amoeba {

absl::StatusOr<LoopResult> Pretrain(Model& m, const TrainData& data, const PretrainOptions& o,
                                    const std::atomic<bool>* stop) {
  if (o.batch < 1 || o.seq_len < 2)
    return absl::InvalidArgumentError("pretrain: batch >= 1, seq-len >= 2");
  // Own the weights (they may be views of a memory-mapped file) and train them.
  const bool tied = m.config.tie_word_embeddings;
  m.embed = m.embed.to(at::kFloat).clone();
  m.final_norm = m.final_norm.clone();
  m.lm_head = tied ? m.embed : m.lm_head.to(at::kFloat).clone();
  for (auto& l : m.layers) {
    for (at::Tensor* t :
         {&l.attn_norm, &l.mlp_norm, &l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down, &l.q_bias,
          &l.k_bias, &l.v_bias, &l.o_bias, &l.gate_bias, &l.up_bias, &l.down_bias}) {
      if (t->defined()) *t = t->to(at::kFloat).clone();
    }
  }
  auto params = NamedWeights(m);
  for (auto& [n, t] : params) t.requires_grad_(true);
  LoopOptions lo = o.loop;
  lo.label = "pretrain";
  lo.fingerprint =
      absl::StrCat(ModelConfigToJson(m.config).dump(), "|", o.batch, "|", o.seq_len, "|", lo.lr,
                   "|", lo.schedule, "|", lo.warmup, "|", lo.seed, "|", lo.steps);
  auto r = RunTrainingLoop(
      params, lo,
      [&](int64_t step, int64_t micro) {
        TrainBatch b = data.Sample(lo.seed, step, micro, o.batch, o.seq_len);
        at::Tensor loss = MaskedCrossEntropy(TorchForward(m, b.tokens), b.tokens, b.mask);
        (loss / static_cast<double>(lo.grad_accum)).backward();
        return MicroResult{loss.item<double>(), 0.0, b.tokens.numel()};
      },
      stop);
  for (auto& [n, t] : params) t.requires_grad_(false);
  return r;
}

}  // namespace amoeba
