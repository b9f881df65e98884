#include "model/gguf_model.h"

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "model/file_util.h"
#include "model/gguf.h"
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
struct Piece {
  std::string text;
  float score = 0;
  int32_t type = 1;  // NORMAL
};

absl::StatusOr<std::vector<Piece>> ReadSentencePiecePieces(const std::string& path) {
  ASSIGN_OR_RETURN(std::string bytes, ReadFile(path));
  size_t pos = 0;
  auto bad = [&] { return absl::InvalidArgumentError(absl::StrCat(path, ": corrupt model")); };
  auto varint = [&](const std::string& s, size_t& p, uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64 && p < s.size(); shift += 7) {
      const uint8_t b = static_cast<uint8_t>(s[p++]);
      *v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if (!(b & 0x80)) return true;
    }
    return false;
  };
  auto skip = [&](const std::string& s, size_t& p, uint32_t wire) {
    uint64_t n = 0;
    switch (wire) {
      case 0:
        return varint(s, p, &n);
      case 1:
        p += 8;
        return p <= s.size();
      case 2:
        if (!varint(s, p, &n) || n > s.size() - p) return false;
        p += n;
        return true;
      case 5:
        p += 4;
        return p <= s.size();
      default:
        return false;
    }
  };
  std::vector<Piece> pieces;
  while (pos < bytes.size()) {
    uint64_t key = 0;
    if (!varint(bytes, pos, &key)) return bad();
    if ((key >> 3) != 1 || (key & 7) != 2) {
      if (!skip(bytes, pos, key & 7)) return bad();
      continue;
    }
    uint64_t len = 0;
    if (!varint(bytes, pos, &len) || len > bytes.size() - pos) return bad();
    const std::string msg = bytes.substr(pos, len);
    pos += len;
    Piece piece;
    size_t p = 0;
    while (p < msg.size()) {
      uint64_t k = 0;
      if (!varint(msg, p, &k)) return bad();
      const uint64_t field = k >> 3, wire = k & 7;
      if (field == 1 && wire == 2) {
        uint64_t n = 0;
        if (!varint(msg, p, &n) || n > msg.size() - p) return bad();
        piece.text = msg.substr(p, n);
        p += n;
      } else if (field == 2 && wire == 5) {
        if (msg.size() - p < 4) return bad();
        std::memcpy(&piece.score, msg.data() + p, 4);
        p += 4;
      } else if (field == 3 && wire == 0) {
        uint64_t t = 0;
        if (!varint(msg, p, &t)) return bad();
        piece.type = static_cast<int32_t>(t);
      } else if (!skip(msg, p, static_cast<uint32_t>(wire))) {
        return bad();
      }
    }
    pieces.push_back(std::move(piece));
  }
  if (pieces.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no pieces"));
  return pieces;
}

