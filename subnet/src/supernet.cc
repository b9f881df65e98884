#include "subnet/supernet.h"

#include <cmath>
#include <filesystem>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "model/file_util.h"
#include "model/packed_linear.h"
#include "model/safetensors.h"
#include "model/status_macros.h"
#include "model/weight_format.h"

namespace amoeba {
namespace fs = std::filesystem;
using nlohmann::json;

absl::StatusOr<std::unique_ptr<Supernet>> Supernet::Load(const std::string& dir) {
  const std::string meta = (fs::path(dir) / "amoeba.json").string();
  if (!fs::exists(meta)) {
    return absl::NotFoundError(
        absl::StrCat(dir, ": no amoeba.json (not a supernet, or calibration did not finish)"));
  }
  ASSIGN_OR_RETURN(Model m, LoadModel(dir));
  ASSIGN_OR_RETURN(std::string text, ReadFile(meta));
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded()) return absl::DataLossError(meta + ": invalid JSON");
  ASSIGN_OR_RETURN(SupernetSpec spec, SupernetSpec::FromJson(j, m.config.num_hidden_layers));
  const int64_t L = m.config.num_hidden_layers, H = m.config.hidden_size;
  // The width table against the model: in range, nested (a smaller width keeps a prefix of a
  // larger one's units), and width 1 keeps everything.
  std::vector<const WidthEntry*> by_ratio;
  for (const auto& w : spec.width_table) by_ratio.push_back(&w);
  std::sort(by_ratio.begin(), by_ratio.end(),
            [](const WidthEntry* a, const WidthEntry* b) { return a->ratio > b->ratio; });
  for (size_t i = 0; i < by_ratio.size(); ++i) {
    const WidthEntry& w = *by_ratio[i];
    for (int64_t l = 0; l < L; ++l) {
      const int64_t groups = m.layers[l].kv_heads(m.config.head_dim);
      const int64_t channels = m.layers[l].intermediate();
      if (w.alloc.kv_groups[l] > groups || w.alloc.channels[l] > channels)
        return absl::DataLossError(
            absl::StrCat(meta, ": width ", w.ratio, " keeps more units than layer ", l, " has"));
      if (w.ratio == 1.0 && (w.alloc.kv_groups[l] != groups || w.alloc.channels[l] != channels))
        return absl::DataLossError(absl::StrCat(meta, ": width 1 does not keep all of layer ", l));
      if (i > 0 && (w.alloc.kv_groups[l] > by_ratio[i - 1]->alloc.kv_groups[l] ||
                    w.alloc.channels[l] > by_ratio[i - 1]->alloc.channels[l]))
        return absl::DataLossError(absl::StrCat(meta, ": width ", w.ratio, " keeps more of layer ",
                                                l, " than width ", by_ratio[i - 1]->ratio,
                                                " (widths must be nested)"));
    }
  }
  const std::string width_path = (fs::path(dir) / "width.safetensors").string();
  ASSIGN_OR_RETURN(TensorStore ws, TensorStore::OpenFile(width_path));
  auto finite = [&](const at::Tensor& t, const std::string& name) -> absl::Status {
    if (at::isfinite(t).all().item<bool>()) return absl::OkStatus();
    return absl::DataLossError(absl::StrCat(width_path, ": tensor '", name, "' holds NaN or Inf"));
  };
  std::vector<at::Tensor> om, dm;
  for (int64_t l = 0; l < L; ++l) {
    const auto& layer = m.layers[l];
    const std::string on = absl::StrCat("layers.", l, ".o_proj.input_mean");
    const std::string dn = absl::StrCat("layers.", l, ".down_proj.input_mean");
    ASSIGN_OR_RETURN(at::Tensor o, ws.GetF32(on, {layer.o.size(1)}));
    ASSIGN_OR_RETURN(at::Tensor d, ws.GetF32(dn, {layer.down.size(1)}));
    RETURN_IF_ERROR(finite(o, on));
    RETURN_IF_ERROR(finite(d, dn));
    om.push_back(o);
    dm.push_back(d);
  }
  // Grid biases as stored (identical to recomputing them from the means; loading saves work).
  std::map<std::tuple<int64_t, bool, int64_t>, at::Tensor> biases;
  for (size_t wi = 0; wi < spec.width_table.size(); ++wi) {
    const auto& a = spec.width_table[wi].alloc;
    for (int64_t l = 0; l < L; ++l) {
      const std::string p = absl::StrCat("width.", wi, ".layers.", l, ".");
      for (bool attention : {true, false}) {
        const std::string name = p + (attention ? "o_proj.bias" : "down_proj.bias");
        if (!ws.contains(name)) continue;  // recomputed from the means when needed
        ASSIGN_OR_RETURN(at::Tensor b, ws.GetF32(name, {H}));
        RETURN_IF_ERROR(finite(b, name));
        biases[{l, attention, attention ? a.kv_groups[l] : a.channels[l]}] = b;
      }
    }
  }
  auto s = std::make_unique<Supernet>(std::move(m), std::move(spec), std::move(om), std::move(dm));
  s->dir_ = dir;
  s->bias_cache_ = std::move(biases);
  // No tokenizer files: a supernet served by token ids. Files that do not load: an error that
  // says why (it used to be dropped, and the server said only that there was no tokenizer).
  auto tok = LoadTokenizer(dir);
  if (tok.ok()) {
    s->tokenizer_ = std::move(*tok);
  } else if (!absl::IsNotFound(tok.status())) {
    return tok.status();
  }
  // Recorded sizes must be this model's (an amoeba.json copied next to other weights is not).
  for (const ShapeRecord& r : s->spec_.profile) {
    if (r.params == 0) continue;
    ASSIGN_OR_RETURN(Model sub, s->Extract(r.shape));
    if (sub.config.ParameterCount() != r.params)
      return absl::DataLossError(absl::StrCat(meta, ": profile of ", r.shape.ToString(),
                                              " records ", r.params, " parameters, the model has ",
                                              sub.config.ParameterCount()));
  }
  return s;
}

