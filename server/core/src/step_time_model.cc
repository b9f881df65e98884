#include "server/step_time_model.h"

#include <algorithm>
#include <cmath>

namespace amoeba {

StepTimeModel::StepTimeModel(StepTimeModelOptions options) : opt_(options) {
  theta_ = {opt_.prior_ms, opt_.prior_ms_per_union_mb, opt_.prior_ms_per_row_mb};
}

void StepTimeModel::Observe(double union_mb, double row_mb, double ms) {
  if (!(ms >= 0) || !std::isfinite(ms) || !std::isfinite(union_mb) || !std::isfinite(row_mb))
    return;
  if (observed_ >= opt_.correction_after) {
    const double fitted = Fitted(union_mb, row_mb);
    if (fitted > 0) {
      correction_ += opt_.correction_rate * (ms / fitted - correction_);
      correction_ = std::clamp(correction_, 0.5, 4.0);
    }
  }
  const std::array<double, 3> x = {1.0, union_mb, row_mb};
  for (double& v : xtx_) v *= opt_.forget;
  for (double& v : xty_) v *= opt_.forget;
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) xtx_[i * 3 + j] += x[i] * x[j];
    xty_[i] += x[i] * ms;
  }
  ++observed_;
  Solve();
}

void StepTimeModel::Solve() {
  // (XᵀX + λ S) θ = Xᵀy + λ S θ0, with S scaling each coefficient's pull to its feature's size
  // (so the prior weighs like `prior_weight` typical steps), solved by Gaussian elimination.
  const std::array<double, 3> prior = {opt_.prior_ms, opt_.prior_ms_per_union_mb,
                                       opt_.prior_ms_per_row_mb};
  std::array<double, 12> a{};  // [3 x 4] augmented
  for (int i = 0; i < 3; ++i) {
    const double scale = std::max(xtx_[i * 3 + i], 1e-9) / std::max(xtx_[0], 1.0);
    const double lambda = opt_.prior_weight * scale;
    for (int j = 0; j < 3; ++j) a[i * 4 + j] = xtx_[i * 3 + j] + (i == j ? lambda : 0.0);
    a[i * 4 + 3] = xty_[i] + lambda * prior[i];
  }
  for (int c = 0; c < 3; ++c) {
    int pivot = c;
    for (int r = c + 1; r < 3; ++r)
      if (std::abs(a[r * 4 + c]) > std::abs(a[pivot * 4 + c])) pivot = r;
    if (std::abs(a[pivot * 4 + c]) < 1e-12) return;  // keep the last solution
    for (int j = 0; j < 4; ++j) std::swap(a[c * 4 + j], a[pivot * 4 + j]);
    for (int r = 0; r < 3; ++r) {
      if (r == c) continue;
      const double f = a[r * 4 + c] / a[c * 4 + c];
      for (int j = c; j < 4; ++j) a[r * 4 + j] -= f * a[c * 4 + j];
    }
  }
  for (int i = 0; i < 3; ++i) theta_[i] = a[i * 4 + 3] / a[i * 4 + i];
}

double StepTimeModel::Fitted(double union_mb, double row_mb) const {
  const double ms = theta_[0] + theta_[1] * union_mb + theta_[2] * row_mb;
  return std::max({ms, theta_[0], 0.0});
}

double StepTimeModel::Predict(double union_mb, double row_mb) const {
  return correction_ * Fitted(union_mb, row_mb);
}

}  // namespace amoeba
