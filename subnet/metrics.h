// Quality metrics on a model (usually a subnet): perplexity on token windows and multiple-choice
// accuracy by log-likelihood of each choice.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "model/tokenizer.h"
#include "model/torch_forward.h"
#include "model/weights.h"
#include "subnet/calibration_data.h"

namespace amoeba {

// Mean next-token cross-entropy over all windows ([N, T] int64), evaluated in batches.
double MeanNll(const Model& m, const at::Tensor& windows, int64_t batch = 8,
               const TorchForwardOptions& opt = {});
inline double Perplexity(const Model& m, const at::Tensor& windows, int64_t batch = 8) {
  return std::exp(MeanNll(m, windows, batch));
}

// Fraction of items whose answer has the highest summed log-likelihood (given the prompt).
double MultipleChoiceAccuracy(const Model& m, const Tokenizer& tok,
                              const std::vector<MultipleChoiceItem>& items);

}  // namespace amoeba
