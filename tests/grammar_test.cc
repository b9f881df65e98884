// Constrained decoding: the GBNF compiler's language (accepts and rejects), its errors, the
// trie-pruned token masks against a per-token check, and JSON schemas compiled to grammars whose
// random walks always end in JSON that the schema admits.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "model/grammar.h"
#include "model/json_schema_grammar.h"
#include "nlohmann/json.hpp"

namespace amoeba {
namespace grammar_test {  // named: a unity build joins test files

constexpr int32_t kEos = 2;

// Three control tokens (no bytes), the 256 single bytes, then multi-byte pieces: JSON-ish ones
// and random strings over a JSON-ish alphabet (UTF-8 letters included), as a BPE vocabulary has.
class FakeTokenizer : public Tokenizer {
 public:
  explicit FakeTokenizer(uint64_t seed = 7) {
    bytes_ = {"", "", ""};
    for (int b = 0; b < 256; ++b) bytes_.push_back(std::string(1, static_cast<char>(b)));
    for (const char* p :
         {"{\"", "\":", "\": ", "\",", "\"}", "true", "false", "null", " {",   "\n  ",
          "\n",  "  ",  "[\"",  "\"]", "},",  "12",   "0.",    "é",    "中文", " \""})
      bytes_.push_back(p);
    const std::vector<std::string> alphabet = {"{",  "}", "[",  "]", "\"", ":", ",", " ", "\n",
                                               "0",  "1", "9",  "-", ".",  "e", "a", "b", "z",
                                               "\\", "é", "中", "t", "r",  "u", "n", "l"};
    std::mt19937_64 rng(seed);
    for (int i = 0; i < 3000; ++i) {
      std::string s;
      const int len = 2 + static_cast<int>(rng() % 5);
      for (int k = 0; k < len; ++k) s += alphabet[rng() % alphabet.size()];
      bytes_.push_back(s);
    }
  }
  std::vector<int32_t> Encode(std::string_view) const override { return {}; }
  int64_t vocab_size() const override { return static_cast<int64_t>(bytes_.size()); }
  const std::string& TokenBytes(int32_t id) const override { return bytes_[id]; }
  std::string kind() const override { return "fake"; }
  int32_t ByteToken(uint8_t b) const { return 3 + b; }

 private:
  std::vector<std::string> bytes_;
};

struct Fixture {
  FakeTokenizer tok;
  std::shared_ptr<const TokenTrie> trie;
  Fixture() {
    const int64_t eos[] = {kEos};
    trie = std::make_shared<TokenTrie>(tok, eos);
  }
  std::shared_ptr<Grammar> Compile(const std::string& gbnf) {
    auto g = Grammar::Compile(gbnf, trie);
    EXPECT_TRUE(g.ok()) << g.status() << "\n" << gbnf;
    return g.ok() ? *g : nullptr;
  }
  // Whether `text`, fed byte by byte, is a complete sentence of the grammar.
  bool Matches(const std::shared_ptr<Grammar>& g, const std::string& text) {
    GrammarState st(g, false);
    for (char c : text)
      if (!st.Accept(tok.ByteToken(static_cast<uint8_t>(c)))) return false;
    return st.complete();
  }
};

TEST(GrammarTest, LanguageOfLiteralsClassesGroupsAndRepetitions) {
  Fixture f;
  struct Case {
    const char* gbnf;
    std::vector<std::string> yes, no;
  };
  const std::vector<Case> cases = {
      {R"(root ::= "ab" | "c")", {"ab", "c"}, {"", "a", "abc", "b"}},
      {R"(root ::= [a-c]+ "!")", {"a!", "abcba!"}, {"!", "ad!", "a"}},
      {R"(root ::= [^"\\]*)", {"", "abc", "é中"}, {"\"", "a\\"}},
      {R"(root ::= "x"{2,3})", {"xx", "xxx"}, {"x", "xxxx"}},
      {R"(root ::= "x"{2,})", {"xx", "xxxxx"}, {"x"}},
      {R"(root ::= ("ab")? "c")", {"c", "abc"}, {"ac", "ababc"}},
      {R"(root ::= ("a" | "b")* "c" # comment
          )",
       {"c", "abbac"},
       {"ab", "ca"}},
      {R"(root ::= [α-ω]+)", {"αβ", "ω"}, {"a", "α a"}},
      {R"(root ::= . .)", {"ab", "é中", "\x7f\n"}, {"a", "abc"}},
      {R"(root ::= "\x41\u00e9\n")", {"Aé\n"}, {"A"}},
      {"root ::= item (\",\" item)*\nitem ::= [0-9]+", {"1", "1,22,3"}, {"1,", ",1"}},
      {R"g(root ::= "(" root ")" | "")g", {"", "()", "(())"}, {"(", "())"}},
  };
  for (const Case& c : cases) {
    auto g = f.Compile(c.gbnf);
    ASSERT_NE(g, nullptr);
    for (const auto& s : c.yes) EXPECT_TRUE(f.Matches(g, s)) << c.gbnf << " on '" << s << "'";
    for (const auto& s : c.no) EXPECT_FALSE(f.Matches(g, s)) << c.gbnf << " on '" << s << "'";
  }
}