absl::Status AddTokenizer(const Model& m, const std::string& dir, bool embed, GgufWriter& w) {
  const fs::path spm = fs::path(dir) / "tokenizer.model", hf = fs::path(dir) / "tokenizer.json";
  const int64_t vocab = m.config.vocab_size;
  if (fs::exists(spm)) {
    ASSIGN_OR_RETURN(std::vector<Piece> pieces, ReadSentencePiecePieces(spm.string()));
    std::vector<std::string> tokens;
    std::vector<float> scores;
    std::vector<int32_t> types;
    for (const Piece& p : pieces) {
      tokens.push_back(p.text);
      scores.push_back(p.score);
      types.push_back(p.type);
    }
    for (int64_t i = static_cast<int64_t>(tokens.size()); i < vocab; ++i) {  // padded vocab
      tokens.push_back(absl::StrCat("[PAD", i, "]"));
      scores.push_back(-1000.f);
      types.push_back(5);  // UNUSED
    }
    ASSIGN_OR_RETURN(std::string original, ReadFile(spm.string()));
    if (embed) w.SetU8Array("amoeba.tokenizer.model", original);
    w.SetString("tokenizer.ggml.model", "llama");
    w.SetStringArray("tokenizer.ggml.tokens", tokens);
    w.SetF32Array("tokenizer.ggml.scores", scores);
    w.SetI32Array("tokenizer.ggml.token_type", types);
  } else if (fs::exists(hf)) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(hf.string()));
    const nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.contains("model") || !j["model"].contains("vocab"))
      return absl::InvalidArgumentError(absl::StrCat(hf.string(), ": not a BPE tokenizer.json"));
    std::vector<std::string> tokens(vocab);
    std::vector<int32_t> types(vocab, 1);
    std::vector<bool> seen(vocab, false);
    for (auto& [tok, id] : j["model"]["vocab"].items()) {
      const int64_t i = id.get<int64_t>();
      if (i < 0 || i >= vocab) continue;
      tokens[i] = tok;
      seen[i] = true;
    }
    for (const auto& a : j.value("added_tokens", nlohmann::json::array())) {
      const int64_t i = a.value("id", int64_t{-1});
      if (i < 0 || i >= vocab) continue;
      tokens[i] = a.value("content", std::string());
      seen[i] = true;
      types[i] = a.value("special", false) ? 3 : 4;  // CONTROL : USER_DEFINED
    }
    for (int64_t i = 0; i < vocab; ++i)
      if (!seen[i]) {
        tokens[i] = absl::StrCat("[PAD", i, "]");
        types[i] = 5;
      }
    std::vector<std::string> merges;
    for (const auto& mg : j["model"].value("merges", nlohmann::json::array()))
      merges.push_back(mg.is_string()
                           ? mg.get<std::string>()
                           : absl::StrCat(mg[0].get<std::string>(), " ", mg[1].get<std::string>()));
    if (embed) w.SetString("amoeba.tokenizer.json", text);
    w.SetString("tokenizer.ggml.model", "gpt2");
    w.SetString("tokenizer.ggml.pre", "default");
    w.SetStringArray("tokenizer.ggml.tokens", tokens);
    w.SetI32Array("tokenizer.ggml.token_type", types);
    w.SetStringArray("tokenizer.ggml.merges", merges);
  } else {
    return absl::NotFoundError(absl::StrCat(dir, ": no tokenizer.model or tokenizer.json"));
  }
  w.SetU32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(m.config.bos_token_id));
  if (!m.config.eos_token_ids.empty())
    w.SetU32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(m.config.eos_token_ids[0]));
  w.SetBool("tokenizer.ggml.add_bos_token", true);
  return absl::OkStatus();
}

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

bool IsGgufPath(const std::string& path) {
  return absl::EndsWith(path, ".gguf");
}

absl::StatusOr<Model> LoadModelOrGguf(const std::string& path) {
  return IsGgufPath(path) ? LoadGgufModel(path) : LoadModel(path);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadModelTokenizer(const std::string& model_path,
                                                              const std::string& tokenizer_dir) {
  if (!tokenizer_dir.empty()) return LoadTokenizer(tokenizer_dir);
  return IsGgufPath(model_path) ? LoadGgufTokenizer(model_path) : LoadTokenizer(model_path);
}

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

namespace {

void PutVarint(std::string* out, uint64_t v) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

void PutField(std::string* out, uint32_t field, const std::string& bytes) {  // length-delimited
  PutVarint(out, (field << 3) | 2);
  PutVarint(out, bytes.size());
  out->append(bytes);
}

void PutVarintField(std::string* out, uint32_t field, uint64_t v) {
  PutVarint(out, field << 3);
  PutVarint(out, v);
}

// SentencePiece's ModelProto for llama.cpp's "llama" vocabulary: pieces (1), trainer_spec (2:
// model_type BPE, byte_fallback), normalizer_spec (3: identity, dummy prefix, escaped spaces).
absl::StatusOr<std::string> SentencePieceModelFrom(const GgufFile& f) {
  const auto& tokens = f.meta.at("tokenizer.ggml.tokens").array;
  auto scores = f.meta.find("tokenizer.ggml.scores");
  auto types = f.meta.find("tokenizer.ggml.token_type");
  std::string proto;
  for (size_t i = 0; i < tokens.size(); ++i) {
    std::string piece;
    PutField(&piece, 1, tokens[i].s);
    const float score = scores != f.meta.end() && i < scores->second.array.size()
                            ? static_cast<float>(scores->second.array[i].f)
                            : 0.f;
    PutVarint(&piece, (2 << 3) | 5);
    piece.append(reinterpret_cast<const char*>(&score), 4);
    const int64_t type =
        types != f.meta.end() && i < types->second.array.size() ? types->second.array[i].i : 1;
    PutVarintField(&piece, 3, static_cast<uint64_t>(type));
    PutField(&proto, 1, piece);
  }
  std::string trainer;
  PutVarintField(&trainer, 3, 2);  // model_type: BPE
  PutVarintField(&trainer, 4, tokens.size());
  PutVarintField(&trainer, 35, 1);  // byte_fallback
  PutField(&proto, 2, trainer);
  std::string normalizer;
  PutField(&normalizer, 1, "identity");
  PutVarintField(&normalizer, 3, 1);  // add_dummy_prefix
  PutVarintField(&normalizer, 4, 0);  // remove_extra_whitespaces
  PutVarintField(&normalizer, 5, 1);  // escape_whitespaces
  PutField(&proto, 3, normalizer);
  return proto;
}

std::string BpeJsonFrom(const GgufFile& f) {
  nlohmann::json vocab = nlohmann::json::object(), added = nlohmann::json::array();
  const auto& tokens = f.meta.at("tokenizer.ggml.tokens").array;
  auto types = f.meta.find("tokenizer.ggml.token_type");
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int64_t type =
        types != f.meta.end() && i < types->second.array.size() ? types->second.array[i].i : 1;
    if (type == 3 || type == 4) {
      added.push_back({{"id", i}, {"content", tokens[i].s}, {"special", type == 3}});
    } else {
      vocab[tokens[i].s] = i;
    }
  }
  nlohmann::json merges = nlohmann::json::array();
  if (auto m = f.meta.find("tokenizer.ggml.merges"); m != f.meta.end())
    for (const GgufValue& v : m->second.array) merges.push_back(v.s);
  nlohmann::json j = {
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}},
      {"added_tokens", added},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}}};
  return j.dump();
}

}  // namespace

