// SentencePiece tokenizer.model through libsentencepiece.
#include "absl/strings/str_cat.h"
#include "sentencepiece_bridge.h"
#include "model/tokenizer.h"

namespace amoeba {
namespace {

class SentencePieceTokenizer : public Tokenizer {
 public:
  absl::Status Init(const std::string& path) {
    std::string err;
    if (!sp_.Load(path, &err)) return absl::InvalidArgumentError(absl::StrCat(path, ": ", err));
    const int n = sp_.size();
    bytes_.resize(n);
    for (int i = 0; i < n; ++i) {
      if (sp_.IsControl(i)) {
        const std::string piece = sp_.IdToPiece(i);
        if (!piece.empty()) controls_.push_back({piece, i});
        continue;
      }
      if (sp_.IsUnknown(i)) {
        bytes_[i] = " \xE2\x81\x87 ";  // what SentencePiece decodes <unk> to
        continue;
      }
      const std::string piece = sp_.IdToPiece(i);
      if (sp_.IsByte(i)) {
        bytes_[i] = std::string(1, static_cast<char>(std::stoi(piece.substr(3, 2), nullptr, 16)));
        continue;
      }
      std::string b;
      for (size_t k = 0; k < piece.size();) {
        if (piece.compare(k, 3, "\xE2\x96\x81") == 0) {  // U+2581 "▁" → space
          b.push_back(' ');
          k += 3;
        } else {
          b.push_back(piece[k++]);
        }
      }
      bytes_[i] = std::move(b);
    }
    // The normalizer spec is not exposed without the protobuf header: probe for the dummy prefix.
    const std::vector<int> probe = sp_.Encode("a");
    strip_ = !probe.empty() && !bytes_[probe[0]].empty() && bytes_[probe[0]][0] == ' ';
    return absl::OkStatus();
  }

  // Control pieces written in the text (a chat template's "</s><s>") are those tokens, as
  // transformers' tokenizers split them out; the text between is encoded piece by piece.
  std::vector<int32_t> Encode(std::string_view text) const override {
    std::vector<int32_t> out;
    size_t from = 0;
    auto encode = [&](std::string_view part) {
      if (part.empty()) return;
      const std::vector<int> ids = sp_.Encode(part);
      out.insert(out.end(), ids.begin(), ids.end());
    };
    for (size_t at = 0; at < text.size();) {
      const std::pair<std::string, int>* hit = nullptr;
      if (text[at] == '<' || text[at] == '[')
        for (const auto& c : controls_)
          if (text.compare(at, c.first.size(), c.first) == 0 &&
              (!hit || c.first.size() > hit->first.size()))
            hit = &c;
      if (!hit) {
        ++at;
        continue;
      }
      encode(text.substr(from, at - from));
      out.push_back(hit->second);
      at += hit->first.size();
      from = at;
    }
    encode(text.substr(from));
    return out;
  }
  int64_t vocab_size() const override { return sp_.size(); }
  const std::string& TokenBytes(int32_t id) const override {
    static const std::string empty;
    return id >= 0 && id < static_cast<int32_t>(bytes_.size()) ? bytes_[id] : empty;
  }
  bool strips_leading_space() const override { return strip_; }
  std::string kind() const override { return "sentencepiece"; }

 private:
  sp::Processor sp_;
  std::vector<std::string> bytes_;
  std::vector<std::pair<std::string, int>> controls_;  // control pieces' text, id
  bool strip_ = true;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePiece(const std::string& model_path) {
  auto t = std::make_unique<SentencePieceTokenizer>();
  auto st = t->Init(model_path);
  if (!st.ok()) return st;
  return std::unique_ptr<Tokenizer>(std::move(t));
}

}  // namespace amoeba
