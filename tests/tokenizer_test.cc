// Tokenizers built by the test itself: a byte-level BPE tokenizer.json with known merges, and a
// SentencePiece model trained here with libsentencepiece.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "model/file_util.h"
#include "model/presets.h"
#include "model/tokenizer.h"
#include "model/tokenizer_train.h"
#include "tests/test_util.h"

namespace amoeba {
namespace tokenizer_test {  // named: a unity build joins test files
using nlohmann::json;
using testing::TempDir;

std::string ByteSymbol(int b) {  // GPT-2 bytes_to_unicode, written out for the test
  int n = 0, cp = -1;
  for (int x = 0; x < 256; ++x) {
    const bool keep = (x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255);
    const int c = keep ? x : 256 + n++;
    if (x == b) cp = c;
  }
  std::string s;
  if (cp < 0x80)
    s.push_back(static_cast<char>(cp));
  else {
    s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return s;
}

// ids 0..255 = bytes; merges: h e, l l, he ll, Ġ w, o r → ids 256..260; <|end|> = 261.
std::string WriteTestBpe(const TempDir& dir) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[ByteSymbol(b)] = b;
  const std::string G = ByteSymbol(' ');
  vocab["he"] = 256;
  vocab["ll"] = 257;
  vocab["hell"] = 258;
  vocab[G + "w"] = 259;
  vocab["or"] = 260;
  json j = {
      {"added_tokens", {{{"id", 261}, {"content", "<|end|>"}, {"special", true}}}},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"},
           {"pattern",
            {{"Regex",
              R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)"}}},
           {"behavior", "Isolated"},
           {"invert", false}},
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}}},
      {"model",
       {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"h e", "l l", "he ll", G + " w", "o r"}}}}};
  const std::string p = dir.file("tokenizer.json");
  EXPECT_TRUE(WriteFileAtomic(p, j.dump()).ok());
  return p;
}

TEST(BpeTokenizerTest, KnownIdsForKnownStrings) {
  TempDir dir;
  auto tok = LoadBpeTokenizerJson(WriteTestBpe(dir));
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->Encode("hello world"), (std::vector<int32_t>{258, 'o', 259, 260, 'l', 'd'}));
  // Contractions and digits are split by the pre-tokenizer: "'s" is its own piece.
  EXPECT_EQ((*tok)->Encode("he's"), (std::vector<int32_t>{256, '\'', 's'}));
  // Added tokens are matched before the regex and map to their id.
  EXPECT_EQ((*tok)->Encode("hell<|end|>or"), (std::vector<int32_t>{258, 261, 260}));
  EXPECT_EQ((*tok)->TokenBytes(261), "");  // special tokens decode to nothing
  EXPECT_EQ((*tok)->TokenBytes(259), " w");
}

TEST(BpeTokenizerTest, UnicodeRoundTrip) {
  TempDir dir;
  auto tok = LoadBpeTokenizerJson(WriteTestBpe(dir));
  ASSERT_TRUE(tok.ok());
  for (std::string s :
       {"héllo wörld — 日本語のテキスト 🙂🚀", "tabs\tand\n\nnewlines  spaces ",
        "don't 123456 x²", "Ελληνικά кириллица عربى"}) {
    auto ids = (*tok)->Encode(s);
    EXPECT_EQ((*tok)->Decode(ids), s);
  }
}

TEST(StreamingDecoderTest, NeverEmitsHalfACharacter) {
  TempDir dir;
  ASSERT_TRUE(WriteByteTokenizer(dir.path()).ok());
  auto tok = LoadTokenizer(dir.path());
  ASSERT_TRUE(tok.ok());
  const std::string s = "añ日🙂b";
  auto ids = (*tok)->Encode(s);
  EXPECT_EQ(ids.size(), s.size());  // byte tokenizer: one token per byte
  StreamingDecoder dec(**tok);
  std::string joined;
  int empty_steps = 0;
  for (int32_t id : ids) {
    std::string_view d = dec.Push(id);
    EXPECT_TRUE(IsValidUtf8(d)) << "delta is not valid UTF-8";
    if (d.empty()) ++empty_steps;
    joined += d;
  }
  joined += dec.Flush();
  EXPECT_EQ(joined, s);
  EXPECT_EQ(empty_steps, 1 + 2 + 3);  // bytes held back inside ñ, 日, 🙂
  // An invalid byte becomes U+FFFD instead of being emitted raw; an unfinished tail too.
  StreamingDecoder bad(**tok);
  std::string out(bad.Push(3 + 0xFF));
  out += bad.Push(3 + 'a');
  out += bad.Push(3 + 0xE6);
  out += bad.Flush();
  EXPECT_EQ(out,
            "\xEF\xBF\xBD"
            "a"
            "\xEF\xBF\xBD");
}

