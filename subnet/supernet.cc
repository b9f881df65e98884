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

namespace amoeba {
namespace fs = std::filesystem;
using nlohmann::json;

std::string Shape::ToString() const {
  std::string w = absl::StrCat(width);
  return absl::StrCat("depth=", depth, ",width=", w);
}

absl::StatusOr<Shape> Shape::Parse(const std::string& s, int64_t full_depth) {
  Shape out{full_depth, 1.0};
  for (auto part : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    std::vector<std::string> kv = absl::StrSplit(part, '=');
    if (kv.size() != 2)
      return absl::InvalidArgumentError(
          absl::StrCat("shape: expected key=value, got '", part, "'"));
    if (kv[0] == "depth") {
      if (!absl::SimpleAtoi(kv[1], &out.depth))
        return absl::InvalidArgumentError("shape: depth must be an integer");
    } else if (kv[0] == "width") {
      if (!absl::SimpleAtod(kv[1], &out.width))
        return absl::InvalidArgumentError("shape: width must be a number");
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("shape: unknown key '", kv[0], "' (depth, width)"));
    }
  }
  return out;
}

const DepthEntry* SupernetSpec::FindDepth(int64_t d) const {
  for (const auto& e : depth_table)
    if (e.depth == d) return &e;
  return nullptr;
}

const WidthEntry* SupernetSpec::FindWidth(double w) const {
  for (const auto& e : width_table)
    if (std::abs(e.ratio - w) < 1e-6) return &e;
  return nullptr;
}

json SupernetSpec::ToJson() const {
  json j;
  j["format"] = "amoeba-supernet";
  j["version"] = 1;
  j["grid"] = {{"depths", depths}, {"widths", widths}};
  j["metric"] = metric;
  j["depth_table"] = json::array();
  for (const auto& d : depth_table) {
    json e = {{"depth", d.depth},
              {"layers", d.layers},
              {"metric", d.metric},
              {"baselines", json::object()}};
    for (const auto& [name, b] : d.baselines)
      e["baselines"][name] = {{"layers", b.first}, {"metric", b.second}};
    j["depth_table"].push_back(e);
  }
  j["width_table"] = json::array();
  for (const auto& w : width_table) {
    j["width_table"].push_back({{"ratio", w.ratio},
                                {"kv_groups", w.alloc.kv_groups},
                                {"channels", w.alloc.channels},
                                {"params", w.alloc.params}});
  }
  j["calibration"] = calibration;
  j["profile"] = profile;
  j["smol"] = smol;
  return j;
}

absl::StatusOr<SupernetSpec> SupernetSpec::FromJson(const json& j, int64_t L) {
  auto bad = [](const std::string& m) { return absl::DataLossError("amoeba.json: " + m); };
  if (!j.is_object() || j.value("format", "") != "amoeba-supernet")
    return bad("not an Amoeba supernet file");
  SupernetSpec s;
  try {
    s.depths = j.at("grid").at("depths").get<std::vector<int64_t>>();
    s.widths = j.at("grid").at("widths").get<std::vector<double>>();
    s.metric = j.value("metric", "perplexity");
    for (const auto& e : j.at("depth_table")) {
      DepthEntry d;
      d.depth = e.at("depth").get<int64_t>();
      d.layers = e.at("layers").get<std::vector<int>>();
      d.metric = e.value("metric", 0.0);
      if (e.contains("baselines")) {
        for (auto& [name, b] : e["baselines"].items())
          d.baselines[name] = {b.at("layers").get<std::vector<int>>(), b.value("metric", 0.0)};
      }
      if (static_cast<int64_t>(d.layers.size()) != d.depth)
        return bad(absl::StrCat("depth ", d.depth, ": layer list has the wrong length"));
      for (int l : d.layers)
        if (l < 0 || l >= L)
          return bad(absl::StrCat("depth ", d.depth, ": layer ", l, " out of range"));
      s.depth_table.push_back(std::move(d));
    }
    for (const auto& e : j.at("width_table")) {
      WidthEntry w;
      w.ratio = e.at("ratio").get<double>();
      w.alloc.kv_groups = e.at("kv_groups").get<std::vector<int64_t>>();
      w.alloc.channels = e.at("channels").get<std::vector<int64_t>>();
      w.alloc.params = e.value("params", int64_t{0});
      if (static_cast<int64_t>(w.alloc.kv_groups.size()) != L ||
          static_cast<int64_t>(w.alloc.channels.size()) != L)
        return bad(absl::StrCat("width ", w.ratio, ": per-layer lists need ", L, " entries"));
      s.width_table.push_back(std::move(w));
    }
    s.calibration = j.value("calibration", json::object());
    s.profile = j.value("profile", json::array());
    s.smol = j.value("smol", json());
  } catch (const json::exception& e) {
    return bad(e.what());
  }
  for (int64_t d : s.depths)
    if (!s.FindDepth(d)) return bad(absl::StrCat("grid depth ", d, " has no depth_table entry"));
  for (double w : s.widths)
    if (!s.FindWidth(w)) return bad(absl::StrCat("grid width ", w, " has no width_table entry"));
  if (s.depths.empty() || s.widths.empty()) return bad("empty grid");
  return s;
}

