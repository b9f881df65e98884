#include "model/tokenizer.h"

#include <filesystem>

#include "absl/strings/str_cat.h"

namespace amoeba {
namespace fs = std::filesystem;

namespace {
constexpr std::string_view kReplacement = "\xEF\xBF\xBD";

// Bytes in a sequence starting with `c`, or 0 if `c` cannot start one.
int SeqLen(unsigned char c) {
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return 2;
  if (c >= 0xE0 && c <= 0xEF) return 3;
  if (c >= 0xF0 && c <= 0xF4) return 4;
  return 0;
}

// Checks continuation bytes (including the overlong/surrogate rules for the second byte).
bool ValidAt(std::string_view s, size_t i, int len, size_t avail) {
  const unsigned char c = s[i];
  for (int k = 1; k < len && k < static_cast<int>(avail); ++k) {
    const unsigned char d = s[i + k];
    if ((d & 0xC0) != 0x80) return false;
    if (k == 1) {
      if (c == 0xE0 && d < 0xA0) return false;
      if (c == 0xED && d > 0x9F) return false;
      if (c == 0xF0 && d < 0x90) return false;
      if (c == 0xF4 && d > 0x8F) return false;
    }
  }
  return true;
}

// Appends `s` to `out` with every invalid sequence replaced by U+FFFD.
void AppendSanitized(std::string_view s, std::string* out) {
  size_t i = 0;
  while (i < s.size()) {
    const int len = SeqLen(static_cast<unsigned char>(s[i]));
    if (len == 0 || i + len > s.size() || !ValidAt(s, i, len, len)) {
      out->append(kReplacement);
      ++i;
      continue;
    }
    out->append(s.substr(i, len));
    i += len;
  }
}
}  // namespace

size_t CompleteUtf8Prefix(std::string_view s, bool* incomplete_tail) {
  size_t i = 0;
  *incomplete_tail = false;
  while (i < s.size()) {
    const int len = SeqLen(static_cast<unsigned char>(s[i]));
    if (len == 0) return i;
    if (i + len > s.size()) {
      *incomplete_tail = ValidAt(s, i, len, s.size() - i);
      return i;
    }
    if (!ValidAt(s, i, len, len)) return i;
    i += len;
  }
  return i;
}

bool IsValidUtf8(std::string_view s) {
  bool tail = false;
  return CompleteUtf8Prefix(s, &tail) == s.size();
}

std::string Tokenizer::Decode(std::span<const int32_t> ids) const {
  std::string bytes;
  for (int32_t id : ids) bytes += TokenBytes(id);
  if (strips_leading_space() && !bytes.empty() && bytes[0] == ' ') bytes.erase(0, 1);
  std::string out;
  AppendSanitized(bytes, &out);
  return out;
}

std::string_view StreamingDecoder::Push(int32_t id) {
  delta_.clear();
  const std::string& b = tok_.TokenBytes(id);
  if (b.empty()) return delta_;
  pending_ += b;
  if (at_start_ && tok_.strips_leading_space() && pending_[0] == ' ') pending_.erase(0, 1);
  at_start_ = false;
  for (;;) {
    bool tail = false;
    const size_t ok = CompleteUtf8Prefix(pending_, &tail);
    delta_.append(pending_, 0, ok);
    pending_.erase(0, ok);
    if (pending_.empty() || tail) break;
    // An invalid byte: replace it and continue after it.
    delta_.append(kReplacement);
    pending_.erase(0, 1);
  }
  text_ += delta_;
  return delta_;
}

std::string StreamingDecoder::Flush() {
  std::string out;
  AppendSanitized(pending_, &out);
  pending_.clear();
  text_ += out;
  return out;
}

void StreamingDecoder::Reset(bool at_text_start) {
  pending_.clear();
  text_.clear();
  delta_.clear();
  at_start_ = at_text_start;
}

absl::Status CopyTokenizerFiles(const std::string& src_dir, const std::string& dst_dir) {
  for (const char* f : {"tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json", "generation_config.json"}) {
    const fs::path src = fs::path(src_dir) / f;
    if (!fs::exists(src)) continue;
    std::error_code ec;
    fs::copy_file(src, fs::path(dst_dir) / f, fs::copy_options::overwrite_existing, ec);
    if (ec) return absl::InternalError(absl::StrCat("copy ", src.string(), ": ", ec.message()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& dir) {
  const fs::path sp = fs::path(dir) / "tokenizer.model";
  const fs::path js = fs::path(dir) / "tokenizer.json";
  if (fs::exists(sp)) return LoadSentencePiece(sp.string());
  if (fs::exists(js)) return LoadBpeTokenizerJson(js.string());
  return absl::NotFoundError(absl::StrCat(dir, ": no tokenizer.model or tokenizer.json"));
}

}  // namespace amoeba
