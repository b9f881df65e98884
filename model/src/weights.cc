#include "model/weights.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "model/file_util.h"
#include "model/packed_linear.h"
#include "model/safetensors.h"
#include "model/status_macros.h"

namespace amoeba {
namespace fs = std::filesystem;

Model Model::WithLayers(const std::vector<int>& layer_ids) const {
  Model m;
  m.config = config;
  m.embed = embed;
  m.final_norm = final_norm;
  m.lm_head = lm_head;
  m.head_panels = head_panels;
  for (int id : layer_ids) m.layers.push_back(layers.at(id));
  m.SyncConfigWithWeights();
  return m;
}

namespace {
at::Tensor WeightedSum(const std::vector<at::Tensor>& ts, const std::vector<float>& ws) {
  at::Tensor out = ts.at(0) * ws.at(0);
  for (size_t i = 1; i < ts.size(); ++i) out.add_(ts[i], ws.at(i));
  return out;
}
}  // namespace

at::Tensor LowRankDelta::Down() const {
  return WeightedSum(downs, down_weights);
}

at::Tensor LowRankDelta::Up() const {
  return WeightedSum(ups, up_weights);
}

void Model::SyncConfigWithWeights() {
  const int64_t hd = config.head_dim;
  config.num_hidden_layers = static_cast<int64_t>(layers.size());
  std::vector<int64_t> kv, inter;
  bool uniform = true;
  for (const auto& l : layers) {
    kv.push_back(l.kv_heads(hd));
    inter.push_back(l.intermediate());
    uniform = uniform && kv.back() == config.num_key_value_heads &&
              inter.back() == config.intermediate_size;
  }
  config.layer_kv_heads = uniform ? std::vector<int64_t>{} : kv;
  config.layer_intermediate = uniform ? std::vector<int64_t>{} : inter;
}

const at::Tensor& LayerWeights::proj(Proj p) const {
  switch (p) {
    case Proj::kQ:
      return q;
    case Proj::kK:
      return k;
    case Proj::kV:
      return v;
    case Proj::kO:
      return o;
    case Proj::kGate:
      return gate;
    case Proj::kUp:
      return up;
    default:
      return down;
  }
}

const at::Tensor& LayerWeights::bias(Proj p) const {
  const std::array<const at::Tensor*, kNumProj> biases = {&q_bias,    &k_bias,  &v_bias,   &o_bias,
                                                          &gate_bias, &up_bias, &down_bias};
  return *biases[static_cast<int>(p)];
}

at::Tensor& LayerWeights::proj(Proj p) {
  return const_cast<at::Tensor&>(static_cast<const LayerWeights&>(*this).proj(p));
}

int64_t Model::ProjectionBytes() const {
  int64_t n = 0;
  for (const auto& l : layers)
    for (int p = 0; p < kNumProj; ++p) {
      const at::Tensor& t = l.proj(static_cast<Proj>(p));
      if (!t.is_meta()) n += t.numel() * static_cast<int64_t>(t.element_size());
      const at::Tensor& panels = l.panels[p];
      if (panels.defined()) n += panels.numel() * static_cast<int64_t>(panels.element_size());
    }
  return n;
}

int64_t Model::KvBytesPerPosition(int64_t kv_element_bytes) const {
  int64_t n = 0;
  for (const auto& l : layers) n += 2 * l.k.size(0) * kv_element_bytes;
  return n;
}

int64_t Model::DecodeWeightBytes() const {
  // A projection is read from its panels when packed (maybe another format), else row-major.
  auto read = [](const at::Tensor& w, const at::Tensor& panels) -> int64_t {
    if (!panels.defined()) return w.numel() * static_cast<int64_t>(w.element_size());
    return static_cast<int64_t>(static_cast<double>(w.numel()) *
                                BytesPerWeight(PanelsFormat(panels)));
  };
  int64_t n = read(lm_head, head_panels) + final_norm.numel() * final_norm.element_size();
  for (const auto& l : layers) {
    n += (l.attn_norm.numel() + l.mlp_norm.numel()) * l.attn_norm.element_size();
    for (int p = 0; p < kNumProj; ++p) n += read(l.proj(static_cast<Proj>(p)), l.panels[p]);
  }
  return n;
}

int64_t Model::DecodeMultiplyAdds() const {
  int64_t n = lm_head.numel();
  for (const auto& l : layers)
    for (int p = 0; p < kNumProj; ++p) n += l.proj(static_cast<Proj>(p)).numel();
  return n;
}

Model ConvertWeights(const Model& m, at::ScalarType dtype) {
  Model out = m;
  auto conv = [&](at::Tensor& t) {
    if (t.defined()) t = t.to(dtype).contiguous();
  };
  conv(out.embed);
  out.lm_head = m.config.tie_word_embeddings ? out.embed : out.lm_head;
  if (!m.config.tie_word_embeddings) conv(out.lm_head);
  conv(out.head_panels);
  for (auto& l : out.layers) {
    for (at::Tensor* t : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down}) conv(*t);
    for (at::Tensor& panels : l.panels) conv(panels);
  }
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> NamedWeights(const Model& m) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  out.emplace_back("model.embed_tokens.weight", m.embed);
  for (size_t i = 0; i < m.layers.size(); ++i) {
    const auto& l = m.layers[i];
    const std::string p = absl::StrCat("model.layers.", i, ".");
    out.emplace_back(p + "input_layernorm.weight", l.attn_norm);
    out.emplace_back(p + "self_attn.q_proj.weight", l.q);
    out.emplace_back(p + "self_attn.k_proj.weight", l.k);
    out.emplace_back(p + "self_attn.v_proj.weight", l.v);
    out.emplace_back(p + "self_attn.o_proj.weight", l.o);
    out.emplace_back(p + "post_attention_layernorm.weight", l.mlp_norm);
    out.emplace_back(p + "mlp.gate_proj.weight", l.gate);
    out.emplace_back(p + "mlp.up_proj.weight", l.up);
    out.emplace_back(p + "mlp.down_proj.weight", l.down);
    const std::pair<const char*, const at::Tensor*> biases[] = {
        {"self_attn.q_proj.bias", &l.q_bias}, {"self_attn.k_proj.bias", &l.k_bias},
        {"self_attn.v_proj.bias", &l.v_bias}, {"self_attn.o_proj.bias", &l.o_bias},
        {"mlp.gate_proj.bias", &l.gate_bias}, {"mlp.up_proj.bias", &l.up_bias},
        {"mlp.down_proj.bias", &l.down_bias}};
    for (const auto& [name, t] : biases)
      if (t->defined()) out.emplace_back(p + name, *t);
  }
  out.emplace_back("model.norm.weight", m.final_norm);
  if (!m.config.tie_word_embeddings) out.emplace_back("lm_head.weight", m.lm_head);
  return out;
}