TEST(GrammarTest, ErrorsNameWhatIsWrong) {
  Fixture f;
  const std::vector<std::pair<const char*, const char*>> cases = {
      {"root ::= missing", "'missing' is used but never defined"},
      {"start ::= \"a\"", "no 'root' rule"},
      {"root ::= root \"a\" | \"b\"", "left-recursive"},
      {"root ::= \"abc", "unterminated literal"},
      {"root ::= \"\\q\"", "unknown escape"},
      {"root ::= (\"a\"", "expected ')'"},
      {"root ::= \"a\"{3,1}", "n < m"},
      {"root ::= \"a\" @", "unexpected '@'"},
      {"root ::= \"a\"\nroot ::= \"b\"", "defined twice"},
      {"", "empty"},
      // A client's hostile nesting is an error, not a stack overflow.
      {nullptr, "nested too deep"},
  };
  std::string deep = "root ::= ";
  deep.append(100000, '(');
  deep += "\"a\"";
  deep.append(100000, ')');
  for (auto [text, want] : cases) {
    const std::string gbnf = text ? text : deep;
    auto g = Grammar::Compile(gbnf, f.trie);
    ASSERT_FALSE(g.ok()) << gbnf;
    EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(g.status().message()).find(want), std::string::npos)
        << gbnf << " -> " << g.status();
  }
}

// An ambiguous grammar doubles its stacks at every byte. A state keeps a bounded subset and a
// grammar a bounded number of stacks, after which it allows nothing: a hostile grammar costs
// bounded time and memory, ends its sequence, and never lets a wrong byte through.
TEST(GrammarTest, AmbiguityThatMultipliesStacksStaysBounded) {
  Fixture f;
  auto g = f.Compile(R"(root ::= "a" root "b" | "a" root "c" | "")");
  ASSERT_NE(g, nullptr);
  GrammarState st(g, false);
  std::vector<float> logits(f.tok.vocab_size());
  int accepted = 0;
  for (; accepted < 2000; ++accepted) {
    std::fill(logits.begin(), logits.end(), 0.f);
    if (!st.Mask(logits.data(), f.tok.vocab_size())) break;
    EXPECT_FALSE(std::isfinite(logits[f.tok.ByteToken('d')])) << accepted;
    if (!std::isfinite(logits[f.tok.ByteToken('a')]) || !st.Accept(f.tok.ByteToken('a'))) break;
  }
  EXPECT_GE(accepted, 20);    // the grammar works until its bound ...
  EXPECT_LT(accepted, 2000);  // ... and then ends the sequence
  EXPECT_LE(g->stats().stacks, int64_t{1} << 20);
}

