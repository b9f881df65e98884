#include "subnet/width_importance.h"

#include <algorithm>
#include <numeric>
#include <tuple>

#include "model/progress.h"
#include "model/torch_forward.h"
#include "subnet/metrics.h"

namespace amoeba {

ActivationStats CollectActivationStats(const Model& m, const at::Tensor& windows, int64_t batch,
                                       Progress* progress) {
  at::InferenceMode guard;
  const size_t L = m.layers.size();
  std::vector<at::Tensor> o_sum(L), o_sq(L), o_outer(L), d_sum(L), d_sq(L);
  const int64_t group_width = m.config.group_size() * m.config.head_dim;
  int64_t tokens = 0;
  TorchForwardOptions opt;
  opt.linear = [&](int layer, Proj p, const at::Tensor& x, const at::Tensor& w,
                   const at::Tensor& b) {
    if (p == Proj::kO || p == Proj::kDown) {
      at::Tensor xd = x.reshape({-1, x.size(-1)}).to(at::kDouble);  // sums in fp64
      at::Tensor s = xd.sum(0), q = xd.pow(2).sum(0);
      auto& S = p == Proj::kO ? o_sum[layer] : d_sum[layer];
      auto& Q = p == Proj::kO ? o_sq[layer] : d_sq[layer];
      S = S.defined() ? S + s : s;
      Q = Q.defined() ? Q + q : q;
      if (p == Proj::kO && xd.size(1) > 0) {
        // Per KV group: the sum of x_g x_gᵀ over tokens, [groups, Gd, Gd].
        at::Tensor xg = xd.view({xd.size(0), -1, group_width}).transpose(0, 1);
        at::Tensor outer = at::bmm(xg.transpose(1, 2), xg);
        o_outer[layer] = o_outer[layer].defined() ? o_outer[layer] + outer : outer;
      }
    }
    return at::linear(x, w, b);
  };
  for (int64_t b = 0; b < windows.size(0); b += batch) {
    at::Tensor w = windows.narrow(0, b, std::min(batch, windows.size(0) - b));
    TorchHidden(m, w, opt);
    tokens += w.numel();
    if (progress) progress->Advance(w.size(0));
  }
  ActivationStats st;
  st.tokens = tokens;
  for (size_t l = 0; l < L; ++l) {
    const auto& layer = m.layers[l];
    auto finish = [&](const at::Tensor& s, const at::Tensor& q, int64_t n, at::Tensor* mean,
                      at::Tensor* var) {
      if (!s.defined()) {  // zero-width layer
        *mean = at::zeros({n});
        *var = at::zeros({n});
        return;
      }
      at::Tensor mu = s / static_cast<double>(tokens);
      *mean = mu.to(at::kFloat);
      *var = (q / static_cast<double>(tokens) - mu.pow(2)).clamp_min(0).to(at::kFloat);
    };
    st.o_mean.emplace_back();
    st.o_var.emplace_back();
    st.down_mean.emplace_back();
    st.down_var.emplace_back();
    finish(o_sum[l], o_sq[l], layer.o.size(1), &st.o_mean.back(), &st.o_var.back());
    finish(d_sum[l], d_sq[l], layer.down.size(1), &st.down_mean.back(), &st.down_var.back());
    const int64_t groups = layer.o.size(1) / group_width;
    if (!o_outer[l].defined()) {
      st.o_cov.push_back(at::zeros({groups, group_width, group_width}));
    } else {
      at::Tensor mu = (o_sum[l] / static_cast<double>(tokens)).view({groups, group_width});
      at::Tensor cov = o_outer[l] / static_cast<double>(tokens) - mu.unsqueeze(2) * mu.unsqueeze(1);
      st.o_cov.push_back(cov.to(at::kFloat));
    }
  }
  return st;
}

absl::StatusOr<WidthScoring> ParseWidthScoring(std::string_view name) {
  if (name == "flap") return WidthScoring::kFlap;
  if (name == "magnitude") return WidthScoring::kMagnitude;
  if (name == "removal") return WidthScoring::kRemoval;
  return absl::InvalidArgumentError("--width-scores: must be flap, magnitude or removal, not " +
                                    std::string(name));
}

namespace {
at::Tensor Standardize(const at::Tensor& x) {
  if (x.numel() < 2) return at::zeros_like(x);
  return (x - x.mean()) / (x.std(/*unbiased=*/false) + 1e-12);
}
}  // namespace

WidthScores RemovalErrors(const Model& m, const ActivationStats& s) {
  const int64_t gw = m.config.group_size() * m.config.head_dim;
  WidthScores out;
  for (size_t l = 0; l < m.layers.size(); ++l) {
    const auto& layer = m.layers[l];
    const int64_t groups = layer.o.size(1) / gw;
    if (groups == 0) {
      out.group.push_back(at::zeros({0}));
    } else {
      // tr(W_g Σ_g W_gᵀ) = Σ_ij (W_g Σ_g)_ij (W_g)_ij, W_g = o[:, group g's columns].
      at::Tensor w = layer.o.to(at::kDouble).view({layer.o.size(0), groups, gw}).transpose(0, 1);
      at::Tensor ws = at::bmm(w, s.o_cov[l].to(at::kDouble));  // [groups, hidden, gw]
      out.group.push_back((ws * w).sum({1, 2}).clamp_min(0).to(at::kFloat));
    }
    at::Tensor cn = layer.down.to(at::kDouble).pow(2).sum(0);
    out.channel.push_back((cn * s.down_var[l].to(at::kDouble)).to(at::kFloat));
  }
  return out;
}

at::Tensor KvGroupChannels(const ModelConfig& c, const at::Tensor& groups) {
  const int64_t gw = c.group_size() * c.head_dim;
  return (groups.unsqueeze(1) * gw + at::arange(gw, at::kLong)).reshape({-1});
}

double NllWithUnitsRemoved(const Model& m, const ActivationStats& s, const at::Tensor& windows,
                           int64_t batch, int layer, const at::Tensor& o_channels,
                           const at::Tensor& down_channels) {
  UnitRemoval r;
  r.o_channels.resize(layer + 1);
  r.down_channels.resize(layer + 1);
  r.o_channels[layer] = o_channels;
  r.down_channels[layer] = down_channels;
  return NllWithUnitsRemoved(m, s, windows, batch, r);
}

double NllWithUnitsRemoved(const Model& m, const ActivationStats& s, const at::Tensor& windows,
                           int64_t batch, const UnitRemoval& removal) {
  TorchForwardOptions opt;
  opt.linear = [&](int l, Proj p, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
    if (p != Proj::kO && p != Proj::kDown) return at::linear(x, w, b);
    const auto& per_layer = p == Proj::kO ? removal.o_channels : removal.down_channels;
    if (static_cast<size_t>(l) >= per_layer.size()) return at::linear(x, w, b);
    const at::Tensor& idx = per_layer[l];
    if (!idx.defined() || idx.numel() == 0) return at::linear(x, w, b);
    const at::Tensor& mean = p == Proj::kO ? s.o_mean[l] : s.down_mean[l];
    // Removed inputs read their calibration means: the unit gone, its compensation bias added.
    at::Tensor xr = x.clone();
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = idx.numel();
    xr.index_copy_(-1, idx, mean.index_select(0, idx).to(x.scalar_type()).expand(sizes));
    return at::linear(xr, w, b);
  };
  return MeanNll(m, windows, batch, opt);
}

LayerSensitivity MeasureSensitivity(const Model& m, const ActivationStats& s,
                                    const at::Tensor& windows, int64_t batch, Progress* progress) {
  at::InferenceMode guard;
  const WidthScores err = RemovalErrors(m, s);
  LayerSensitivity out;
  out.base_nll = MeanNll(m, windows, batch);
  if (progress) progress->Advance();
  // The quarter of the units with the smallest errors (at least one): what pruning removes first.
  auto probe = [](const at::Tensor& e) {
    const int64_t n = std::max<int64_t>(1, e.numel() / 4);
    return std::get<1>(e.sort(/*stable=*/true, 0, /*descending=*/false)).narrow(0, 0, n);
  };
  auto ratio = [&](double nll, double error) {
    // A removal that does not raise the loss (or removes nothing that varies) counts as free.
    return error > 0 ? std::max(0.0, nll - out.base_nll) / error : 0.0;
  };
  for (int l = 0; l < static_cast<int>(m.layers.size()); ++l) {
    const at::Tensor& ge = err.group[l];
    double a = 0;
    if (ge.numel() > 1) {
      at::Tensor units = probe(ge);
      a = ratio(NllWithUnitsRemoved(m, s, windows, batch, l, KvGroupChannels(m.config, units), {}),
                ge.index_select(0, units).sum().item<double>());
    }
    out.attention.push_back(a);
    if (progress) progress->Advance();
    const at::Tensor& ce = err.channel[l];
    double c = 0;
    if (ce.numel() > 1) {
      at::Tensor units = probe(ce);
      c = ratio(NllWithUnitsRemoved(m, s, windows, batch, l, {}, units),
                ce.index_select(0, units).sum().item<double>());
    }
    out.mlp.push_back(c);
    if (progress) progress->Advance();
  }
  auto floor_of = [](std::vector<double>& v) {
    std::vector<double> measured;
    for (double x : v)
      if (x > 0) measured.push_back(x);
    double floor = 1;
    if (!measured.empty()) {
      std::nth_element(measured.begin(), measured.begin() + measured.size() / 2, measured.end());
      floor = 0.1 * measured[measured.size() / 2];
    }
    for (double& x : v) x = std::max(x, floor);
    return floor;
  };
  out.attention_floor = floor_of(out.attention);
  out.mlp_floor = floor_of(out.mlp);
  return out;
}

WidthScores ComputeWidthScores(const Model& m, const ActivationStats& s, WidthScoring scoring,
                               const LayerSensitivity* sensitivity) {
  if (scoring == WidthScoring::kRemoval) {
    WidthScores e = RemovalErrors(m, s);
    const double gp = static_cast<double>(GroupParams(m.config));
    const double cp = static_cast<double>(ChannelParams(m.config));
    for (size_t l = 0; l < m.layers.size(); ++l) {
      const double la = sensitivity ? sensitivity->attention[l] : 1.0;
      const double lm = sensitivity ? sensitivity->mlp[l] : 1.0;
      e.group[l] = e.group[l] * (la / gp);
      e.channel[l] = e.channel[l] * (lm / cp);
    }
    return e;
  }
  const int64_t hd = m.config.head_dim, G = m.config.group_size();
  const bool flap = scoring == WidthScoring::kFlap;
  WidthScores out;
  for (size_t l = 0; l < m.layers.size(); ++l) {
    const auto& layer = m.layers[l];
    // Attention: S_j = F_j ||W_o[:, j]||², squared, standardised, averaged per KV group.
    at::Tensor so = layer.o.to(at::kDouble).pow(2).sum(0);
    if (flap) so = so * s.o_var[l].to(at::kDouble);
    at::Tensor zo = Standardize(so.pow(2));
    const int64_t groups = layer.kv_heads(hd);
    out.group.push_back(groups ? zo.view({groups, G * hd}).mean(1).to(at::kFloat) : at::zeros({0}));
    // MLP: S_j = F_j ||W_down[:, j]||², standardised.
    at::Tensor sd = layer.down.to(at::kDouble).pow(2).sum(0);
    if (flap) sd = sd * s.down_var[l].to(at::kDouble);
    out.channel.push_back(Standardize(sd).to(at::kFloat));
  }
  return out;
}

int64_t GroupParams(const ModelConfig& c) {
  const int64_t G = c.group_size();
  return c.hidden_size * c.head_dim * (2 * G + 2);  // q (G heads), k, v rows + o columns
}
int64_t ChannelParams(const ModelConfig& c) {
  return 3 * c.hidden_size;
}

int64_t WidthParams(const Model& m) {
  int64_t n = 0;
  for (const auto& l : m.layers) {
    n += l.kv_heads(m.config.head_dim) * GroupParams(m.config) +
         l.intermediate() * ChannelParams(m.config);
  }
  return n;
}

WidthAllocation AllocateGlobal(const Model& m, const WidthScores& sc, double ratio) {
  struct Unit {
    float score;
    int layer;
    int64_t index;
    bool attention;
  };
  std::vector<Unit> units;
  const size_t L = m.layers.size();
  for (size_t l = 0; l < L; ++l) {
    auto g = sc.group[l].contiguous();
    for (int64_t i = 0; i < g.numel(); ++i)
      units.push_back({g.data_ptr<float>()[i], static_cast<int>(l), i, true});
    auto c = sc.channel[l].contiguous();
    for (int64_t i = 0; i < c.numel(); ++i)
      units.push_back({c.data_ptr<float>()[i], static_cast<int>(l), i, false});
  }
  // Best first; ties by (layer, index) so that within a layer the kept set stays a prefix.
  std::stable_sort(units.begin(), units.end(), [](const Unit& a, const Unit& b) {
    if (a.score != b.score) return a.score > b.score;
    return std::tie(a.layer, a.attention, a.index) < std::tie(b.layer, b.attention, b.index);
  });
  // Every layer keeps its best head group and MLP channel: a layer with none would be no valid
  // LLaMA layer (and the loader rejects it).
  WidthAllocation a;
  a.kv_groups.assign(L, 1);
  a.channels.assign(L, 1);
  const double target = ratio * static_cast<double>(WidthParams(m));
  const int64_t gp = GroupParams(m.config), cp = ChannelParams(m.config);
  a.params = static_cast<int64_t>(L) * (gp + cp);
  for (const Unit& u : units) {
    if (static_cast<double>(a.params) >= target) break;
    if (u.index == 0) continue;  // already kept
    if (u.attention) {
      a.kv_groups[u.layer] = std::max(a.kv_groups[u.layer], u.index + 1);
      a.params += gp;
    } else {
      a.channels[u.layer] = std::max(a.channels[u.layer], u.index + 1);
      a.params += cp;
    }
  }
  return a;
}

WidthAllocation AllocateUniform(const Model& m, double ratio) {
  WidthAllocation a;
  const int64_t hd = m.config.head_dim;
  for (const auto& l : m.layers) {
    a.kv_groups.push_back(std::max<int64_t>(1, std::llround(ratio * l.kv_heads(hd))));
    a.channels.push_back(std::max<int64_t>(1, std::llround(ratio * l.intermediate())));
    a.params +=
        a.kv_groups.back() * GroupParams(m.config) + a.channels.back() * ChannelParams(m.config);
  }
  return a;
}

void PermuteByScore(Model& m, WidthScores& scores, ActivationStats& stats) {
  const int64_t hd = m.config.head_dim;
  for (size_t l = 0; l < m.layers.size(); ++l) {
    LayerWeights& w = m.layers[l];
    const int64_t groups = w.kv_heads(hd);
    at::Tensor gorder =
        std::get<1>(scores.group[l].sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
    at::Tensor corder = std::get<1>(scores.channel[l].sort(true, 0, true));
    // Row indices: KV group g owns k/v rows [g*hd, (g+1)*hd) and q rows [g*G*hd, (g+1)*G*hd).
    at::Tensor kv_rows = (gorder.unsqueeze(1) * hd + at::arange(hd, at::kLong)).reshape({-1});
    at::Tensor q_rows = KvGroupChannels(m.config, gorder);
    if (groups > 0) {
      w.q = w.q.index_select(0, q_rows).contiguous();
      w.k = w.k.index_select(0, kv_rows).contiguous();
      w.v = w.v.index_select(0, kv_rows).contiguous();
      w.o = w.o.index_select(1, q_rows).contiguous();
      if (w.q_bias.defined()) w.q_bias = w.q_bias.index_select(0, q_rows);
      if (w.k_bias.defined()) w.k_bias = w.k_bias.index_select(0, kv_rows);
      if (w.v_bias.defined()) w.v_bias = w.v_bias.index_select(0, kv_rows);
      stats.o_mean[l] = stats.o_mean[l].index_select(0, q_rows);
      stats.o_var[l] = stats.o_var[l].index_select(0, q_rows);
      if (l < stats.o_cov.size()) stats.o_cov[l] = stats.o_cov[l].index_select(0, gorder);
      scores.group[l] = scores.group[l].index_select(0, gorder);
    }
    w.gate = w.gate.index_select(0, corder).contiguous();
    w.up = w.up.index_select(0, corder).contiguous();
    w.down = w.down.index_select(1, corder).contiguous();
    for (at::Tensor& panels : w.panels) panels.reset();  // packed in the old order
    if (w.gate_bias.defined()) w.gate_bias = w.gate_bias.index_select(0, corder);
    if (w.up_bias.defined()) w.up_bias = w.up_bias.index_select(0, corder);
    stats.down_mean[l] = stats.down_mean[l].index_select(0, corder);
    stats.down_var[l] = stats.down_var[l].index_select(0, corder);
    scores.channel[l] = scores.channel[l].index_select(0, corder);
  }
}

at::Tensor CompensationBias(const at::Tensor& weight, const at::Tensor& mean, int64_t kept) {
  const int64_t in = weight.size(1);
  if (kept >= in) return at::zeros({weight.size(0)});
  return at::mv(weight.narrow(1, kept, in - kept), mean.narrow(0, kept, in - kept));
}

}  // namespace amoeba
