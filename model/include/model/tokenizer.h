// Tokenizers: SentencePiece (tokenizer.model) and Hugging Face byte-level BPE (tokenizer.json),
// behind one interface, plus a streaming decoder that never emits half a UTF-8 character.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace amoeba {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Token ids of `text`, without BOS (callers add it when the model wants one).
  virtual std::vector<int32_t> Encode(std::string_view text) const = 0;
  virtual int64_t vocab_size() const = 0;
  // The raw bytes a token stands for ("" for control/special tokens).
  virtual const std::string& TokenBytes(int32_t id) const = 0;
  // SentencePiece adds a dummy leading space when encoding and strips it when decoding.
  virtual bool strips_leading_space() const { return false; }
  virtual std::string kind() const = 0;

  // Decodes ids to text; invalid UTF-8 becomes U+FFFD.
  std::string Decode(std::span<const int32_t> ids) const;
};

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePiece(const std::string& model_path);
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadBpeTokenizerJson(const std::string& json_path);
// tokenizer.model if present, else tokenizer.json.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& dir);

// Copies the tokenizer files that exist in `src_dir` (tokenizer.model / .json, tokenizer and
// generation configs) into `dst_dir`.
absl::Status CopyTokenizerFiles(const std::string& src_dir, const std::string& dst_dir);

// Length of the longest prefix of `s` that is complete, valid UTF-8, and whether the rest could
// still become valid (an incomplete trailing sequence) rather than being invalid.
size_t CompleteUtf8Prefix(std::string_view s, bool* incomplete_tail);
bool IsValidUtf8(std::string_view s);

// Feeds token ids one by one and returns the text that became complete.
class StreamingDecoder {
 public:
  // `at_text_start`: the first token begins the text (SentencePiece then drops its leading space);
  // false when continuing a prompt, whose next word keeps its space.
  explicit StreamingDecoder(const Tokenizer& tok, bool at_text_start = true)
      : tok_(tok), at_start_(at_text_start) {}
  // Text that became complete with this token (may be empty). Valid until the next call.
  std::string_view Push(int32_t id);
  // Whatever is left (an incomplete tail becomes U+FFFD).
  std::string Flush();
  const std::string& text() const { return text_; }
  void Reset(bool at_text_start = true);

 private:
  const Tokenizer& tok_;
  std::string pending_;  // bytes not yet emitted
  std::string delta_;
  std::string text_;  // everything emitted so far
  bool at_start_ = true;
};

}  // namespace amoeba