absl::Status Supernet::SaveMetadata(const std::string& dir) const {
  NamedTensors t;
  for (size_t l = 0; l < base_.layers.size(); ++l) {
    t.emplace_back(absl::StrCat("layers.", l, ".o_proj.input_mean"), o_mean_[l]);
    t.emplace_back(absl::StrCat("layers.", l, ".down_proj.input_mean"), down_mean_[l]);
  }
  for (size_t wi = 0; wi < spec_.width_table.size(); ++wi) {
    const auto& a = spec_.width_table[wi].alloc;
    for (size_t l = 0; l < base_.layers.size(); ++l) {
      const std::string p = absl::StrCat("width.", wi, ".layers.", l, ".");
      t.emplace_back(p + "o_proj.bias", Bias(l, true, a.kv_groups[l]));
      t.emplace_back(p + "down_proj.bias", Bias(l, false, a.channels[l]));
    }
  }
  RETURN_IF_ERROR(WriteSafetensors((fs::path(dir) / "width.safetensors").string(), t,
                                   {{"format", "amoeba-width"}}));
  return WriteFileAtomic((fs::path(dir) / "amoeba.json").string(), spec_.ToJson().dump(2) + "\n");
}

at::Tensor Supernet::Bias(int64_t layer, bool attention, int64_t kept) const {
  std::lock_guard<std::mutex> lock(bias_mu_);
  auto key = std::make_tuple(layer, attention, kept);
  auto it = bias_cache_.find(key);
  if (it != bias_cache_.end()) return it->second;
  at::InferenceMode guard;
  const LayerWeights& w = base_.layers[layer];
  at::Tensor b = attention
                     ? CompensationBias(w.o.to(at::kFloat), o_mean_[layer],
                                        kept * base_.config.group_size() * base_.config.head_dim)
                     : CompensationBias(w.down.to(at::kFloat), down_mean_[layer], kept);
  bias_cache_[key] = b;
  return b;
}

void Supernet::PackBaseWeights(WeightFormat f) {
  PackWeights(base_, f);
  ReleaseRowMajorPages(base_);
}

