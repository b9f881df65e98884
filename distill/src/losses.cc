#include "losses.h"

namespace amoeba {

namespace {
at::Tensor TargetMask(const at::Tensor& mask) {
  return mask.narrow(1, 1, mask.size(1) - 1);
}
}  // namespace

at::Tensor MaskedCrossEntropy(const at::Tensor& logits, const at::Tensor& tokens,
                              const at::Tensor& mask) {
  const int64_t T = tokens.size(1);
  at::Tensor lp = at::log_softmax(logits.narrow(1, 0, T - 1), -1);
  at::Tensor nll = -lp.gather(-1, tokens.narrow(1, 1, T - 1).unsqueeze(-1)).squeeze(-1);
  at::Tensor m = TargetMask(mask);
  return (nll * m).sum() / m.sum().clamp_min(1);
}

at::Tensor MaskedSoftCrossEntropy(const at::Tensor& student, const at::Tensor& teacher,
                                  const at::Tensor& mask) {
  const int64_t T = student.size(1);
  at::Tensor p = at::softmax(teacher.narrow(1, 0, T - 1).detach(), -1);
  at::Tensor lp = at::log_softmax(student.narrow(1, 0, T - 1), -1);
  at::Tensor ce = -(p * lp).sum(-1);
  at::Tensor m = TargetMask(mask);
  return (ce * m).sum() / m.sum().clamp_min(1);
}

at::Tensor BalanceLoss(const at::Tensor& loss_i, const at::Tensor& loss_0) {
  return loss_i * (loss_0.detach() / loss_i.detach());
}

}  // namespace amoeba
