#include "model/gguf_model.h"

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "model/file_util.h"
#include "model/gguf.h"
#include "model/gguf_tokenizer.h"
#include "model/quantized_panels.h"
#include "model/status_macros.h"

namespace amoeba {

namespace fs = std::filesystem;

namespace {

// GGUF general.file_type (llama_ftype): the dominant tensor type.
uint32_t FileType(WeightFormat f) {
  switch (f) {
    case WeightFormat::kF32:
      return 0;
    case WeightFormat::kF16:
      return 1;
    case WeightFormat::kQ4_0:
      return 2;
    case WeightFormat::kQ8_0:
      return 7;
  }
  return 0;
}

GgmlType TypeFor(WeightFormat f, int64_t row) {
  switch (f) {
    case WeightFormat::kF32:
      return GgmlType::kF32;
    case WeightFormat::kF16:
      return GgmlType::kF16;
    case WeightFormat::kQ8_0:
      return row % kQuantBlock == 0 ? GgmlType::kQ8_0 : GgmlType::kF16;
    case WeightFormat::kQ4_0:
      return row % kQuantBlock == 0 ? GgmlType::kQ4_0 : GgmlType::kF16;
  }
  return GgmlType::kF32;
}

// Bytes of a 2-D [rows, cols] (or 1-D) fp32 matrix in `type`.
at::Tensor Encode(const at::Tensor& w, GgmlType type) {
  const at::Tensor f = w.detach().to(at::kFloat).contiguous();
  switch (type) {
    case GgmlType::kF32:
      return f;
    case GgmlType::kF16:
      return f.to(at::kHalf);
    case GgmlType::kQ8_0:
    case GgmlType::kQ4_0: {
      const WeightFormat wf = type == GgmlType::kQ8_0 ? WeightFormat::kQ8_0 : WeightFormat::kQ4_0;
      const int64_t cols = f.size(-1), rows = f.numel() / cols;
      const int64_t row_bytes = GgmlTypeBytes(type, cols);
      at::Tensor out = at::empty({rows * row_bytes}, at::TensorOptions().dtype(at::kByte));
      for (int64_t r = 0; r < rows; ++r)
        QuantizeRowGgml(wf, f.data_ptr<float>() + r * cols, cols,
                        out.data_ptr<uint8_t>() + r * row_bytes);
      return out;
    }
  }
  return f;
}

// HF q/k rows (per head: the first half of the dims rotates with the second half) to llama.cpp's
// interleaved pairs: new row 2j = old j, new row 2j+1 = old j + hd/2, within each head.
at::Tensor ToInterleaved(const at::Tensor& w, int64_t heads, int64_t hd) {
  std::vector<int64_t> shape = {heads, 2, hd / 2};
  for (int64_t d = 1; d < w.dim(); ++d) shape.push_back(w.size(d));
  return w.reshape(shape).transpose(1, 2).reshape(w.sizes()).contiguous();
}
at::Tensor FromInterleaved(const at::Tensor& w, int64_t heads, int64_t hd) {
  std::vector<int64_t> shape = {heads, hd / 2, 2};
  for (int64_t d = 1; d < w.dim(); ++d) shape.push_back(w.size(d));
  return w.reshape(shape).transpose(1, 2).reshape(w.sizes()).contiguous();
}

// SentencePiece's ModelProto, just the pieces (field 1: piece = 1, score = 2, type = 3), read
// from the protobuf wire format.
struct LayerShape {
  int64_t q_heads, kv_heads, inter;
};

std::vector<LayerShape> Shapes(const Model& m) {
  std::vector<LayerShape> s;
  const int64_t hd = m.config.head_dim;
  for (const LayerWeights& l : m.layers)
    s.push_back({l.q_heads(hd), l.kv_heads(hd), l.intermediate()});
  return s;
}

}  // namespace

namespace {
// q/k/v/gate/up biases that are all zero are not written (SaveGguf says why).
bool IsWrittenBias(const at::Tensor& b) {
  return b.defined() && b.count_nonzero().item<int64_t>() > 0;
}
}  // namespace

std::string GgufArchitectureFor(const Model& m) {
  const std::vector<LayerShape> s = Shapes(m);
  for (const LayerShape& l : s)
    if (l.q_heads != s[0].q_heads || l.kv_heads != s[0].kv_heads || l.inter != s[0].inter ||
        l.q_heads == 0 || l.inter == 0)
      return "deci";
  return "llama";
}

int64_t GgufTensorBytes(const Model& m, WeightFormat format) {
  const int64_t H = m.config.hidden_size, hd = m.config.head_dim, g = m.config.group_size();
  int64_t total = 0;
  auto add = [&](int64_t rows, int64_t cols, bool vector) {
    const GgmlType t = vector ? GgmlType::kF32 : TypeFor(format, cols);
    total += (GgmlTypeBytes(t, rows * cols) + 31) / 32 * 32;
  };
  add(m.embed.size(0), H, false);
  add(1, H, true);
  if (!m.config.tie_word_embeddings) add(m.lm_head.size(0), H, false);
  for (const LayerWeights& l : m.layers) {
    const int64_t hq = l.q_heads(hd), hkv = l.kv_heads(hd), inter = l.intermediate();
    const int64_t wq = hq == 0 ? g : hq, wkv = hq == 0 ? 1 : hkv, wff = inter == 0 ? 1 : inter;
    add(1, H, true);  // attn_norm
    add(wq * hd, H, false);
    add(wkv * hd, H, false);
    add(wkv * hd, H, false);
    add(H, wq * hd, false);
    add(1, H, true);  // ffn_norm
    add(wff, H, false);
    add(wff, H, false);
    add(H, wff, false);
    for (const at::Tensor* b : {&l.o_bias, &l.down_bias})
      if (b->defined()) add(1, b->numel(), true);
    for (const at::Tensor* b : {&l.q_bias, &l.k_bias, &l.v_bias, &l.gate_bias, &l.up_bias})
      if (IsWrittenBias(*b)) add(1, b->numel(), true);
  }
  return total;
}

absl::Status SaveGguf(const Model& m, const std::string& path, const GgufExportOptions& o) {
  const ModelConfig& c = m.config;
  if (m.layers.empty()) return absl::InvalidArgumentError("GGUF export: a model without layers");
  if (c.rope_scaling.type == RopeScaling::Type::kLlama3)
    return absl::UnimplementedError("GGUF export: llama3 RoPE scaling is not written yet");
  const int64_t H = c.hidden_size, hd = c.head_dim, g = c.group_size();
  const std::string arch = GgufArchitectureFor(m);
  const bool deci = arch == "deci";
  GgufWriter w;
  w.SetString("general.architecture", arch);
  w.SetString("general.name", o.name);
  w.SetU32("general.file_type", FileType(o.format));
  w.SetU32("general.quantization_version", 2);
  const std::string a = arch + ".";
  w.SetU32(a + "context_length", static_cast<uint32_t>(c.max_position_embeddings));
  w.SetU32(a + "embedding_length", static_cast<uint32_t>(H));
  w.SetU32(a + "block_count", static_cast<uint32_t>(m.layers.size()));
  w.SetU32(a + "vocab_size", static_cast<uint32_t>(c.vocab_size));
  w.SetU32(a + "rope.dimension_count", static_cast<uint32_t>(hd));
  w.SetU32(a + "attention.key_length", static_cast<uint32_t>(hd));
  w.SetU32(a + "attention.value_length", static_cast<uint32_t>(hd));
  w.SetF32(a + "rope.freq_base", static_cast<float>(c.rope_theta));
  w.SetF32(a + "attention.layer_norm_rms_epsilon", static_cast<float>(c.rms_norm_eps));
  if (c.rope_scaling.type == RopeScaling::Type::kLinear) {
    w.SetString(a + "rope.scaling.type", "linear");
    w.SetF32(a + "rope.scaling.factor", static_cast<float>(c.rope_scaling.factor));
  }
  // Written shapes: a head-free layer keeps one zero KV group, an MLP-free one a zero channel.
  std::vector<LayerShape> shapes = Shapes(m);
  std::vector<int32_t> heads, kv_heads, ff;
  for (LayerShape& s : shapes) {
    if (s.q_heads == 0) s = {g, 1, s.inter};
    if (s.inter == 0) s.inter = 1;
    heads.push_back(static_cast<int32_t>(s.q_heads));
    kv_heads.push_back(static_cast<int32_t>(s.kv_heads));
    ff.push_back(static_cast<int32_t>(s.inter));
  }
  if (deci) {
    w.SetI32Array(a + "attention.head_count", heads);
    w.SetI32Array(a + "attention.head_count_kv", kv_heads);
    w.SetI32Array(a + "feed_forward_length", ff);
  } else {
    w.SetU32(a + "attention.head_count", static_cast<uint32_t>(heads[0]));
    w.SetU32(a + "attention.head_count_kv", static_cast<uint32_t>(kv_heads[0]));
    w.SetU32(a + "feed_forward_length", static_cast<uint32_t>(ff[0]));
  }
  if (!o.tokenizer_dir.empty())
    RETURN_IF_ERROR(AddTokenizer(m, o.tokenizer_dir, o.embed_tokenizer, w));

  auto matrix = [&](const std::string& name, const at::Tensor& t) {
    const GgmlType type = TypeFor(o.format, t.size(1));
    w.AddTensor(name, type, {t.size(1), t.size(0)}, Encode(t, type));
  };
  auto vec = [&](const std::string& name, const at::Tensor& t) {
    if (t.defined()) w.AddTensor(name, GgmlType::kF32, {t.numel()}, Encode(t, GgmlType::kF32));
  };
  // q/k/v/gate/up biases that are all zero (a uniform-width HF export has them, since HF has one
  // flag for all projections) are left out: absent is zero to llama.cpp, and its `llama` graph
  // sizes a q bias by the embedding width, so a pruned shape's zero q bias made it refuse the file.
  auto optional_vec = [&](const std::string& name, const at::Tensor& t) {
    if (IsWrittenBias(t)) vec(name, t);
  };
  const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
  matrix("token_embd.weight", m.embed);
  vec("output_norm.weight", m.final_norm);
  if (!c.tie_word_embeddings) matrix("output.weight", m.lm_head);
  for (size_t i = 0; i < m.layers.size(); ++i) {
    const LayerWeights& l = m.layers[i];
    const LayerShape& s = shapes[i];
    const std::string b = absl::StrCat("blk.", i, ".");
    vec(b + "attn_norm.weight", l.attn_norm);
    if (l.q.size(0) == 0) {  // head-free: zero weights, so attention adds only its bias
      matrix(b + "attn_q.weight", at::zeros({s.q_heads * hd, H}, f32));
      matrix(b + "attn_k.weight", at::zeros({hd, H}, f32));
      matrix(b + "attn_v.weight", at::zeros({hd, H}, f32));
      matrix(b + "attn_output.weight", at::zeros({H, s.q_heads * hd}, f32));
    } else {
      matrix(b + "attn_q.weight", ToInterleaved(l.q.to(at::kFloat), s.q_heads, hd));
      matrix(b + "attn_k.weight", ToInterleaved(l.k.to(at::kFloat), s.kv_heads, hd));
      matrix(b + "attn_v.weight", l.v);
      matrix(b + "attn_output.weight", l.o);
      if (l.q_bias.defined())
        optional_vec(b + "attn_q.bias", ToInterleaved(l.q_bias, s.q_heads, hd));
      if (l.k_bias.defined())
        optional_vec(b + "attn_k.bias", ToInterleaved(l.k_bias, s.kv_heads, hd));
      optional_vec(b + "attn_v.bias", l.v_bias);
    }
    vec(b + "attn_output.bias", l.o_bias);
    vec(b + "ffn_norm.weight", l.mlp_norm);
    if (l.gate.size(0) == 0) {  // MLP-free: one zero channel, so the MLP adds only its bias
      matrix(b + "ffn_gate.weight", at::zeros({1, H}, f32));
      matrix(b + "ffn_up.weight", at::zeros({1, H}, f32));
      matrix(b + "ffn_down.weight", at::zeros({H, 1}, f32));
    } else {
      matrix(b + "ffn_gate.weight", l.gate);
      matrix(b + "ffn_up.weight", l.up);
      matrix(b + "ffn_down.weight", l.down);
      optional_vec(b + "ffn_gate.bias", l.gate_bias);
      optional_vec(b + "ffn_up.bias", l.up_bias);
    }
    vec(b + "ffn_down.bias", l.down_bias);
  }
  return w.Write(path);
}

namespace {

// The tensor `name` as fp32 [rows, cols] (GGUF ne = {cols, rows}), or an error naming it.
absl::StatusOr<at::Tensor> ReadMatrix(const GgufFile& f, const std::string& name, int64_t rows,
                                      int64_t cols) {
  const GgufTensorInfo* t = f.Find(name);
  if (!t) return absl::InvalidArgumentError(absl::StrCat(f.path, ": missing tensor ", name));
  const bool vector = rows == 0;
  const std::vector<int64_t> want =
      vector ? std::vector<int64_t>{cols} : std::vector<int64_t>{cols, rows};
  if (t->ne != want) {
    std::string got;
    for (int64_t d : t->ne) absl::StrAppend(&got, got.empty() ? "" : ", ", d);
    return absl::InvalidArgumentError(absl::StrCat(f.path, ": tensor ", name, " is [", got,
                                                   "], want [", cols, vector ? "" : ", ",
                                                   vector ? "" : std::to_string(rows), "]"));
  }
  const int64_t n = vector ? cols : rows * cols;
  at::Tensor out = at::empty({vector ? cols : rows, vector ? 1 : cols});
  switch (t->type) {
    case GgmlType::kF32:
      std::memcpy(out.data_ptr<float>(), t->data, n * sizeof(float));
      break;
    case GgmlType::kF16: {
      const auto* h = reinterpret_cast<const at::Half*>(t->data);
      float* o = out.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) o[i] = static_cast<float>(h[i]);
      break;
    }
    case GgmlType::kQ8_0:
    case GgmlType::kQ4_0: {
      const WeightFormat wf =
          t->type == GgmlType::kQ8_0 ? WeightFormat::kQ8_0 : WeightFormat::kQ4_0;
      const int64_t r = vector ? 1 : rows;
      const int64_t row_bytes = GgmlTypeBytes(t->type, cols);
      for (int64_t i = 0; i < r; ++i)
        DequantizeRowGgml(wf, t->data + i * row_bytes, cols, out.data_ptr<float>() + i * cols);
      break;
    }
  }
  return vector ? out.reshape({cols}) : out;
}

absl::StatusOr<at::Tensor> ReadOptionalVector(const GgufFile& f, const std::string& name,
                                              int64_t n) {
  if (!f.Find(name)) return at::Tensor();
  return ReadMatrix(f, name, 0, n);
}

}  // namespace