absl::StatusOr<Model> LoadModel(const std::string& dir) {
  Model m;
  ASSIGN_OR_RETURN(m.config, LoadModelConfig((fs::path(dir) / "config.json").string()));
  ASSIGN_OR_RETURN(TensorStore store, TensorStore::OpenDir(dir));
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden_size, hd = c.head_dim;
  ASSIGN_OR_RETURN(m.embed, store.GetF32("model.embed_tokens.weight", {c.vocab_size, H}));
  ASSIGN_OR_RETURN(m.final_norm, store.GetF32("model.norm.weight", {H}));
  if (c.tie_word_embeddings || !store.contains("lm_head.weight")) {
    m.lm_head = m.embed;
    m.config.tie_word_embeddings = true;
  } else {
    ASSIGN_OR_RETURN(m.lm_head, store.GetF32("lm_head.weight", {c.vocab_size, H}));
  }
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    const int64_t q = c.q_heads(i) * hd, kv = c.kv_heads(i) * hd, I = c.intermediate(i);
    LayerWeights l;
    ASSIGN_OR_RETURN(l.attn_norm, store.GetF32(p + "input_layernorm.weight", {H}));
    ASSIGN_OR_RETURN(l.mlp_norm, store.GetF32(p + "post_attention_layernorm.weight", {H}));
    ASSIGN_OR_RETURN(l.q, store.GetF32(p + "self_attn.q_proj.weight", {q, H}));
    ASSIGN_OR_RETURN(l.k, store.GetF32(p + "self_attn.k_proj.weight", {kv, H}));
    ASSIGN_OR_RETURN(l.v, store.GetF32(p + "self_attn.v_proj.weight", {kv, H}));
    ASSIGN_OR_RETURN(l.o, store.GetF32(p + "self_attn.o_proj.weight", {H, q}));
    ASSIGN_OR_RETURN(l.gate, store.GetF32(p + "mlp.gate_proj.weight", {I, H}));
    ASSIGN_OR_RETURN(l.up, store.GetF32(p + "mlp.up_proj.weight", {I, H}));
    ASSIGN_OR_RETURN(l.down, store.GetF32(p + "mlp.down_proj.weight", {H, I}));
    // Biases: required when the config says so, otherwise loaded if present (e.g. Amoeba's
    // width-compensation biases on o_proj / down_proj).
    struct B {
      const char* name;
      at::Tensor* dst;
      int64_t size;
      bool required;
    } biases[] = {{"self_attn.q_proj.bias", &l.q_bias, q, c.attention_bias},
                  {"self_attn.k_proj.bias", &l.k_bias, kv, c.attention_bias},
                  {"self_attn.v_proj.bias", &l.v_bias, kv, c.attention_bias},
                  {"self_attn.o_proj.bias", &l.o_bias, H, c.attention_bias},
                  {"mlp.gate_proj.bias", &l.gate_bias, I, c.mlp_bias},
                  {"mlp.up_proj.bias", &l.up_bias, I, c.mlp_bias},
                  {"mlp.down_proj.bias", &l.down_bias, H, c.mlp_bias}};
    for (auto& b : biases) {
      if (b.required || store.contains(p + b.name)) {
        ASSIGN_OR_RETURN(*b.dst, store.GetF32(p + b.name, {b.size}));
      }
    }
    m.layers.push_back(std::move(l));
  }
  // A NaN or Inf weight would serve empty or garbage text without any error: refuse it here.
  for (const auto& [name, t] : NamedWeights(m)) {
    if (!at::isfinite(t).all().item<bool>())
      return absl::DataLossError(absl::StrCat(dir, ": tensor '", name, "' holds NaN or Inf"));
  }
  return m;
}

