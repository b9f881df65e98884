#include "model/torch_forward.h"

#include <cmath>
#include <limits>

#include "model/rope.h"

namespace amoeba {

const char* ProjName(Proj p) {
  static const char* names[] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                "gate_proj", "up_proj", "down_proj"};
  return names[static_cast<int>(p)];
}

at::Tensor RmsNormTorch(const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor var = xf.pow(2).mean(-1, /*keepdim=*/true);
  return w * (xf * at::rsqrt(var + eps)).to(x.scalar_type());
}

at::Tensor ApplyRopeTorch(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  // cos/sin [B, T, hd/2] → [B, 1, T, hd] as cat(freqs, freqs).
  at::Tensor c = at::cat({cos, cos}, -1).unsqueeze(1);
  at::Tensor s = at::cat({sin, sin}, -1).unsqueeze(1);
  const int64_t half = x.size(-1) / 2;
  at::Tensor x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
  at::Tensor rot = at::cat({-x2, x1}, -1);
  return x * c + rot * s;
}

at::Tensor TorchHidden(const Model& m, const at::Tensor& tokens, const TorchForwardOptions& opt) {
  const ModelConfig& c = m.config;
  const int64_t B = tokens.size(0), T = tokens.size(1), hd = c.head_dim;
  auto lin = [&](int layer, Proj p, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
    at::Tensor y =
        opt.linear
            ? opt.linear(layer, p, x, w, b)
            : at::linear(x, w.scalar_type() == x.scalar_type() ? w : w.to(x.scalar_type()), b);
    const LowRankDelta& d = m.layers[layer].deltas[static_cast<int>(p)];
    if (d.defined()) y = y + at::linear(at::linear(x, d.Down()), d.Up());
    return y;
  };

  // Positions: with a padding mask, each sequence counts only its real tokens (as HF does with
  // position_ids = cumsum(mask) - 1).
  at::Tensor pos;
  at::Tensor key_ok;  // [B, 1, 1, T] bool
  if (opt.attention_mask.defined()) {
    at::Tensor am = opt.attention_mask.to(at::kLong);
    pos = (am.cumsum(1) - 1).clamp_min(0);
    key_ok = am.to(at::kBool).view({B, 1, 1, T});
  } else {
    pos = at::arange(T, at::kLong).unsqueeze(0).expand({B, T});
  }
  at::Tensor inv = RopeInvFreq(c);
  at::Tensor freqs = pos.to(at::kFloat).unsqueeze(-1) * inv.view({1, 1, -1});  // [B, T, hd/2]
  at::Tensor cos = freqs.cos(), sin = freqs.sin();
  at::Tensor causal = at::ones({T, T}, at::kBool).triu(1);  // true = masked
  at::Tensor masked = causal.view({1, 1, T, T});
  if (key_ok.defined()) masked = masked.logical_or(key_ok.logical_not());

  at::Tensor x =
      m.embed.index_select(0, tokens.reshape({-1})).to(at::kFloat).view({B, T, c.hidden_size});
  for (size_t li = 0; li < m.layers.size(); ++li) {
    const LayerWeights& l = m.layers[li];
    const int layer = static_cast<int>(li);
    const int64_t hq = l.q_heads(hd), hkv = l.kv_heads(hd);
    const at::Tensor layer_input = x;
    at::Tensor h = RmsNormTorch(x, l.attn_norm, c.rms_norm_eps);
    if (hq > 0) {
      at::Tensor q = lin(layer, Proj::kQ, h, l.q, l.q_bias).view({B, T, hq, hd}).transpose(1, 2);
      at::Tensor k = lin(layer, Proj::kK, h, l.k, l.k_bias).view({B, T, hkv, hd}).transpose(1, 2);
      at::Tensor v = lin(layer, Proj::kV, h, l.v, l.v_bias).view({B, T, hkv, hd}).transpose(1, 2);
      q = ApplyRopeTorch(q, cos, sin);
      k = ApplyRopeTorch(k, cos, sin);
      if (hq != hkv) {
        k = k.repeat_interleave(hq / hkv, 1);
        v = v.repeat_interleave(hq / hkv, 1);
      }
      at::Tensor sc = at::matmul(q, k.transpose(2, 3)) / std::sqrt(static_cast<double>(hd));
      sc = sc.masked_fill(masked, -std::numeric_limits<float>::infinity());
      at::Tensor p = at::softmax(sc, -1);
      if (key_ok.defined()) p = at::nan_to_num(p, 0.0);  // fully masked (padding) query rows
      at::Tensor a = at::matmul(p, v).transpose(1, 2).reshape({B, T, hq * hd});
      x = x + lin(layer, Proj::kO, a, l.o, l.o_bias);
    } else if (l.o_bias.defined()) {
      x = x + l.o_bias;
    }
    h = RmsNormTorch(x, l.mlp_norm, c.rms_norm_eps);
    if (l.intermediate() > 0) {
      at::Tensor g = lin(layer, Proj::kGate, h, l.gate, l.gate_bias);
      at::Tensor u = lin(layer, Proj::kUp, h, l.up, l.up_bias);
      x = x + lin(layer, Proj::kDown, at::silu(g) * u, l.down, l.down_bias);
    } else if (l.down_bias.defined()) {
      x = x + l.down_bias;
    }
    if (opt.on_layer) opt.on_layer(layer, layer_input, x);
  }
  return RmsNormTorch(x, m.final_norm, c.rms_norm_eps);
}

at::Tensor TorchForward(const Model& m, const at::Tensor& tokens, const TorchForwardOptions& opt) {
  at::Tensor h = TorchHidden(m, tokens, opt);
  return at::linear(
      h, m.lm_head.scalar_type() == h.scalar_type() ? m.lm_head : m.lm_head.to(h.scalar_type()));
}

}  // namespace amoeba
