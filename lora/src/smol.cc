#include "lora/smol.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "model/safetensors.h"
#include "model/status_macros.h"

namespace amoeba {
using nlohmann::json;

json SmolConfig::ToJson() const {
  json t = json::array();
  for (int p = 0; p < kNumProj; ++p)
    if (targets[p]) t.push_back(ProjName(static_cast<Proj>(p)));
  return {{"experts", experts}, {"rank", rank}, {"alpha", alpha}, {"router_hidden", router_hidden},
          {"top_k", top_k},     {"targets", t}};
}

SmolConfig SmolConfig::FromJson(const json& j) {
  SmolConfig c;
  c.experts = j.value("experts", c.experts);
  c.rank = j.value("rank", c.rank);
  c.alpha = j.value("alpha", c.alpha);
  c.router_hidden = j.value("router_hidden", c.router_hidden);
  c.top_k = j.value("top_k", c.top_k);
  if (j.contains("targets")) {
    c.targets.fill(false);
    for (const auto& n : j["targets"])
      for (int p = 0; p < kNumProj; ++p)
        if (n.get<std::string>() == ProjName(static_cast<Proj>(p))) c.targets[p] = true;
  }
  return c;
}

namespace {
// nn.Linear's default init (Kaiming-uniform with a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
at::Tensor Uniform(std::vector<int64_t> shape, int64_t fan_in) {
  const double b = 1.0 / std::sqrt(static_cast<double>(fan_in));
  return at::rand(shape) * (2 * b) - b;
}
}  // namespace

Smol::Smol(const Model& base, int64_t num_widths, SmolConfig config, uint64_t seed)
    : cfg_(config), num_layers_(base.config.num_hidden_layers), num_widths_(num_widths) {
  if (cfg_.rank <= 0)
    cfg_.rank = std::max<int64_t>(4, std::min<int64_t>(64, base.config.hidden_size / 8));
  cfg_.top_k = std::min(cfg_.top_k, cfg_.experts);
  at::manual_seed(seed);
  const int64_t E = cfg_.experts, r = cfg_.rank;
  adapters_.resize(num_layers_);
  for (int64_t l = 0; l < num_layers_; ++l) {
    for (int p = 0; p < kNumProj; ++p) {
      if (!cfg_.targets[p]) continue;
      const at::Tensor& W = base.layers[l].proj(static_cast<Proj>(p));
      const int64_t out = W.size(0), in = W.size(1);
      // Kaiming-uniform A (a = sqrt(5), as PEFT's LoRA): bound = 1/sqrt(in).
      adapters_[l][p] = {Uniform({E, r, in}, in), at::zeros({E, out, r})};
    }
  }
  const int64_t f = num_layers_ + num_widths_, H = cfg_.router_hidden;
  r1_w = Uniform({H, f}, f);
  r1_b = Uniform({H}, f);
  r2_w = Uniform({E, H}, H);
  r2_b = Uniform({E}, H);
  noise_w = Uniform({E, f}, f);
  noise_b = Uniform({E}, f);
}

at::Tensor Smol::ShapeFeature(const std::vector<int>& active, int64_t width_index) const {
  at::Tensor phi = at::zeros({num_layers_ + num_widths_});
  auto a = phi.accessor<float, 1>();
  for (int l : active) a[l] = 1.f;
  a[num_layers_ + width_index] = 1.f;
  return phi;
}

at::Tensor Smol::Gate(const at::Tensor& phi, bool training) const {
  at::Tensor logits = at::linear(at::linear(phi, r1_w, r1_b), r2_w, r2_b);
  if (training)
    logits = logits + at::randn_like(logits) * at::softplus(at::linear(phi, noise_w, noise_b));
  auto [top, idx] = logits.topk(cfg_.top_k);
  return at::zeros_like(logits).scatter(0, idx, at::softmax(top, 0));
}

const Smol::Adapter* Smol::Find(int layer, Proj p) const {
  const Adapter& a = adapters_[layer][static_cast<int>(p)];
  return a.A.defined() ? &a : nullptr;
}

LinearHook Smol::Hook(const at::Tensor& gate, const std::vector<int>& layer_ids) const {
  const double s = scale();
  return [this, gate, layer_ids, s](int layer, Proj p, const at::Tensor& x, const at::Tensor& w,
                                    const at::Tensor& b) -> at::Tensor {
    at::Tensor y = at::linear(x, w, b);
    const Adapter* a = Find(layer_ids.at(layer), p);
    if (!a) return y;
    const int64_t out = w.size(0), in = w.size(1);
    // Mix the experts' weights (not outputs), then slice to the subnet's prefix widths.
    at::Tensor A = at::tensordot(gate, a->A.narrow(2, 0, in), {0}, {0});   // [r, in]
    at::Tensor B = at::tensordot(gate, a->B.narrow(1, 0, out), {0}, {0});  // [out, r]
    return y + s * at::linear(at::linear(x, A), B);
  };
}

Model Smol::Merge(const Model& subnet, const at::Tensor& gate, const std::vector<int>& layer_ids,
                  const std::function<void()>& between_matrices) const {
  Model m = AttachUnmerged(subnet, gate, layer_ids);
  for (auto& l : m.layers) {
    for (int p = 0; p < kNumProj; ++p) {
      LowRankDelta& d = l.deltas[p];
      if (!d.defined()) continue;
      at::Tensor& W = l.proj(static_cast<Proj>(p));
      // A new contiguous copy; the supernet is untouched.
      W = at::addmm(W.to(at::kFloat), d.Up(), d.Down());
      d = {};
      l.panels[p].reset();  // packed from the unmerged values: repack (PackWeights) to decode fast
      if (between_matrices) between_matrices();
    }
  }
  return m;
}

Model Smol::AttachUnmerged(const Model& subnet, const at::Tensor& gate,
                           const std::vector<int>& layer_ids) const {
  Model m = subnet;
  // Only the experts the gate selects (top-k of E) contribute; their factors stay views of the
  // adapter tensors, so a lane costs no adapter memory of its own.
  std::vector<int64_t> experts;
  std::vector<float> weights;
  const at::Tensor g = gate.to(at::kFloat).contiguous();
  for (int64_t e = 0; e < g.numel(); ++e) {
    const float w = g.data_ptr<float>()[e];
    if (w == 0.f) continue;
    experts.push_back(e);
    weights.push_back(w);
  }
  if (experts.empty()) return m;
  const float s = static_cast<float>(scale());
  std::vector<float> down_weights;
  for (float w : weights) down_weights.push_back(w * s);
  for (size_t i = 0; i < m.layers.size(); ++i) {
    for (int p = 0; p < kNumProj; ++p) {
      const Adapter* a = Find(layer_ids.at(i), static_cast<Proj>(p));
      if (!a) continue;
      const at::Tensor& W = m.layers[i].proj(static_cast<Proj>(p));
      const int64_t out = W.size(0), in = W.size(1);
      if (out == 0 || in == 0) continue;
      LowRankDelta& d = m.layers[i].deltas[p];
      for (int64_t e : experts) {
        d.downs.push_back(a->A[e].narrow(1, 0, in));  // [r, in], row stride = full in
        d.ups.push_back(a->B[e].narrow(0, 0, out));   // [out, r], contiguous prefix
      }
      d.down_weights = down_weights;
      d.up_weights = weights;
    }
  }
  return m;
}

std::vector<std::pair<std::string, at::Tensor>> Smol::NamedParameters() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (int64_t l = 0; l < num_layers_; ++l) {
    for (int p = 0; p < kNumProj; ++p) {
      const Adapter& a = adapters_[l][p];
      if (!a.A.defined()) continue;
      const std::string n = absl::StrCat("layers.", l, ".", ProjName(static_cast<Proj>(p)));
      out.emplace_back(n + ".lora_A", a.A);
      out.emplace_back(n + ".lora_B", a.B);
    }
  }
  out.emplace_back("router.0.weight", r1_w);
  out.emplace_back("router.0.bias", r1_b);
  out.emplace_back("router.1.weight", r2_w);
  out.emplace_back("router.1.bias", r2_b);
  out.emplace_back("router.noise.weight", noise_w);
  out.emplace_back("router.noise.bias", noise_b);
  return out;
}

