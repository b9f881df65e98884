#include "subnet/metrics.h"

#include <algorithm>

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

namespace {
// Summed log-likelihood of every continuation after `prefix`, all in one right-padded batch:
// causal attention keeps the padding out of every scored position, so each row scores as if
// alone.
std::vector<double> ContinuationScores(const Model& m, const std::vector<int64_t>& prefix,
                                       const std::vector<std::vector<int32_t>>& conts) {
  size_t longest = 0;
  for (const auto& c : conts) longest = std::max(longest, c.size());
  const int64_t C = static_cast<int64_t>(conts.size());
  const int64_t n = static_cast<int64_t>(prefix.size());
  at::Tensor batch = at::zeros({C, n + static_cast<int64_t>(longest)}, at::kLong);
  auto acc = batch.accessor<int64_t, 2>();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = 0; k < n; ++k) acc[c][k] = prefix[k];
    for (size_t k = 0; k < conts[c].size(); ++k) acc[c][n + k] = conts[c][k];
  }
  // Only the positions that predict continuation tokens need a softmax.
  at::Tensor lp = at::log_softmax(
      TorchForward(m, batch).narrow(1, n - 1, static_cast<int64_t>(longest)).to(at::kFloat), -1);
  std::vector<double> out(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    auto row = lp[c];
    for (size_t k = 0; k < conts[c].size(); ++k)
      out[c] += row[static_cast<int64_t>(k)][conts[c][k]].item<double>();
  }
  return out;
}
}  // namespace

double MultipleChoiceAccuracy(const Model& m, const Tokenizer& tok,
                              const std::vector<MultipleChoiceItem>& items) {
  at::InferenceMode guard;
  int64_t correct = 0;
  for (const auto& it : items) {
    if (it.choices.empty()) continue;
    std::vector<int64_t> prompt = {m.config.bos_token_id};
    for (int32_t t : tok.Encode(it.prompt)) prompt.push_back(t);
    std::vector<std::vector<int32_t>> conts;
    for (const std::string& c : it.choices) conts.push_back(tok.Encode(" " + c));
    std::vector<double> score = ContinuationScores(m, prompt, conts);
    if (it.unconditional_baseline) {
      const std::vector<double> alone = ContinuationScores(m, {m.config.bos_token_id}, conts);
      for (size_t c = 0; c < score.size(); ++c) score[c] -= alone[c];
    }
    const int best = static_cast<int>(std::max_element(score.begin(), score.end()) - score.begin());
    correct += best == it.answer;
  }
  return items.empty() ? 0.0 : static_cast<double>(correct) / items.size();
}

}  // namespace amoeba
