// Losses of in-place distillation (docs/method.md §4). Position t's logits predict token t+1; `mask`
// marks target tokens (mask[:, t+1] weighs the prediction made at t).
#pragma once
#include <ATen/ATen.h>

namespace amoeba {

// Masked mean cross-entropy against the tokens.
at::Tensor MaskedCrossEntropy(const at::Tensor& logits, const at::Tensor& tokens,
                              const at::Tensor& mask);
// Masked mean soft cross-entropy to a teacher distribution (T = 1): -Σ p_teacher · log p_student.
at::Tensor MaskedSoftCrossEntropy(const at::Tensor& student_logits,
                                  const at::Tensor& teacher_logits, const at::Tensor& mask);
// Loss-magnitude balancing: L_i · L_0.detach() / L_i.detach(). Its value equals L_0's; its gradient
// is L_i's scaled by L_0 / L_i.
at::Tensor BalanceLoss(const at::Tensor& loss_i, const at::Tensor& loss_0);

}  // namespace amoeba
