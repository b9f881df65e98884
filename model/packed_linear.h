// Weights packed for batched decode (the next step of issue 7, not wired into the engine yet):
// panels of 16 output rows stored k-major, [ceil(out/16), in, 16] fp32, zero-padded. The kernel is
// an outer product per k: one 16-wide weight load feeds up to 16 inputs' accumulators (no
// horizontal sums), and each thread reads its panels as one sequential stream with a software
// prefetch ahead, so computing and streaming from DRAM overlap (bench/kernels: 1.25-1.6x the
// row-major skinny GEMM at batch 16). A prefix of the original matrix (a sliced subnet: fewer
// outputs and/or inputs) is served from the same panels.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace amoeba {

// Packs W [out, in] (fp32 or fp16, unit column stride) into panels.
at::Tensor PackPanels(const at::Tensor& W);

// y[n, out] = x[n, in] · W[:out, :in]^T (+ bias[out]) for `panels` = PackPanels(W), with out and
// in at most W's sizes. x rows are contiguous (stride in), y rows contiguous (stride out).
void LinearPacked(const float* x, int64_t n, const at::Tensor& panels, int64_t out, int64_t in,
                  const float* bias, float* y);

}  // namespace amoeba