absl::StatusOr<Model> LoadGgufModel(const std::string& path) {
  ASSIGN_OR_RETURN(GgufFile f, ReadGguf(path));
  ASSIGN_OR_RETURN(std::string arch, f.GetString("general.architecture"));
  if (arch != "llama" && arch != "deci")
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": architecture ", arch, " (llama and deci are read)"));
  const std::string a = arch + ".";
  ModelConfig c;
  ASSIGN_OR_RETURN(c.hidden_size, f.GetInt(a + "embedding_length"));
  ASSIGN_OR_RETURN(c.num_hidden_layers, f.GetInt(a + "block_count"));
  if (c.hidden_size <= 0 || c.num_hidden_layers <= 0 || c.num_hidden_layers > 4096)
    return absl::InvalidArgumentError(absl::StrCat(path, ": embedding_length ", c.hidden_size,
                                                   ", block_count ", c.num_hidden_layers));
  const size_t L = static_cast<size_t>(c.num_hidden_layers);
  ASSIGN_OR_RETURN(std::vector<int64_t> heads, f.GetIntArray(a + "attention.head_count", L));
  std::vector<int64_t> kv = heads;
  if (f.meta.count(a + "attention.head_count_kv")) {
    ASSIGN_OR_RETURN(kv, f.GetIntArray(a + "attention.head_count_kv", L));
  }
  ASSIGN_OR_RETURN(std::vector<int64_t> ff, f.GetIntArray(a + "feed_forward_length", L));
  int64_t max_heads = 0, max_kv = 0, max_ff = 0, group = 0;
  for (size_t i = 0; i < L; ++i) {
    if (heads[i] <= 0 || kv[i] <= 0 || heads[i] % kv[i] != 0 || ff[i] <= 0)
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": layer ", i, " has ", heads[i], " heads, ", kv[i], " KV heads, ", ff[i],
          " MLP channels (attention-free, linear-attention and MLP-free layers are not read)"));
    if (group == 0) group = heads[i] / kv[i];
    if (heads[i] / kv[i] != group)
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": layer ", i, " has another GQA group size than layer 0"));
    max_heads = std::max(max_heads, heads[i]);
    max_kv = std::max(max_kv, kv[i]);
    max_ff = std::max(max_ff, ff[i]);
  }
  c.num_attention_heads = max_heads;
  c.num_key_value_heads = max_kv;
  c.intermediate_size = max_ff;
  c.head_dim = c.hidden_size / heads[0];
  if (auto k = f.GetInt(a + "attention.key_length"); k.ok()) c.head_dim = *k;
  if (c.head_dim <= 0 || c.head_dim % 2 != 0)
    return absl::InvalidArgumentError(absl::StrCat(path, ": head size ", c.head_dim));
  if (auto n = f.GetInt(a + "context_length"); n.ok()) c.max_position_embeddings = *n;
  if (auto t = f.GetFloat(a + "rope.freq_base"); t.ok()) c.rope_theta = *t;
  ASSIGN_OR_RETURN(c.rms_norm_eps, f.GetFloat(a + "attention.layer_norm_rms_epsilon"));
  if (auto s = f.GetString(a + "rope.scaling.type"); s.ok() && *s == "linear") {
    c.rope_scaling.type = RopeScaling::Type::kLinear;
    ASSIGN_OR_RETURN(c.rope_scaling.factor, f.GetFloat(a + "rope.scaling.factor"));
  } else if (s.ok() && *s != "none") {
    return absl::InvalidArgumentError(absl::StrCat(path, ": RoPE scaling ", *s, " is not read"));
  }
  const GgufTensorInfo* embd = f.Find("token_embd.weight");
  if (!embd || embd->ne.size() != 2)
    return absl::InvalidArgumentError(absl::StrCat(path, ": missing tensor token_embd.weight"));
  c.vocab_size = embd->ne[1];
  if (auto b = f.GetInt("tokenizer.ggml.bos_token_id"); b.ok()) c.bos_token_id = *b;
  if (auto e = f.GetInt("tokenizer.ggml.eos_token_id"); e.ok()) c.eos_token_ids = {*e};
  c.tie_word_embeddings = f.Find("output.weight") == nullptr;
  for (size_t i = 0; i < L; ++i) {
    c.layer_kv_heads.push_back(kv[i]);
    c.layer_intermediate.push_back(ff[i]);
  }
  const int64_t H = c.hidden_size, hd = c.head_dim;
  Model m;
  ASSIGN_OR_RETURN(m.embed, ReadMatrix(f, "token_embd.weight", c.vocab_size, H));
  ASSIGN_OR_RETURN(m.final_norm, ReadMatrix(f, "output_norm.weight", 0, H));
  if (c.tie_word_embeddings) {
    m.lm_head = m.embed;
  } else {
    ASSIGN_OR_RETURN(m.lm_head, ReadMatrix(f, "output.weight", c.vocab_size, H));
  }
  for (size_t i = 0; i < L; ++i) {
    const std::string b = absl::StrCat("blk.", i, ".");
    const int64_t hq = heads[i], hkv = kv[i], inter = ff[i];
    LayerWeights l;
    ASSIGN_OR_RETURN(l.attn_norm, ReadMatrix(f, b + "attn_norm.weight", 0, H));
    ASSIGN_OR_RETURN(at::Tensor q, ReadMatrix(f, b + "attn_q.weight", hq * hd, H));
    ASSIGN_OR_RETURN(at::Tensor k, ReadMatrix(f, b + "attn_k.weight", hkv * hd, H));
    l.q = FromInterleaved(q, hq, hd);
    l.k = FromInterleaved(k, hkv, hd);
    ASSIGN_OR_RETURN(l.v, ReadMatrix(f, b + "attn_v.weight", hkv * hd, H));
    ASSIGN_OR_RETURN(l.o, ReadMatrix(f, b + "attn_output.weight", H, hq * hd));
    ASSIGN_OR_RETURN(at::Tensor qb, ReadOptionalVector(f, b + "attn_q.bias", hq * hd));
    ASSIGN_OR_RETURN(at::Tensor kb, ReadOptionalVector(f, b + "attn_k.bias", hkv * hd));
    if (qb.defined()) l.q_bias = FromInterleaved(qb, hq, hd);
    if (kb.defined()) l.k_bias = FromInterleaved(kb, hkv, hd);
    ASSIGN_OR_RETURN(l.v_bias, ReadOptionalVector(f, b + "attn_v.bias", hkv * hd));
    ASSIGN_OR_RETURN(l.o_bias, ReadOptionalVector(f, b + "attn_output.bias", H));
    ASSIGN_OR_RETURN(l.mlp_norm, ReadMatrix(f, b + "ffn_norm.weight", 0, H));
    ASSIGN_OR_RETURN(l.gate, ReadMatrix(f, b + "ffn_gate.weight", inter, H));
    ASSIGN_OR_RETURN(l.up, ReadMatrix(f, b + "ffn_up.weight", inter, H));
    ASSIGN_OR_RETURN(l.down, ReadMatrix(f, b + "ffn_down.weight", H, inter));
    ASSIGN_OR_RETURN(l.gate_bias, ReadOptionalVector(f, b + "ffn_gate.bias", inter));
    ASSIGN_OR_RETURN(l.up_bias, ReadOptionalVector(f, b + "ffn_up.bias", inter));
    ASSIGN_OR_RETURN(l.down_bias, ReadOptionalVector(f, b + "ffn_down.bias", H));
    m.layers.push_back(std::move(l));
  }
  m.config = c;
  m.SyncConfigWithWeights();
  RETURN_IF_ERROR(ValidateModelConfig(m.config));
  return m;
}

}  // namespace amoeba
