#include "adamw.h"

#include <cmath>

namespace amoeba {

AdamW::AdamW(std::vector<std::pair<std::string, at::Tensor>> params, AdamWOptions o)
    : params_(std::move(params)), o_(o) {
  for (auto& [n, p] : params_) {
    m_.push_back(at::zeros_like(p));
    v_.push_back(at::zeros_like(p));
  }
}

void AdamW::ZeroGrad() {
  for (auto& [n, p] : params_)
    if (p.grad().defined()) p.mutable_grad().zero_();
}

double AdamW::ClipGradNorm(double max_norm) {
  at::NoGradGuard g;
  double sq = 0;
  for (auto& [n, p] : params_)
    if (p.grad().defined()) sq += p.grad().pow(2).sum().item<double>();
  const double norm = std::sqrt(sq);
  if (norm > max_norm && norm > 0) {
    const double s = max_norm / (norm + 1e-6);
    for (auto& [n, p] : params_)
      if (p.grad().defined()) p.mutable_grad().mul_(s);
  }
  return norm;
}

void AdamW::Step(double lr) {
  at::NoGradGuard g;
  ++t_;
  const double bc1 = 1 - std::pow(o_.beta1, t_), bc2 = 1 - std::pow(o_.beta2, t_);
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor& p = params_[i].second;
    if (!p.grad().defined()) continue;
    const at::Tensor& gr = p.grad();
    m_[i].mul_(o_.beta1).add_(gr, 1 - o_.beta1);
    v_[i].mul_(o_.beta2).addcmul_(gr, gr, 1 - o_.beta2);
    if (o_.weight_decay > 0) p.mul_(1 - lr * o_.weight_decay);
    at::Tensor denom = (v_[i] / bc2).sqrt_().add_(o_.eps);
    p.addcdiv_(m_[i], denom, -lr / bc1);
  }
}

NamedTensors AdamW::State() const {
  NamedTensors out;
  for (size_t i = 0; i < params_.size(); ++i) {
    out.emplace_back("adam.m." + params_[i].first, m_[i]);
    out.emplace_back("adam.v." + params_[i].first, v_[i]);
  }
  return out;
}

void AdamW::LoadState(const std::vector<at::Tensor>& m, const std::vector<at::Tensor>& v,
                      int64_t t) {
  at::NoGradGuard g;
  for (size_t i = 0; i < params_.size(); ++i) {
    m_[i].copy_(m[i]);
    v_[i].copy_(v[i]);
  }
  t_ = t;
}

}  // namespace amoeba