absl::Status Supernet::Validate(const Shape& s) const {
  if (!spec_.FindDepth(s.depth)) {
    return absl::InvalidArgumentError(absl::StrCat("shape.depth: ", s.depth,
                                                   " is not in the grid [", spec_.depths.front(),
                                                   ", ", spec_.depths.back(), "]"));
  }
  if (!spec_.FindWidth(s.width)) {
    std::string ws;
    for (double w : spec_.widths) absl::StrAppend(&ws, ws.empty() ? "" : ", ", w);
    return absl::InvalidArgumentError(
        absl::StrCat("shape.width: ", s.width, " is not in the grid {", ws, "}"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Model> Supernet::Extract(const Shape& s, ExtractMode mode) const {
  RETURN_IF_ERROR(Validate(s));
  return ExtractWith(s.depth, spec_.FindWidth(s.width)->alloc, mode);
}

absl::StatusOr<Model> Supernet::ExtractWith(int64_t depth, const WidthAllocation& alloc,
                                            ExtractMode mode) const {
  const DepthEntry* d = spec_.FindDepth(depth);
  if (!d)
    return absl::InvalidArgumentError(
        absl::StrCat("shape.depth: ", depth, " is not in the depth table"));
  const int64_t hd = base_.config.head_dim, G = base_.config.group_size();
  Model m = base_.WithLayers(d->layers);
  auto add_bias = [](const at::Tensor& existing, const at::Tensor& comp) {
    return existing.defined() ? existing + comp : comp;
  };
  for (size_t i = 0; i < d->layers.size(); ++i) {
    const int64_t l = d->layers[i];
    LayerWeights& w = m.layers[i];
    const int64_t g = alloc.kv_groups[l], c = alloc.channels[l];
    const bool full_attn = g == w.kv_heads(hd), full_mlp = c == w.intermediate();
    if (!full_attn) w.o_bias = add_bias(w.o_bias, Bias(l, true, g));
    if (!full_mlp) w.down_bias = add_bias(w.down_bias, Bias(l, false, c));
    if (mode == ExtractMode::kSliced) {
      w.q = w.q.narrow(0, 0, g * G * hd);
      w.k = w.k.narrow(0, 0, g * hd);
      w.v = w.v.narrow(0, 0, g * hd);
      w.o = w.o.narrow(1, 0, g * G * hd);
      if (w.q_bias.defined()) w.q_bias = w.q_bias.narrow(0, 0, g * G * hd);
      if (w.k_bias.defined()) w.k_bias = w.k_bias.narrow(0, 0, g * hd);
      if (w.v_bias.defined()) w.v_bias = w.v_bias.narrow(0, 0, g * hd);
      w.gate = w.gate.narrow(0, 0, c);
      w.up = w.up.narrow(0, 0, c);
      w.down = w.down.narrow(1, 0, c);
      if (w.gate_bias.defined()) w.gate_bias = w.gate_bias.narrow(0, 0, c);
      if (w.up_bias.defined()) w.up_bias = w.up_bias.narrow(0, 0, c);
    } else {
      // Zero the removed units' output columns: their contribution vanishes, shapes stay full.
      w.o = w.o.clone();
      w.o.narrow(1, g * G * hd, w.o.size(1) - g * G * hd).zero_();
      w.down = w.down.clone();
      w.down.narrow(1, c, w.down.size(1) - c).zero_();
      w.panels[static_cast<int>(Proj::kO)].reset();  // packed from the unmasked values
      w.panels[static_cast<int>(Proj::kDown)].reset();
    }
  }
  m.SyncConfigWithWeights();
  return m;
}

int64_t Supernet::WidthIndex(double w) const {
  for (size_t i = 0; i < spec_.widths.size(); ++i)
    if (std::abs(spec_.widths[i] - w) < 1e-6) return static_cast<int64_t>(i);
  return -1;
}

std::vector<Shape> Supernet::GridShapes() const {
  std::vector<Shape> out;
  for (auto it = spec_.depths.rbegin(); it != spec_.depths.rend(); ++it)
    for (double w : spec_.widths) out.push_back({*it, w});
  return out;
}

}  // namespace amoeba