// The tokenizer file of a GGUF file: its name (tokenizer.model / tokenizer.json) and contents.
absl::StatusOr<std::pair<std::string, std::string>> GgufTokenizerFile(const std::string& path) {
  ASSIGN_OR_RETURN(GgufFile f, ReadGguf(path));
  if (auto it = f.meta.find("amoeba.tokenizer.model"); it != f.meta.end()) {
    std::string contents;
    for (const GgufValue& b : it->second.array) contents.push_back(static_cast<char>(b.u));
    return std::make_pair(std::string("tokenizer.model"), contents);
  }
  if (auto js = f.meta.find("amoeba.tokenizer.json"); js != f.meta.end())
    return std::make_pair(std::string("tokenizer.json"), js->second.s);
  auto kind = f.GetString("tokenizer.ggml.model");
  if (!kind.ok() || !f.meta.count("tokenizer.ggml.tokens"))
    return absl::NotFoundError(absl::StrCat(path, ": no tokenizer in the file"));
  if (*kind == "llama") {
    ASSIGN_OR_RETURN(std::string proto, SentencePieceModelFrom(f));
    return std::make_pair(std::string("tokenizer.model"), proto);
  }
  if (*kind == "gpt2") return std::make_pair(std::string("tokenizer.json"), BpeJsonFrom(f));
  return absl::UnimplementedError(
      absl::StrCat(path, ": tokenizer.ggml.model ", *kind, " (llama and gpt2 are read)"));
}

absl::Status WriteGgufTokenizer(const std::string& path, const std::string& dir) {
  ASSIGN_OR_RETURN(auto file, GgufTokenizerFile(path));
  return WriteFileAtomic((fs::path(dir) / file.first).string(), file.second);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadGgufTokenizer(const std::string& path) {
  // The tokenizer loaders read files: a private temporary directory, removed after loading.
  std::string tmpl = (fs::temp_directory_path() / "amoeba-gguf-tok-XXXXXX").string();
  if (!mkdtemp(tmpl.data())) return absl::InternalError("cannot create a temporary directory");
  absl::Status st = WriteGgufTokenizer(path, tmpl);
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok =
      st.ok() ? LoadTokenizer(tmpl) : absl::StatusOr<std::unique_ptr<Tokenizer>>(st);
  std::error_code ec;
  fs::remove_all(tmpl, ec);
  if (!tok.ok() && st.ok())
    return absl::InvalidArgumentError(absl::StrCat(path, ": tokenizer: ", tok.status().message()));
  return tok;
}

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
