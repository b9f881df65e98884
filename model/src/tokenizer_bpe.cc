// Hugging Face tokenizer.json with a byte-level BPE model (GPT-2 / Llama-3 style): added tokens are
// split out first, the pre-tokenizer regex (run by PCRE2 with Unicode properties) cuts the text,
// bytes map to printable code points, and merges apply by rank.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <climits>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "model/file_util.h"
#include "model/status_macros.h"
#include "model/tokenizer.h"

namespace amoeba {
namespace {
using nlohmann::json;

constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256+n.
std::vector<std::string> ByteToUnicode() {
  std::vector<std::string> table(256);
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    AppendUtf8(keep ? b : 256 + n++, &table[b]);
  }
  return table;
}

class Regex {
 public:
  ~Regex() {
    if (md_) pcre2_match_data_free(md_);
    if (code_) pcre2_code_free(code_);
  }
  absl::Status Compile(const std::string& pattern) {
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                          PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof(msg));
      return absl::InvalidArgumentError(
          absl::StrCat("pre-tokenizer regex: ", reinterpret_cast<char*>(msg), " at ", off));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);
    md_ = pcre2_match_data_create_from_pattern(code_, nullptr);
    return absl::OkStatus();
  }
  // Splits `s` into matches and the gaps between them ("Isolated" behaviour).
  void Split(std::string_view s, std::vector<std::string_view>* out) const {
    std::lock_guard<std::mutex> lock(mu_);
    size_t pos = 0, last = 0;
    while (pos <= s.size()) {
      int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos,
                           PCRE2_NO_UTF_CHECK, md_, nullptr);
      if (rc < 0) break;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md_);
      size_t b = ov[0], e = ov[1];
      if (e == b) {  // empty match: step one code point
        pos = b + 1;
        while (pos < s.size() && (static_cast<unsigned char>(s[pos]) & 0xC0) == 0x80) ++pos;
        continue;
      }
      if (b > last) out->push_back(s.substr(last, b - last));
      out->push_back(s.substr(b, e - b));
      pos = last = e;
    }
    if (last < s.size()) out->push_back(s.substr(last));
  }

 private:
  pcre2_code* code_ = nullptr;
  pcre2_match_data* md_ = nullptr;
  mutable std::mutex mu_;  // match data is per call site; serialise (encoding is not hot)
};

