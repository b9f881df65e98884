#include "subnet/metrics.h"

#include <cmath>

#include "model/engine.h"
#include "model/status_macros.h"

namespace amoeba {

double MeanNll(const Model& m, const at::Tensor& windows, int64_t batch,
               const TorchForwardOptions& opt) {
  at::InferenceMode guard;
  double total = 0;
  int64_t count = 0;
  for (int64_t b = 0; b < windows.size(0); b += batch) {
    at::Tensor w = windows.narrow(0, b, std::min(batch, windows.size(0) - b));
    at::Tensor logits = TorchForward(m, w, opt);
    const int64_t T = w.size(1);
    at::Tensor lp = at::log_softmax(logits.narrow(1, 0, T - 1), -1);
    at::Tensor tgt = w.narrow(1, 1, T - 1).unsqueeze(-1);
    total += -lp.gather(-1, tgt).sum().item<double>();
    count += tgt.numel();
  }
  return count ? total / count : 0.0;
}

absl::StatusOr<EngineComparison> CompareEngines(const std::shared_ptr<const Model>& reference,
                                                const std::shared_ptr<const Model>& test,
                                                const at::Tensor& windows) {
  at::InferenceMode guard;
  const int64_t T = windows.size(1);
  Engine ref_engine(reference, {.max_len = T}), test_engine(test, {.max_len = T});
  KVCache ref_cache = ref_engine.NewCache(1), test_cache = test_engine.NewCache(1);
  EngineComparison c;
  double kl = 0, ref_nll = 0, test_nll = 0;
  const at::Tensor w32 = windows.to(at::kInt).contiguous();
  for (int64_t i = 0; i < w32.size(0); ++i) {
    const std::span<const int32_t> ids(w32[i].data_ptr<int32_t>(), T);
    const SeqInput in{0, ids};
    auto run = [&](Engine& e, KVCache& cache) -> absl::StatusOr<at::Tensor> {
      cache.Reset(0);
      ASSIGN_OR_RETURN(at::Tensor logits, e.Forward(cache, {&in, 1}, /*all_logits=*/true));
      return at::log_softmax(logits.narrow(0, 0, T - 1), -1);
    };
    ASSIGN_OR_RETURN(const at::Tensor lr, run(ref_engine, ref_cache));
    ASSIGN_OR_RETURN(const at::Tensor lt, run(test_engine, test_cache));
    kl += (lr.exp() * (lr - lt)).sum().item<double>();
    const at::Tensor tgt = windows[i].narrow(0, 1, T - 1).to(at::kLong).unsqueeze(-1);
    ref_nll += -lr.gather(-1, tgt).sum().item<double>();
    test_nll += -lt.gather(-1, tgt).sum().item<double>();
    c.tokens += T - 1;
  }
  if (c.tokens > 0) {
    c.mean_kl = kl / c.tokens;
    c.reference_nll = ref_nll / c.tokens;
    c.test_nll = test_nll / c.tokens;
  }
  return c;
}

double MultipleChoiceAccuracy(const Model& m, const Tokenizer& tok,
                              const std::vector<MultipleChoiceItem>& items) {
  at::InferenceMode guard;
  int64_t correct = 0;
  for (const auto& it : items) {
    std::vector<int64_t> prompt = {m.config.bos_token_id};
    for (int32_t t : tok.Encode(it.prompt)) prompt.push_back(t);
    double best = -INFINITY;
    int best_i = -1;
    for (size_t c = 0; c < it.choices.size(); ++c) {
      std::vector<int64_t> seq = prompt;
      std::vector<int32_t> cont = tok.Encode(" " + it.choices[c]);
      for (int32_t t : cont) seq.push_back(t);
      at::Tensor logits = TorchForward(m, at::tensor(seq).unsqueeze(0))[0];
      at::Tensor lp = at::log_softmax(logits, -1);
      double score = 0;
      for (size_t k = 0; k < cont.size(); ++k) {
        score += lp[prompt.size() - 1 + k][cont[k]].item<double>();
      }
      if (score > best) {
        best = score;
        best_i = static_cast<int>(c);
      }
    }
    correct += best_i == it.answer;
  }
  return items.empty() ? 0.0 : static_cast<double>(correct) / items.size();
}

}  // namespace amoeba