// Stacks that multiply and accept every byte: each mask costs bounded work, and every token it
// allows is one the grammar takes.
TEST(GrammarTest, AStateOfThousandsOfStacksMasksInBoundedWork) {
  Fixture f;
  auto g = f.Compile(R"(root ::= . root "b" | . root "c" | "")");
  ASSERT_NE(g, nullptr);
  GrammarState st(g, false);
  std::vector<float> logits(f.tok.vocab_size());
  for (int i = 0; i < 14; ++i) ASSERT_TRUE(st.Accept(f.tok.ByteToken('x')));  // 2^14 > the cap
  for (int step = 0; step < 1; ++step) {
    std::fill(logits.begin(), logits.end(), 0.f);
    ASSERT_TRUE(st.Mask(logits.data(), f.tok.vocab_size()));
    int allowed = 0;
    for (int32_t id = 0; id < f.tok.vocab_size() && allowed < 200; ++id)
      if (std::isfinite(logits[id])) {
        GrammarState probe = st;
        EXPECT_TRUE(probe.Accept(id)) << f.tok.TokenBytes(id);
        ++allowed;
      }
    EXPECT_GT(allowed, 0);
    ASSERT_TRUE(st.Accept(f.tok.ByteToken('y')));
  }
}

// The trie walk's mask (shared prefixes pruned once, cached per state) equals asking every
// token on its own, along random walks through several grammars.
TEST(GrammarTest, MaskEqualsPerTokenCheck) {
  Fixture f;
  auto json_grammar = JsonObjectGbnf();
  for (const std::string& gbnf :
       {json_grammar, std::string(R"(root ::= ("a" | "é" | [0-9]{1,3} | " {")+ "}")")}) {
    auto g = f.Compile(gbnf);
    ASSERT_NE(g, nullptr);
    std::mt19937_64 rng(11);
    for (int walk = 0; walk < 4; ++walk) {
      GrammarState st(g, false);
      for (int step = 0; step < 40; ++step) {
        std::vector<float> logits(f.tok.vocab_size() + 5, 0.f);  // a row wider than the vocab
        const bool any = st.Mask(logits.data(), static_cast<int64_t>(logits.size()));
        std::vector<int32_t> allowed;
        for (int32_t id = 0; id < f.tok.vocab_size(); ++id) {
          GrammarState probe = st;
          const bool ok = probe.Accept(id);
          EXPECT_EQ(ok, std::isfinite(logits[id]))
              << "token " << id << " '" << f.tok.TokenBytes(id) << "' step " << step;
          if (ok) allowed.push_back(id);
        }
        for (size_t i = f.tok.vocab_size(); i < logits.size(); ++i)
          EXPECT_TRUE(std::isinf(logits[i]));
        EXPECT_EQ(any, !allowed.empty());
        if (allowed.empty() || st.finished()) break;
        // Prefer continuing to ending, so walks get deep.
        int32_t pick = allowed[rng() % allowed.size()];
        if (pick == kEos && allowed.size() > 1) pick = allowed[(rng() % (allowed.size() - 1)) + 1];
        if (pick == kEos) break;
        ASSERT_TRUE(st.Accept(pick));
      }
    }
    EXPECT_GT(g->stats().mask_hits + g->stats().mask_misses, 0);
  }
}

// Walks a grammar with random allowed tokens, steering toward the end after `soft_limit` steps
// (the token that keeps the fewest bytes open wins); returns the text, or "" if it never ended.
std::string RandomSentence(Fixture& f, const std::shared_ptr<Grammar>& g, uint64_t seed,
                           int soft_limit = 60, int hard_limit = 2000) {
  GrammarState st(g, false);
  std::mt19937_64 rng(seed);
  std::string text;
  for (int step = 0; step < hard_limit; ++step) {
    if (st.finished()) return text;
    std::vector<float> logits(f.tok.vocab_size(), 0.f);
    if (!st.Mask(logits.data(), f.tok.vocab_size())) return "";
    std::vector<int32_t> allowed;
    for (int32_t id = 0; id < f.tok.vocab_size(); ++id)
      if (std::isfinite(logits[id])) allowed.push_back(id);
    int32_t pick = allowed[rng() % allowed.size()];
    if (step > soft_limit) {
      if (std::isfinite(logits[kEos])) return text;
      // Close structures: prefer bytes that end things.
      for (int32_t id : allowed) {
        const std::string& b = f.tok.TokenBytes(id);
        if (b == "}" || b == "]" || b == "\"" ||
            (b.size() == 1 && rng() % 4 == 0 && b[0] >= '0' && b[0] <= '9')) {
          pick = id;
          if (b != "\"" || rng() % 2) break;
        }
      }
    }
    if (pick == kEos) return text;
    EXPECT_TRUE(st.Accept(pick));
    text += f.tok.TokenBytes(pick);
  }
  return "";
}

