// Q8_0 / Q4_0 panels: packing a matrix into the block layout, reading it back, and GGML's weight
// quantization rule.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "model/packed_linear.h"
#include "quantized_block.h"
#include "model/quantized_panels.h"

namespace amoeba {
namespace quant {

// GGML's rules. Q8_0: d = amax / 127, q = round(x / d). Q4_0: d = (the value of largest
// magnitude) / -8, q = min(15, trunc(x / d + 8.5)) - 8.
void QuantizeWeightBlock(bool q4, const float* v, float* scale, int32_t* q) {
  float amax = 0.f, max = 0.f;
  for (int64_t k = 0; k < kQuantBlock; ++k)
    if (std::fabs(v[k]) > amax) {
      amax = std::fabs(v[k]);
      max = v[k];
    }
  if (q4) {
    const float d = max / -8.f, inv = d != 0.f ? 1.f / d : 0.f;
    for (int64_t k = 0; k < kQuantBlock; ++k)
      q[k] = std::min<int32_t>(15, static_cast<int8_t>(v[k] * inv + 8.5f)) - 8;
    *scale = d;
  } else {
    const float d = amax / 127.f, inv = d != 0.f ? 1.f / d : 0.f;
    for (int64_t k = 0; k < kQuantBlock; ++k) q[k] = static_cast<int32_t>(std::round(v[k] * inv));
    *scale = d;
  }
}

}  // namespace quant

using namespace quant;

int64_t QuantBlockBytes(WeightFormat f) {
  TORCH_CHECK(IsQuantized(f), "QuantBlockBytes: q8_0 or q4_0");
  return kScaleBytes + kPanel * (f == WeightFormat::kQ8_0 ? kQuantBlock : kQuantBlock / 2);
}

at::Tensor PackQuantizedPanels(const at::Tensor& W, WeightFormat f) {
  TORCH_CHECK(W.dim() == 2 && IsQuantized(f), "PackQuantizedPanels: a matrix, q8_0 or q4_0");
  const int64_t np = (W.size(0) + kPanel - 1) / kPanel;
  const int64_t nb = (W.size(1) + kQuantBlock - 1) / kQuantBlock;
  at::Tensor panels =
      at::empty({np, nb, QuantBlockBytes(f)},
                at::TensorOptions().dtype(f == WeightFormat::kQ4_0 ? at::kByte : at::kChar));
  FillQuantizedPanels(W, f, panels);
  return panels;
}

void FillQuantizedPanels(const at::Tensor& W, WeightFormat f, at::Tensor& panels) {
  const int64_t out = W.size(0), in = W.size(1);
  const int64_t np = panels.size(0), nb = panels.size(1), bb = QuantBlockBytes(f);
  const bool q4 = f == WeightFormat::kQ4_0;
  TORCH_CHECK(np == (out + kPanel - 1) / kPanel && nb == (in + kQuantBlock - 1) / kQuantBlock &&
                  panels.size(2) == bb && panels.is_contiguous(),
              "FillQuantizedPanels: panels of another size");
  const at::Tensor Wf = W.detach().to(at::kFloat).contiguous();
  const float* w = Wf.data_ptr<float>();
  auto* base = static_cast<uint8_t*>(panels.data_ptr());
  at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
    float v[kQuantBlock];
    int32_t q[kQuantBlock];
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* blk = base + (p * nb + b) * bb;
        const int64_t k0 = b * kQuantBlock, valid = std::min(kQuantBlock, in - k0);
        for (int64_t c = 0; c < kPanel; ++c) {
          const int64_t row = p * kPanel + c;
          std::fill(v, v + kQuantBlock, 0.f);
          if (row < out) std::copy(w + row * in + k0, w + row * in + k0 + valid, v);
          float scale = 0.f;
          QuantizeWeightBlock(q4, v, &scale, q);
          if (q4) {
            PutBlockRow<true>(blk, c, scale, q);
          } else {
            PutBlockRow<false>(blk, c, scale, q);
          }
        }
      }
  });
}

at::Tensor DequantizePanels(const at::Tensor& panels, int64_t out, int64_t in) {
  const bool q4 = PanelsFormat(panels) == WeightFormat::kQ4_0;
  const int64_t nb = panels.size(1), bb = panels.size(2);
  TORCH_CHECK(out <= panels.size(0) * kPanel && in <= nb * kQuantBlock,
              "DequantizePanels: the prefix exceeds the packed matrix");
  at::Tensor W = at::empty({out, in});
  float* w = W.data_ptr<float>();
  const auto* base = static_cast<const uint8_t*>(panels.data_ptr());
  for (int64_t r = 0; r < out; ++r)
    for (int64_t k = 0; k < in; ++k) {
      const uint8_t* blk = base + ((r / kPanel) * nb + k / kQuantBlock) * bb;
      const int64_t c = r % kPanel, kb = k % kQuantBlock;
      const int32_t q = q4 ? WeightAt<true>(blk, c, kb) : WeightAt<false>(blk, c, kb);
      w[r * in + k] = ScaleAt(blk, c) * static_cast<float>(q);
    }
  return W;
}

}  // namespace amoeba