void Smol::SetRequiresGrad(bool on) {
  for (auto& [n, t] : NamedParameters()) const_cast<at::Tensor&>(t).requires_grad_(on);
}

absl::Status Smol::Save(const std::string& path) const {
  json meta = cfg_.ToJson();
  meta["num_layers"] = num_layers_;
  meta["num_widths"] = num_widths_;
  return WriteSafetensors(path, NamedParameters(),
                          {{"format", "amoeba-smol"}, {"config", meta.dump()}});
}

absl::StatusOr<Smol> Smol::Load(const std::string& path, const Model& base) {
  ASSIGN_OR_RETURN(auto f, SafetensorsFile::Open(path));
  auto it = f->metadata().find("config");
  if (it == f->metadata().end())
    return absl::DataLossError(path + ": no SMoL config in the metadata");
  json meta = json::parse(it->second, nullptr, false);
  if (meta.is_discarded()) return absl::DataLossError(path + ": bad SMoL config");
  Smol s;
  try {
    s.cfg_ = SmolConfig::FromJson(meta);
    s.num_layers_ = meta.value("num_layers", int64_t{0});
    s.num_widths_ = meta.value("num_widths", int64_t{0});
  } catch (const json::exception& e) {
    return absl::DataLossError(absl::StrCat(path, ": bad SMoL config: ", e.what()));
  }
  const SmolConfig& c = s.cfg_;
  if (c.experts < 1 || c.rank < 1 || c.router_hidden < 1 || c.top_k < 1 || c.top_k > c.experts ||
      !(c.alpha > 0 && std::isfinite(c.alpha)) || s.num_widths_ < 1)
    return absl::DataLossError(absl::StrCat(
        path,
        ": bad SMoL config (needs experts, rank, router_hidden, num_widths >= 1, top_k in "
        "[1, experts], alpha > 0)"));
  if (s.num_layers_ != base.config.num_hidden_layers)
    return absl::DataLossError(absl::StrCat(path, ": adapters for ", s.num_layers_,
                                            " layers, model has ", base.config.num_hidden_layers));
  s.adapters_.resize(s.num_layers_);
  auto get = [&](const std::string& n, std::vector<int64_t> shape) -> absl::StatusOr<at::Tensor> {
    ASSIGN_OR_RETURN(at::Tensor t, f->GetF32(n));
    if (t.sizes().vec() != shape)
      return absl::DataLossError(absl::StrCat(path, ": tensor '", n, "' has the wrong shape"));
    if (!at::isfinite(t).all().item<bool>())
      return absl::DataLossError(absl::StrCat(path, ": tensor '", n, "' holds NaN or Inf"));
    return t.clone();  // trainable: own the memory
  };
  const int64_t E = s.cfg_.experts, r = s.cfg_.rank, F = s.num_layers_ + s.num_widths_,
                H = s.cfg_.router_hidden;
  for (int64_t l = 0; l < s.num_layers_; ++l) {
    for (int p = 0; p < kNumProj; ++p) {
      if (!s.cfg_.targets[p]) continue;
      const at::Tensor& W = base.layers[l].proj(static_cast<Proj>(p));
      const std::string n = absl::StrCat("layers.", l, ".", ProjName(static_cast<Proj>(p)));
      ASSIGN_OR_RETURN(s.adapters_[l][p].A, get(n + ".lora_A", {E, r, W.size(1)}));
      ASSIGN_OR_RETURN(s.adapters_[l][p].B, get(n + ".lora_B", {E, W.size(0), r}));
    }
  }
  ASSIGN_OR_RETURN(s.r1_w, get("router.0.weight", {H, F}));
  ASSIGN_OR_RETURN(s.r1_b, get("router.0.bias", {H}));
  ASSIGN_OR_RETURN(s.r2_w, get("router.1.weight", {E, H}));
  ASSIGN_OR_RETURN(s.r2_b, get("router.1.bias", {E}));
  ASSIGN_OR_RETURN(s.noise_w, get("router.noise.weight", {E, F}));
  ASSIGN_OR_RETURN(s.noise_b, get("router.noise.bias", {E}));
  return s;
}

}  // namespace amoeba
