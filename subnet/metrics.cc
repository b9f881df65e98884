#include "subnet/metrics.h"

#include <cmath>

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