TEST(SentencePieceTest, TrainEncodeDecode) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "no SentencePiece in sanitizer builds (the runtime refuses RTLD_DEEPBIND)";
#endif
  TempDir dir;
  const std::string text = dir.file("corpus.txt");
  {
    std::ofstream f(text);
    const char* words[] = {"the", "cat", "sat",  "on",  "mat", "a",  "dog",
                           "ran", "to",  "park", "and", "big", "red"};
    uint64_t x = 7;
    for (int line = 0; line < 3000; ++line) {
      for (int w = 0; w < 8; ++w) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        f << words[(x >> 33) % 13] << (w < 7 ? " " : ".\n");
      }
    }
  }
  TokenizerTrainOptions o;
  o.vocab_size = 400;
  ASSERT_TRUE(TrainSentencePiece(text, dir.path(), o).ok());
  auto tok = LoadTokenizer(dir.path());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->kind(), "sentencepiece");
  EXPECT_LE((*tok)->vocab_size(), 400);  // a soft limit on a small corpus
  EXPECT_GT((*tok)->vocab_size(), 259);  // bytes + specials + merged pieces
  EXPECT_EQ((*tok)->TokenBytes(1), "");  // <s> is a control token
  // Frequent words become single pieces with the SentencePiece space marker.
  auto ids = (*tok)->Encode("the cat");
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_EQ((*tok)->TokenBytes(ids[0]), " the");
  EXPECT_EQ((*tok)->TokenBytes(ids[1]), " cat");
  EXPECT_TRUE((*tok)->strips_leading_space());
  for (std::string s : {"the big red dog ran to the park.", "ünïcödé 日本 🙂 never seen"}) {
    EXPECT_EQ((*tok)->Decode((*tok)->Encode(s)), s);  // byte fallback covers unseen characters
    StreamingDecoder dec(**tok);
    std::string joined;
    for (int32_t id : (*tok)->Encode(s)) joined += dec.Push(id);
    joined += dec.Flush();
    EXPECT_EQ(joined, s);
  }
  // Control pieces written in the text (a chat template's "</s><s>") are their tokens; the text
  // around them is encoded as it would be alone.
  const std::vector<int32_t> the = (*tok)->Encode("the cat"), dog = (*tok)->Encode("a dog");
  std::vector<int32_t> want = the;
  want.push_back(2);  // </s>
  want.push_back(1);  // <s>
  want.insert(want.end(), dog.begin(), dog.end());
  EXPECT_EQ((*tok)->Encode("the cat</s><s>a dog"), want);
  EXPECT_EQ((*tok)->Encode("<s>"), std::vector<int32_t>{1});
  EXPECT_NE((*tok)->Encode("<sx>"), std::vector<int32_t>{1});  // only whole pieces
}

TEST(TokenizerTest, MissingOrBrokenFilesAreErrors) {
  TempDir dir;
  EXPECT_EQ(LoadTokenizer(dir.path()).status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(WriteFileAtomic(dir.file("tokenizer.json"), "{broken").ok());
  EXPECT_FALSE(LoadTokenizer(dir.path()).ok());
  ASSERT_TRUE(WriteFileAtomic(dir.file("tokenizer.model"), "not a model").ok());
  EXPECT_FALSE(LoadTokenizer(dir.path()).ok());
}

}  // namespace tokenizer_test
}  // namespace amoeba