Supernet::Supernet(Model permuted, SupernetSpec spec, std::vector<at::Tensor> o_mean,
                   std::vector<at::Tensor> down_mean)
    : base_(std::move(permuted)),
      spec_(std::move(spec)),
      o_mean_(std::move(o_mean)),
      down_mean_(std::move(down_mean)) {}

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
  ASSIGN_OR_RETURN(TensorStore ws,
                   TensorStore::OpenFile((fs::path(dir) / "width.safetensors").string()));
  std::vector<at::Tensor> om, dm;
  for (int64_t l = 0; l < m.config.num_hidden_layers; ++l) {
    const auto& layer = m.layers[l];
    ASSIGN_OR_RETURN(at::Tensor o, ws.GetF32(absl::StrCat("layers.", l, ".o_proj.input_mean"),
                                             {layer.o.size(1)}));
    ASSIGN_OR_RETURN(at::Tensor d, ws.GetF32(absl::StrCat("layers.", l, ".down_proj.input_mean"),
                                             {layer.down.size(1)}));
    om.push_back(o);
    dm.push_back(d);
  }
  for (const auto& w : spec.width_table) {
    for (int64_t l = 0; l < m.config.num_hidden_layers; ++l) {
      if (w.alloc.kv_groups[l] > m.layers[l].kv_heads(m.config.head_dim) ||
          w.alloc.channels[l] > m.layers[l].intermediate())
        return absl::DataLossError(
            absl::StrCat(meta, ": width ", w.ratio, " keeps more units than layer ", l, " has"));
    }
  }
  auto s = std::make_unique<Supernet>(std::move(m), std::move(spec), std::move(om), std::move(dm));
  s->dir_ = dir;
  auto tok = LoadTokenizer(dir);
  if (tok.ok()) s->tokenizer_ = std::move(*tok);
  // Grid biases as stored (identical to recomputing them from the means; loading them saves work).
  for (size_t wi = 0; wi < s->spec_.width_table.size(); ++wi) {
    const auto& a = s->spec_.width_table[wi].alloc;
    for (int64_t l = 0; l < s->base_.config.num_hidden_layers; ++l) {
      const std::string p = absl::StrCat("width.", wi, ".layers.", l, ".");
      if (ws.contains(p + "o_proj.bias"))
        s->bias_cache_[{l, true, a.kv_groups[l]}] = *ws.GetF32(p + "o_proj.bias");
      if (ws.contains(p + "down_proj.bias"))
        s->bias_cache_[{l, false, a.channels[l]}] = *ws.GetF32(p + "down_proj.bias");
    }
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

void Supernet::PackBaseWeights(at::ScalarType dtype) {
  PackWeights(base_, dtype);
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
