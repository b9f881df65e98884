#include "model/packed_linear.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "model/kernels.h"

namespace amoeba {

namespace {

constexpr int64_t kPanel = 16;
constexpr int64_t kPrefetchFloats = 1024;  // 4 KB ahead in the panel stream (measured best)

// J inputs against one panel: J zmm accumulators holding 16 outputs each. xt is [in][J] (inputs
// transposed, padded to J columns). Writes the first `valid` outputs of the panel for the first
// `rows` (<= J) inputs.
template <int J>
__attribute__((target("avx512f"))) void PanelAvx512(const float* panel, const float* xt, int64_t in,
                                                    float* y, int64_t out, int64_t col,
                                                    int64_t valid, int64_t rows) {
  // Below 4 inputs there are too few accumulator chains to hide the FMA latency: unroll k by U
  // with separate accumulators and add them up at the end.
  constexpr int U = J >= 4 ? 1 : 4 / J;
  __m512 acc[U][J];
  for (int u = 0; u < U; ++u)
    for (int j = 0; j < J; ++j) acc[u][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + U <= in; k += U) {
    _mm_prefetch(reinterpret_cast<const char*>(panel + k * kPanel + kPrefetchFloats), _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      const __m512 w = _mm512_loadu_ps(panel + (k + u) * kPanel);
      const float* xk = xt + (k + u) * J;
      for (int j = 0; j < J; ++j) acc[u][j] = _mm512_fmadd_ps(w, _mm512_set1_ps(xk[j]), acc[u][j]);
    }
  }
  for (; k < in; ++k) {
    const __m512 w = _mm512_loadu_ps(panel + k * kPanel);
    for (int j = 0; j < J; ++j)
      acc[0][j] = _mm512_fmadd_ps(w, _mm512_set1_ps(xt[k * J + j]), acc[0][j]);
  }
  for (int u = 1; u < U; ++u)
    for (int j = 0; j < J; ++j) acc[0][j] = _mm512_add_ps(acc[0][j], acc[u][j]);
  const __mmask16 m = static_cast<__mmask16>((1u << valid) - 1);
  for (int j = 0; j < J; ++j)
    if (j < rows) _mm512_mask_storeu_ps(y + j * out + col, m, acc[0][j]);
}

void PanelScalar(const float* panel, const float* xt, int64_t J, int64_t in, float* y, int64_t out,
                 int64_t col, int64_t valid, int64_t rows) {
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t c = 0; c < valid; ++c) {
      float s = 0.f;
      for (int64_t k = 0; k < in; ++k) s += panel[k * kPanel + c] * xt[k * J + j];
      y[j * out + col + c] = s;
    }
}

template <int J>
void RunGroup(const float* panels, int64_t panel_stride, const float* xt, int64_t in, float* y,
              int64_t out, int64_t rows, bool avx512) {
  const int64_t num = (out + kPanel - 1) / kPanel;
  at::parallel_for(0, num, 4, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t valid = std::min(kPanel, out - p * kPanel);
      if (avx512) {
        PanelAvx512<J>(panels + p * panel_stride, xt, in, y, out, p * kPanel, valid, rows);
      } else {
        PanelScalar(panels + p * panel_stride, xt, J, in, y, out, p * kPanel, valid, rows);
      }
    }
  });
}

}  // namespace

at::Tensor PackPanels(const at::Tensor& W) {
  TORCH_CHECK(W.dim() == 2, "PackPanels: a matrix");
  const int64_t out = W.size(0), in = W.size(1);
  const int64_t num = (out + kPanel - 1) / kPanel;
  at::Tensor padded = at::zeros({num * kPanel, in});
  padded.narrow(0, 0, out).copy_(W);
  return padded.view({num, kPanel, in}).permute({0, 2, 1}).contiguous();  // [num, in, 16]
}

void LinearPacked(const float* x, int64_t n, const at::Tensor& panels, int64_t out, int64_t in,
                  const float* bias, float* y) {
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == kPanel && panels.is_contiguous() &&
                  panels.scalar_type() == at::kFloat,
              "LinearPacked: panels from PackPanels");
  TORCH_CHECK(out <= panels.size(0) * kPanel && in <= panels.size(1),
              "LinearPacked: the prefix exceeds the packed matrix");
  if (n == 0 || out == 0) return;
  const float* base = panels.data_ptr<float>();
  const int64_t panel_stride = panels.size(1) * kPanel;  // a prefix of `in` keeps the stride
  const bool avx512 = ActiveKernelIsa() == KernelIsa::kAvx512;
  thread_local std::vector<float> xt;  // grown once, reused: no allocation per decode step
  if (static_cast<int64_t>(xt.size()) < in * kPanel) xt.resize(in * kPanel);
  for (int64_t r0 = 0; r0 < n; r0 += kPanel) {
    const int64_t rows = std::min(kPanel, n - r0);
    // Inputs per group: the next of 1, 2, 4, 8, 16 that covers `rows`; padding columns are zero.
    const int64_t J = rows <= 2 ? rows : rows <= 4 ? 4 : rows <= 8 ? 8 : 16;
    // Transpose the group to [in][J], so each k reads J adjacent values.
    std::fill(xt.begin(), xt.begin() + in * J, 0.f);
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t k = 0; k < in; ++k) xt[k * J + j] = x[(r0 + j) * in + k];
    float* yg = y + r0 * out;
    switch (J) {
      case 1:
        RunGroup<1>(base, panel_stride, xt.data(), in, yg, out, rows, avx512);
        break;
      case 2:
        RunGroup<2>(base, panel_stride, xt.data(), in, yg, out, rows, avx512);
        break;
      case 4:
        RunGroup<4>(base, panel_stride, xt.data(), in, yg, out, rows, avx512);
        break;
      case 8:
        RunGroup<8>(base, panel_stride, xt.data(), in, yg, out, rows, avx512);
        break;
      default:
        RunGroup<16>(base, panel_stride, xt.data(), in, yg, out, rows, avx512);
    }
  }
  if (bias)
    for (int64_t j = 0; j < n; ++j) AddInPlace(y + j * out, bias, out);
}

}  // namespace amoeba
