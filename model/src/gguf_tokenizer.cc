#include "model/gguf_tokenizer.h"

#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "model/file_util.h"
#include "model/status_macros.h"

namespace amoeba {
namespace fs = std::filesystem;

namespace {

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

}  // namespace

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

}  // namespace amoeba
