// How long a decode step takes for what is in flight, learned from the steps the scheduler runs.
// With shared steps every running sequence gets one token per step, so a sequence's decode time
// per token is the step time, and that depends on the whole batch: the weight bytes the pass
// streams (each supernet layer at the widest width in flight) and the work of every row (each
// row multiplies its own shape's weights). The model is linear in those two,
//   ms = c0 + c1 · union_mb + c2 · row_mb,
// fitted by least squares over recent steps (exponentially forgotten) with a ridge pull towards a
// prior from the idle profile, so it predicts sensibly before it has seen a varied load. A fast
// correction follows it: the fit forgets over ~200 steps, so when every step turns slower at once
// (other work on the cores, another load pattern) it kept predicting the old times for seconds;
// predictions are scaled by a short average of the recent steps' actual / fitted times.
#pragma once
#include <array>
#include <cstdint>

namespace amoeba {

struct StepTimeModelOptions {
  double prior_ms = 0.5;               // c0: per-step overhead
  double prior_ms_per_union_mb = 0.1;  // c1: streaming the weights (1 / bandwidth)
  double prior_ms_per_row_mb = 0.01;   // c2: one row's work per MB of its shape's weights
  double prior_weight = 0.1;           // how many steps' worth of evidence the prior is
  double forget = 0.995;               // per observed step: older steps fade
  double correction_rate = 0.1;        // weight of the newest step in the fast correction
  int64_t correction_after = 32;       // steps observed before the correction starts
};

class StepTimeModel {
 public:
  explicit StepTimeModel(StepTimeModelOptions options = {});
  // One decode step: the weight MB it streamed, the sum over its rows of their shapes' weight
  // MB, and its time.
  void Observe(double union_mb, double row_mb, double ms);
  // The step time for such a batch (at least the overhead, never negative).
  double Predict(double union_mb, double row_mb) const;
  int64_t observed() const { return observed_; }
  const std::array<double, 3>& coefficients() const { return theta_; }
  // Recent steps' actual / fitted time (1 until `correction_after` steps were seen).
  double correction() const { return correction_; }

 private:
  double Fitted(double union_mb, double row_mb) const;
  void Solve();
  StepTimeModelOptions opt_;
  std::array<double, 9> xtx_{};  // Σ x xᵀ (decayed), row-major 3x3
  std::array<double, 3> xty_{};  // Σ x y (decayed)
  std::array<double, 3> theta_{};
  int64_t observed_ = 0;
  double correction_ = 1.0;
};

}  // namespace amoeba