absl::Status SaveModel(const Model& m, const std::string& dir, at::ScalarType dtype) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  ModelConfig c = m.config;
  c.torch_dtype = dtype == at::kHalf ? "float16" : dtype == at::kBFloat16 ? "bfloat16" : "float32";
  RETURN_IF_ERROR(WriteSafetensors((fs::path(dir) / "model.safetensors").string(), NamedWeights(m),
                                   {{"format", "pt"}}, dtype));
  return WriteFileAtomic((fs::path(dir) / "config.json").string(),
                         ModelConfigToJson(c).dump(2) + "\n");
}

Model RandomModel(const ModelConfig& c, uint64_t seed, double std) {
  at::manual_seed(seed);
  auto normal = [&](std::vector<int64_t> shape) { return at::randn(shape) * std; };
  Model m;
  m.config = c;
  const int64_t H = c.hidden_size, hd = c.head_dim;
  m.embed = normal({c.vocab_size, H});
  m.final_norm = at::ones({H});
  m.lm_head = c.tie_word_embeddings ? m.embed : normal({c.vocab_size, H});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const int64_t q = c.q_heads(i) * hd, kv = c.kv_heads(i) * hd, I = c.intermediate(i);
    LayerWeights l;
    l.attn_norm = at::ones({H});
    l.mlp_norm = at::ones({H});
    l.q = normal({q, H});
    l.k = normal({kv, H});
    l.v = normal({kv, H});
    l.o = normal({H, q});
    l.gate = normal({I, H});
    l.up = normal({I, H});
    l.down = normal({H, I});
    if (c.attention_bias) {
      l.q_bias = at::zeros({q});
      l.k_bias = at::zeros({kv});
      l.v_bias = at::zeros({kv});
      l.o_bias = at::zeros({H});
    }
    if (c.mlp_bias) {
      l.gate_bias = at::zeros({I});
      l.up_bias = at::zeros({I});
      l.down_bias = at::zeros({H});
    }
    m.layers.push_back(std::move(l));
  }
  return m;
}

}  // namespace amoeba