class BpeTokenizer : public Tokenizer {
 public:
  absl::Status Init(const std::string& path) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(path));
    json j = json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.is_object())
      return absl::InvalidArgumentError(path + ": invalid JSON");
    const json& model = j.value("model", json::object());
    if (model.value("type", std::string("BPE")) != "BPE" || !model.contains("vocab")) {
      return absl::UnimplementedError(path + ": only BPE tokenizer.json models are supported");
    }
    ignore_merges_ = model.value("ignore_merges", false);
    int64_t max_id = -1;
    for (auto& [tok, id] : model["vocab"].items()) {
      vocab_[tok] = id.get<int32_t>();
      max_id = std::max<int64_t>(max_id, id.get<int32_t>());
    }
    int rank = 0;
    for (const auto& m : model.value("merges", json::array())) {
      std::string a, b;
      if (m.is_string()) {
        const std::string s = m.get<std::string>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos)
          return absl::InvalidArgumentError(path + ": bad merge '" + s + "'");
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else if (m.is_array() && m.size() == 2) {
        a = m[0].get<std::string>();
        b = m[1].get<std::string>();
      } else {
        return absl::InvalidArgumentError(path + ": bad merge entry");
      }
      merges_[a + '\x01' + b] = rank++;
    }
    for (const auto& at : j.value("added_tokens", json::array())) {
      const std::string content = at.value("content", "");
      const int32_t id = at.value("id", -1);
      if (content.empty() || id < 0) continue;
      added_.push_back({content, id, at.value("special", false)});
      max_id = std::max<int64_t>(max_id, id);
    }
    // Longest first, so that overlapping added tokens match greedily.
    std::sort(added_.begin(), added_.end(),
              [](const Added& x, const Added& y) { return x.content.size() > y.content.size(); });
    RETURN_IF_ERROR(ParsePreTokenizer(j.value("pre_tokenizer", json())));

    byte_map_ = ByteToUnicode();
    std::unordered_map<std::string, int> inverse;
    for (int b = 0; b < 256; ++b) inverse[byte_map_[b]] = b;
    bytes_.assign(max_id + 1, "");
    for (auto& [tok, id] : vocab_) {
      std::string raw;
      for (size_t k = 0; k < tok.size();) {
        const size_t len = std::max<size_t>(1, Utf8Len(static_cast<unsigned char>(tok[k])));
        auto it = inverse.find(tok.substr(k, len));
        if (it == inverse.end()) {
          raw += tok.substr(k, len);  // not byte-level encoded: keep as is
        } else {
          raw.push_back(static_cast<char>(it->second));
        }
        k += len;
      }
      bytes_[id] = std::move(raw);
    }
    for (const auto& a : added_) bytes_[a.id] = a.special ? "" : a.content;
    return absl::OkStatus();
  }

  std::vector<int32_t> Encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    // Split out added tokens first.
    size_t start = 0;
    for (size_t i = 0; i < text.size();) {
      const Added* hit = nullptr;
      for (const auto& a : added_) {
        if (text.compare(i, a.content.size(), a.content) == 0) {
          hit = &a;
          break;
        }
      }
      if (!hit) {
        ++i;
        continue;
      }
      EncodePlain(text.substr(start, i - start), &ids);
      ids.push_back(hit->id);
      i += hit->content.size();
      start = i;
    }
    EncodePlain(text.substr(start), &ids);
    return ids;
  }
  int64_t vocab_size() const override { return static_cast<int64_t>(bytes_.size()); }
  const std::string& TokenBytes(int32_t id) const override {
    static const std::string empty;
    return id >= 0 && id < static_cast<int32_t>(bytes_.size()) ? bytes_[id] : empty;
  }
  std::string kind() const override { return "bpe"; }

 private:
  struct Added {
    std::string content;
    int32_t id;
    bool special;
  };

  static int Utf8Len(unsigned char c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

  absl::Status ParsePreTokenizer(const json& p) {
    if (p.is_null()) return absl::OkStatus();
    const std::string type = p.value("type", "");
    if (type == "Sequence") {
      for (const auto& sub : p.value("pretokenizers", json::array()))
        RETURN_IF_ERROR(ParsePreTokenizer(sub));
      return absl::OkStatus();
    }
    if (type == "ByteLevel") {
      add_prefix_space_ = p.value("add_prefix_space", false);
      if (p.value("use_regex", true)) return AddRegex(kGpt2Pattern);
      return absl::OkStatus();
    }
    if (type == "Split") {
      if (p.value("behavior", "Isolated") != "Isolated" || p.value("invert", false)) {
        return absl::UnimplementedError(
            "tokenizer.json: only Split with behavior Isolated is supported");
      }
      const json& pat = p.value("pattern", json::object());
      if (pat.contains("Regex")) return AddRegex(pat["Regex"].get<std::string>());
      return absl::UnimplementedError(
          "tokenizer.json: Split with a String pattern is not supported");
    }
    return absl::UnimplementedError(
        absl::StrCat("tokenizer.json: pre_tokenizer ", type, " not supported"));
  }

  absl::Status AddRegex(const std::string& pattern) {
    auto r = std::make_unique<Regex>();
    RETURN_IF_ERROR(r->Compile(pattern));
    regexes_.push_back(std::move(r));
    return absl::OkStatus();
  }

  void EncodePlain(std::string_view text, std::vector<int32_t>* ids) const {
    if (text.empty()) return;
    std::string with_prefix;
    if (add_prefix_space_ && text[0] != ' ') {
      with_prefix.reserve(text.size() + 1);
      with_prefix.push_back(' ');
      with_prefix.append(text.data(), text.size());
      text = with_prefix;
    }
    std::vector<std::string_view> pieces{text};
    for (const auto& r : regexes_) {
      std::vector<std::string_view> next;
      for (auto piece : pieces) r->Split(piece, &next);
      pieces.swap(next);
    }
    for (auto piece : pieces) EncodeWord(piece, ids);
  }

  void EncodeWord(std::string_view word, std::vector<int32_t>* ids) const {
    std::vector<std::string> sym;
    std::string mapped;
    for (unsigned char c : word) {
      sym.push_back(byte_map_[c]);
      mapped += byte_map_[c];
    }
    if (ignore_merges_) {
      if (auto it = vocab_.find(mapped); it != vocab_.end()) {
        ids->push_back(it->second);
        return;
      }
    }
    // Merge the lowest-ranked adjacent pair until none applies.
    while (sym.size() > 1) {
      int best = INT_MAX;
      size_t at = 0;
      for (size_t i = 0; i + 1 < sym.size(); ++i) {
        auto it = merges_.find(sym[i] + '\x01' + sym[i + 1]);
        if (it != merges_.end() && it->second < best) {
          best = it->second;
          at = i;
        }
      }
      if (best == INT_MAX) break;
      sym[at] += sym[at + 1];
      sym.erase(sym.begin() + at + 1);
    }
    for (const auto& s : sym) {
      auto it = vocab_.find(s);
      if (it != vocab_.end()) {
        ids->push_back(it->second);
      } else {
        // Unknown symbol: fall back to its single bytes when they are in the vocabulary.
        for (size_t k = 0; k < s.size();) {
          const size_t len = Utf8Len(static_cast<unsigned char>(s[k]));
          auto b = vocab_.find(s.substr(k, len));
          if (b != vocab_.end()) ids->push_back(b->second);
          k += len;
        }
      }
    }
  }

  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<std::string, int> merges_;
  std::vector<Added> added_;
  std::vector<std::unique_ptr<Regex>> regexes_;
  std::vector<std::string> byte_map_;
  std::vector<std::string> bytes_;
  bool add_prefix_space_ = false;
  bool ignore_merges_ = false;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadBpeTokenizerJson(const std::string& json_path) {
  auto t = std::make_unique<BpeTokenizer>();
  auto st = t->Init(json_path);
  if (!st.ok()) return st;
  return std::unique_ptr<Tokenizer>(std::move(t));
}

}  // namespace amoeba
