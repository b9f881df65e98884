// Quality metrics on a model (usually a subnet): perplexity on token windows and multiple-choice
// accuracy by log-likelihood of each choice.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
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

// The decode engine on `test` (say, quantized panels) against the engine on `reference` (fp32)
// over the same windows ([N, T] int64), each window one prefill: the mean per-token
// KL(reference || test) and both mean next-token NLLs.
struct EngineComparison {
  double mean_kl = 0;
  double reference_nll = 0, test_nll = 0;
  int64_t tokens = 0;
};
absl::StatusOr<EngineComparison> CompareEngines(const std::shared_ptr<const Model>& reference,
                                                const std::shared_ptr<const Model>& test,
                                                const at::Tensor& windows);

// Fraction of items whose answer has the highest summed log-likelihood (given the prompt).
double MultipleChoiceAccuracy(const Model& m, const Tokenizer& tok,
                              const std::vector<MultipleChoiceItem>& items);

}  // namespace amoeba
