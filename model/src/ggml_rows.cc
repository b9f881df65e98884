// GGML's own Q8_0 / Q4_0 row layout (GGUF tensors), written and read with the panels' rules.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "quantized_block.h"
#include "model/quantized_panels.h"

namespace amoeba {
using namespace quant;

void QuantizeRowGgml(WeightFormat f, const float* x, int64_t n, uint8_t* out) {
  const bool q4 = f == WeightFormat::kQ4_0;
  int32_t q[kQuantBlock];
  for (int64_t b = 0; b < n / kQuantBlock; ++b) {
    float scale = 0.f;
    QuantizeWeightBlock(q4, x + b * kQuantBlock, &scale, q);
    const at::Half h(scale);
    std::memcpy(out, &h, sizeof(h));
    out += sizeof(h);
    if (q4) {
      for (int64_t k = 0; k < kQuantBlock / 2; ++k)
        out[k] = static_cast<uint8_t>((q[k] + 8) | ((q[k + 16] + 8) << 4));
      out += kQuantBlock / 2;
    } else {
      for (int64_t k = 0; k < kQuantBlock; ++k)
        out[k] = static_cast<uint8_t>(static_cast<int8_t>(q[k]));
      out += kQuantBlock;
    }
  }
}

void DequantizeRowGgml(WeightFormat f, const uint8_t* in, int64_t n, float* out) {
  const bool q4 = f == WeightFormat::kQ4_0;
  for (int64_t b = 0; b < n / kQuantBlock; ++b) {
    at::Half h;
    std::memcpy(&h, in, sizeof(h));
    const float d = static_cast<float>(h);
    in += sizeof(h);
    float* o = out + b * kQuantBlock;
    if (q4) {
      for (int64_t k = 0; k < kQuantBlock / 2; ++k) {
        o[k] = d * static_cast<float>((in[k] & 0x0F) - 8);
        o[k + 16] = d * static_cast<float>((in[k] >> 4) - 8);
      }
      in += kQuantBlock / 2;
    } else {
      for (int64_t k = 0; k < kQuantBlock; ++k) o[k] = d * static_cast<int8_t>(in[k]);
      in += kQuantBlock;
    }
  }
}

}  // namespace amoeba