TEST(JsonSchemaGrammarTest, SentencesParseAndKeepTheSchema) {
  Fixture f;
  const std::string schema = R"({
    "type": "object",
    "properties": {
      "name": {"type": "string", "maxLength": 12},
      "age": {"type": "integer"},
      "tags": {"type": "array", "items": {"enum": ["a", "b", 3]}, "minItems": 1, "maxItems": 3},
      "ok": {"type": ["boolean", "null"]},
      "pos": {"$ref": "#/$defs/point"}
    },
    "required": ["name", "tags", "pos"],
    "additionalProperties": false,
    "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"},
                                                        "y": {"const": "up"}},
                        "required": ["x", "y"]}}
  })";
  auto gbnf = JsonSchemaToGbnf(schema);
  ASSERT_TRUE(gbnf.ok()) << gbnf.status();
  auto g = f.Compile(*gbnf);
  ASSERT_NE(g, nullptr);
  int ended = 0;
  for (uint64_t seed = 1; seed <= 30; ++seed) {
    const std::string text = RandomSentence(f, g, seed);
    if (text.empty()) continue;
    ++ended;
    const auto v = nlohmann::ordered_json::parse(text, nullptr, false);
    ASSERT_FALSE(v.is_discarded()) << text;
    ASSERT_TRUE(v.is_object()) << text;
    ASSERT_TRUE(v.contains("name") && v["name"].is_string()) << text;
    EXPECT_LE(v["name"].get<std::string>().size(), 12u * 4) << text;  // 12 characters
    ASSERT_TRUE(v["tags"].is_array()) << text;
    EXPECT_GE(v["tags"].size(), 1u);
    EXPECT_LE(v["tags"].size(), 3u);
    for (const auto& t : v["tags"]) EXPECT_TRUE(t == "a" || t == "b" || t == 3) << text;
    if (v.contains("age")) {
      EXPECT_TRUE(v["age"].is_number_integer()) << text;
    }
    if (v.contains("ok")) {
      EXPECT_TRUE(v["ok"].is_boolean() || v["ok"].is_null()) << text;
    }
    EXPECT_TRUE(v["pos"]["x"].is_number()) << text;
    EXPECT_EQ(v["pos"]["y"], "up") << text;
    // Properties come in the schema's order.
    std::vector<std::string> keys;
    for (const auto& [k, _] : v.items()) keys.push_back(k);
    const std::vector<std::string> order = {"name", "age", "tags", "ok", "pos"};
    size_t at = 0;
    for (const auto& k : keys) {
      while (at < order.size() && order[at] != k) ++at;
      EXPECT_LT(at, order.size()) << "out of order: " << text;
    }
  }
  EXPECT_GE(ended, 25);
}

TEST(JsonSchemaGrammarTest, RefusesWhatItDoesNotSupport) {
  for (auto [schema, want] : std::vector<std::pair<const char*, const char*>>{
           {R"({"type": "string", "pattern": "a+"})", "'pattern' at # is not supported"},
           {R"({"type": "object", "properties": {"a": {"type": "integer", "minimum": 3}}})",
            "'minimum' at #/properties/a"},
           {R"({"type": "object", "properties": {"a": {}}, "required": ["b"]})",
            "names \"b\", not a property"},
           {R"({"$ref": "#/$defs/nope"})", "names nothing"},
           {R"({"type": "tuple"})", "unknown type 'tuple'"},
           {R"({"allOf": []})", "'allOf'"},
           {"{nope", "not valid JSON"},
           {nullptr, "nesting deeper than 64"},
       }) {
    std::string deep;
    for (int i = 0; i < 5000; ++i) deep += R"({"type": "array", "items": )";
    deep += R"({"type": "null"})" + std::string(5000, '}');
    if (!schema) schema = deep.c_str();
    auto g = JsonSchemaToGbnf(schema);
    ASSERT_FALSE(g.ok()) << schema;
    EXPECT_NE(std::string(g.status().message()).find(want), std::string::npos)
        << schema << " -> " << g.status();
  }
}

}  // namespace grammar_test
}  // namespace amoeba
