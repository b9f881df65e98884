#include "model/rope.h"

#include <cmath>

namespace amoeba {

at::Tensor RopeInvFreq(const ModelConfig& c) {
  const int64_t dim = c.head_dim;
  at::Tensor inv =
      1.0 / at::pow(c.rope_theta, at::arange(0, dim, 2, at::kLong).to(at::kFloat) / dim);
  const RopeScaling& s = c.rope_scaling;
  if (s.type == RopeScaling::Type::kLinear) {
    inv = inv / s.factor;
  } else if (s.type == RopeScaling::Type::kLlama3) {
    const double old_len = static_cast<double>(s.original_max_position_embeddings);
    const double low_wavelen = old_len / s.low_freq_factor;
    const double high_wavelen = old_len / s.high_freq_factor;
    at::Tensor wavelen = 2 * M_PI / inv;
    at::Tensor scaled = at::where(wavelen > low_wavelen, inv / s.factor, inv);
    at::Tensor smooth =
        (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
    at::Tensor smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled;
    at::Tensor medium = (wavelen >= high_wavelen).logical_and(wavelen <= low_wavelen);
    inv = at::where(medium, smoothed, scaled);
  }
  return inv.to(at::kFloat);
}

RopeTable::RopeTable(const ModelConfig& c, int64_t max_len) {
  at::Tensor inv = RopeInvFreq(c);
  at::Tensor pos = at::arange(max_len, at::kLong).to(at::kFloat);
  at::Tensor freqs = at::outer(pos, inv);  // fp32, as HF's matmul of inv_freq and positions
  cos = freqs.cos().contiguous();
  sin = freqs.sin().contiguous();
}

void ApplyRope(float* x, int64_t n_heads, int64_t head_dim, const RopeTable& t, int64_t pos) {
  const int64_t half = head_dim / 2;
  const float* c = t.cos.data_ptr<float>() + pos * half;
  const float* s = t.sin.data_ptr<float>() + pos * half;
  for (int64_t h = 0; h < n_heads; ++h) {
    float* v = x + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = v[i], x2 = v[i + half];
      v[i] = x1 * c[i] - x2 * s[i];
      v[i + half] = x2 * c[i] + x1 * s[i];
    }
  }
}

}  // namespace amoeba
