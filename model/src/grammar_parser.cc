#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "grammar_program.h"

namespace amoeba::grammar {
namespace {

constexpr uint32_t kMaxCodePoint = 0x10FFFF;
constexpr int64_t kMaxRepeat = 1000;  // {m,n} bounds: each copy is compiled out
constexpr int kMaxNesting = 64;       // groups inside groups

struct Range {
  uint32_t lo, hi;
};

int Utf8Encode(uint32_t c, uint8_t out[4]) {
  if (c < 0x80) {
    out[0] = static_cast<uint8_t>(c);
    return 1;
  }
  if (c < 0x800) {
    out[0] = static_cast<uint8_t>(0xC0 | (c >> 6));
    out[1] = static_cast<uint8_t>(0x80 | (c & 0x3F));
    return 2;
  }
  if (c < 0x10000) {
    out[0] = static_cast<uint8_t>(0xE0 | (c >> 12));
    out[1] = static_cast<uint8_t>(0x80 | ((c >> 6) & 0x3F));
    out[2] = static_cast<uint8_t>(0x80 | (c & 0x3F));
    return 3;
  }
  out[0] = static_cast<uint8_t>(0xF0 | (c >> 18));
  out[1] = static_cast<uint8_t>(0x80 | ((c >> 12) & 0x3F));
  out[2] = static_cast<uint8_t>(0x80 | ((c >> 6) & 0x3F));
  out[3] = static_cast<uint8_t>(0x80 | (c & 0x3F));
  return 4;
}

// Code points [lo, hi] (none a surrogate, both of one encoded length or split here) as byte-range
// sequences, each byte independent of the others: the classic UTF-8 range compilation.
void Utf8Sequences(uint32_t lo, uint32_t hi,
                   std::vector<std::vector<std::pair<uint8_t, uint8_t>>>& out) {
  if (lo > hi) return;
  for (uint32_t max : {0x7Fu, 0x7FFu, 0xFFFFu})
    if (lo <= max && hi > max) {
      Utf8Sequences(lo, max, out);
      Utf8Sequences(max + 1, hi, out);
      return;
    }
  if (hi < 0x80) {
    out.push_back({{static_cast<uint8_t>(lo), static_cast<uint8_t>(hi)}});
    return;
  }
  for (int i = 1; i < 4; ++i) {
    const uint32_t m = (1u << (6 * i)) - 1;
    if ((lo & ~m) != (hi & ~m)) {
      if ((lo & m) != 0) {
        Utf8Sequences(lo, lo | m, out);
        Utf8Sequences((lo | m) + 1, hi, out);
        return;
      }
      if ((hi & m) != m) {
        Utf8Sequences(lo, (hi & ~m) - 1, out);
        Utf8Sequences(hi & ~m, hi, out);
        return;
      }
    }
  }
  uint8_t a[4], b[4];
  const int n = Utf8Encode(lo, a);
  Utf8Encode(hi, b);
  std::vector<std::pair<uint8_t, uint8_t>> seq;
  for (int i = 0; i < n; ++i) seq.push_back({a[i], b[i]});
  out.push_back(std::move(seq));
}

class Parser {
 public:
  explicit Parser(std::string_view s) : s_(s) {}

  absl::StatusOr<Program> Run(std::string_view root) {
    SkipSpace();
    if (pos_ >= s_.size()) return Error("the grammar is empty");
    while (pos_ < s_.size()) {
      if (s_[pos_] == ')') return Error("unbalanced ')'");
      const std::string name = ParseName();
      if (name.empty()) return Error("expected a rule name");
      SkipSpace();
      if (s_.substr(pos_, 3) != "::=")
        return Error(absl::StrCat("expected '::=' after '", name, "'"));
      pos_ += 3;
      const int32_t r = RuleIndex(name);
      if (rules_[r].defined) return Error(absl::StrCat("rule '", name, "' is defined twice"));
      rules_[r].defined = true;
      auto alts = ParseAlternates(name, /*nested=*/false);
      if (!alts.ok()) return alts.status();
      rules_[r].alts = *std::move(alts);
      SkipSpace();
    }
    for (size_t r = 0; r < rules_.size(); ++r)
      if (!rules_[r].defined)
        return absl::InvalidArgumentError(
            absl::StrCat("grammar: rule '", names_[r], "' is used but never defined"));
    auto it = index_.find(std::string(root));
    if (it == index_.end())
      return absl::InvalidArgumentError(absl::StrCat("grammar: no '", std::string(root), "' rule"));
    if (absl::Status s = CheckLeftRecursion(); !s.ok()) return s;
    Program p;
    p.sets = std::move(sets_);
    p.rule_names = names_;
    p.root = it->second;
    p.alternatives.resize(rules_.size());
    for (size_t r = 0; r < rules_.size(); ++r)
      for (const auto& alt : rules_[r].alts) {
        p.alternatives[r].push_back(static_cast<int32_t>(p.elements.size()));
        p.elements.insert(p.elements.end(), alt.begin(), alt.end());
        p.elements.push_back({ElementKind::kEnd, 0});
      }
    return p;
  }

 private:
  struct Rule {
    std::vector<std::vector<Element>> alts;
    bool defined = false;
  };

  absl::Status Error(std::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat("grammar: ", std::string(what), " at offset ", pos_));
  }

  static bool IsNameChar(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_';
  }

  void SkipSpace() {
    while (pos_ < s_.size()) {
      const char c = s_[pos_];
      if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
        ++pos_;
      } else if (c == '#') {
        while (pos_ < s_.size() && s_[pos_] != '\n') ++pos_;
      } else {
        break;
      }
    }
  }

  std::string ParseName() {
    const size_t start = pos_;
    while (pos_ < s_.size() && IsNameChar(s_[pos_])) ++pos_;
    return std::string(s_.substr(start, pos_ - start));
  }

  // A rule ends where the next `name ::=` starts (newlines are plain space).
  bool AtRuleStart() {
    const size_t save = pos_;
    const bool named = !ParseName().empty();
    SkipSpace();
    const bool yes = named && s_.substr(pos_, 3) == "::=";
    pos_ = save;
    return yes;
  }

  int32_t RuleIndex(const std::string& name) {
    auto [it, inserted] = index_.try_emplace(name, static_cast<int32_t>(rules_.size()));
    if (inserted) {
      rules_.emplace_back();
      names_.push_back(name);
    }
    return it->second;
  }

  int32_t NewRule(const std::string& parent) {
    const int32_t r = static_cast<int32_t>(rules_.size());
    rules_.push_back({{}, true});
    names_.push_back(absl::StrCat(parent, "_", r));
    return r;
  }

  Element Bytes(const ByteSet& set) {
    sets_.push_back(set);
    return {ElementKind::kBytes, static_cast<int32_t>(sets_.size() - 1)};
  }
  static Element Ref(int32_t rule) { return {ElementKind::kRule, rule}; }

  absl::StatusOr<uint32_t> Hex(int digits) {
    uint32_t v = 0;
    for (int i = 0; i < digits; ++i, ++pos_) {
      if (pos_ >= s_.size()) return Error("truncated escape");
      const char c = s_[pos_];
      const int d = c >= '0' && c <= '9'   ? c - '0'
                    : c >= 'a' && c <= 'f' ? c - 'a' + 10
                    : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                           : -1;
      if (d < 0) return Error("bad hex digit in escape");
      v = v * 16 + static_cast<uint32_t>(d);
    }
    return v;
  }

  // One code point of a literal or class (escapes decoded, the grammar's own UTF-8 read).
  absl::StatusOr<uint32_t> ParseChar() {
    if (pos_ >= s_.size()) return Error("unterminated literal or class");
    const auto c = static_cast<uint8_t>(s_[pos_]);
    if (c == '\\') {
      if (++pos_ >= s_.size()) return Error("truncated escape");
      const char e = s_[pos_++];
      switch (e) {
        case 'n':
          return uint32_t{'\n'};
        case 'r':
          return uint32_t{'\r'};
        case 't':
          return uint32_t{'\t'};
        case '\\':
        case '"':
        case '[':
        case ']':
        case '-':
        case '^':
        case '\'':
          return static_cast<uint32_t>(e);
        case 'x':
          return Hex(2);
        case 'u':
          return Hex(4);
        case 'U': {
          auto v = Hex(8);
          if (v.ok() && *v > kMaxCodePoint) return Error("code point past U+10FFFF");
          return v;
        }
        default:
          --pos_;
          return Error(absl::StrCat("unknown escape '\\", std::string(1, e), "'"));
      }
    }
    int n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (n == 0 || pos_ + n > s_.size()) return Error("invalid UTF-8 in the grammar");
    uint32_t v = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
    for (int i = 1; i < n; ++i) v = (v << 6) | (static_cast<uint8_t>(s_[pos_ + i]) & 0x3F);
    pos_ += n;
    return v;
  }

  // Appends the code points of `ranges` as one element: a byte set when all are ASCII, else a
  // rule whose alternatives are the ASCII set and the byte sequences of the rest.
  absl::Status AppendClass(std::vector<Range> ranges, const std::string& rule,
                           std::vector<Element>& seq) {
    ByteSet ascii;
    bool any_ascii = false;
    std::vector<std::vector<std::pair<uint8_t, uint8_t>>> multi;
    for (Range r : ranges) {
      if (r.lo > r.hi) return Error("empty character range");
      if (r.lo < 0x80) {
        ascii.AddRange(static_cast<uint8_t>(r.lo), static_cast<uint8_t>(std::min(r.hi, 0x7Fu)));
        any_ascii = true;
      }
      const uint32_t lo = std::max(r.lo, 0x80u), hi = r.hi;
      if (lo > hi) continue;
      // Surrogates are not characters: UTF-8 never encodes them.
      if (lo < 0xD800 && hi > 0xDFFF) {
        Utf8Sequences(lo, 0xD7FF, multi);
        Utf8Sequences(0xE000, hi, multi);
      } else if (hi < 0xD800 || lo > 0xDFFF) {
        Utf8Sequences(lo, hi, multi);
      } else {
        Utf8Sequences(lo, std::min(hi, 0xD7FFu), multi);
        Utf8Sequences(std::max(lo, 0xE000u), hi, multi);
      }
    }
    if (multi.empty()) {
      if (!any_ascii) return Error("a character class that matches nothing");
      seq.push_back(Bytes(ascii));
      return absl::OkStatus();
    }
    const int32_t r = NewRule(rule);
    std::vector<std::vector<Element>> alts;
    if (any_ascii) alts.push_back({Bytes(ascii)});
    for (const auto& m : multi) {
      std::vector<Element> alt;
      for (auto [lo, hi] : m) {
        ByteSet b;
        b.AddRange(lo, hi);
        alt.push_back(Bytes(b));
      }
      alts.push_back(std::move(alt));
    }
    rules_[r].alts = std::move(alts);
    seq.push_back(Ref(r));
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<std::vector<Element>>> ParseAlternates(const std::string& rule,
                                                                    bool nested) {
    std::vector<std::vector<Element>> alts;
    for (;;) {
      auto seq = ParseSequence(rule, nested);
      if (!seq.ok()) return seq.status();
      alts.push_back(*std::move(seq));
      SkipSpace();
      if (pos_ < s_.size() && s_[pos_] == '|') {
        ++pos_;
        continue;
      }
      return alts;
    }
  }

  absl::Status Repeat(std::vector<Element>& seq, size_t start, int64_t min, int64_t max,
                      const std::string& rule) {
    if (start == seq.size()) return Error("a repetition with nothing to repeat");
    Element item;
    if (seq.size() - start == 1) {
      item = seq[start];
    } else {  // a literal of several bytes repeats as a whole
      const int32_t r = NewRule(rule);
      rules_[r].alts = {std::vector<Element>(seq.begin() + start, seq.end())};
      item = Ref(r);
    }
    seq.resize(start);
    for (int64_t i = 0; i < min; ++i) seq.push_back(item);
    if (max < 0) {  // R ::= item R | ε
      const int32_t r = NewRule(rule);
      rules_[r].alts = {{item, Ref(r)}, {}};
      seq.push_back(Ref(r));
    } else if (max > min) {  // (item (item (...)?)?)?
      int32_t inner = -1;
      for (int64_t i = min; i < max; ++i) {
        const int32_t r = NewRule(rule);
        std::vector<Element> alt = {item};
        if (inner >= 0) alt.push_back(Ref(inner));
        rules_[r].alts = {std::move(alt), {}};
        inner = r;
      }
      seq.push_back(Ref(inner));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<int64_t> Count() {
    const size_t start = pos_;
    int64_t v = 0;
    while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') {
      v = v * 10 + (s_[pos_++] - '0');
      if (v > kMaxRepeat) return Error(absl::StrCat("a repetition bound over ", kMaxRepeat));
    }
    if (pos_ == start) return Error("expected a number in {}");
    return v;
  }

  absl::StatusOr<std::vector<Element>> ParseSequence(const std::string& rule, bool nested) {
    std::vector<Element> seq;
    size_t last = 0;  // where the last symbol starts (what a postfix operator repeats)
    for (;;) {
      SkipSpace();
      if (pos_ >= s_.size()) break;
      const char c = s_[pos_];
      if (c == '|' || c == ')') break;
      if (!nested && AtRuleStart()) break;
      if (c == '"') {
        ++pos_;
        last = seq.size();
        while (pos_ < s_.size() && s_[pos_] != '"') {
          auto cp = ParseChar();
          if (!cp.ok()) return cp.status();
          uint8_t bytes[4];
          const int n = Utf8Encode(*cp, bytes);
          for (int i = 0; i < n; ++i) {
            ByteSet b;
            b.Add(bytes[i]);
            seq.push_back(Bytes(b));
          }
        }
        if (pos_ >= s_.size()) return Error("unterminated literal");
        ++pos_;
      } else if (c == '[') {
        ++pos_;
        last = seq.size();
        const bool negated = pos_ < s_.size() && s_[pos_] == '^';
        if (negated) ++pos_;
        std::vector<Range> ranges;
        while (pos_ < s_.size() && s_[pos_] != ']') {
          auto lo = ParseChar();
          if (!lo.ok()) return lo.status();
          uint32_t hi = *lo;
          if (pos_ + 1 < s_.size() && s_[pos_] == '-' && s_[pos_ + 1] != ']') {
            ++pos_;
            auto h = ParseChar();
            if (!h.ok()) return h.status();
            hi = *h;
          }
          ranges.push_back({*lo, hi});
        }
        if (pos_ >= s_.size()) return Error("unterminated character class");
        ++pos_;
        if (negated) {
          std::sort(ranges.begin(), ranges.end(), [](Range a, Range b) { return a.lo < b.lo; });
          std::vector<Range> complement;
          uint32_t next = 0;
          for (Range r : ranges) {
            if (r.lo > next) complement.push_back({next, r.lo - 1});
            next = std::max(next, r.hi + 1);
          }
          if (next <= kMaxCodePoint) complement.push_back({next, kMaxCodePoint});
          ranges = std::move(complement);
        }
        if (absl::Status s = AppendClass(std::move(ranges), rule, seq); !s.ok()) return s;
      } else if (c == '.') {
        ++pos_;
        last = seq.size();
        if (absl::Status s = AppendClass({{0, kMaxCodePoint}}, rule, seq); !s.ok()) return s;
      } else if (c == '(') {
        // Groups nest by recursion: a client's "((((..." must not exhaust the stack.
        if (++depth_ > kMaxNesting) return Error("groups nested too deep");
        ++pos_;
        last = seq.size();
        const int32_t r = NewRule(rule);
        auto alts = ParseAlternates(rule, /*nested=*/true);
        --depth_;
        if (!alts.ok()) return alts.status();
        rules_[r].alts = *std::move(alts);
        SkipSpace();
        if (pos_ >= s_.size() || s_[pos_] != ')') return Error("expected ')'");
        ++pos_;
        seq.push_back(Ref(r));
      } else if (IsNameChar(c)) {
        last = seq.size();
        seq.push_back(Ref(RuleIndex(ParseName())));
      } else if (c == '*' || c == '+' || c == '?') {
        ++pos_;
        const int64_t min = c == '+' ? 1 : 0, max = c == '?' ? 1 : -1;
        if (absl::Status s = Repeat(seq, last, min, max, rule); !s.ok()) return s;
      } else if (c == '{') {
        ++pos_;
        SkipSpace();
        auto min = Count();
        if (!min.ok()) return min.status();
        int64_t max = *min;
        SkipSpace();
        if (pos_ < s_.size() && s_[pos_] == ',') {
          ++pos_;
          SkipSpace();
          max = -1;
          if (pos_ < s_.size() && s_[pos_] != '}') {
            auto m = Count();
            if (!m.ok()) return m.status();
            max = *m;
          }
        }
        SkipSpace();
        if (pos_ >= s_.size() || s_[pos_] != '}') return Error("expected '}'");
        ++pos_;
        if (max >= 0 && max < *min) return Error("a repetition {m,n} with n < m");
        if (absl::Status s = Repeat(seq, last, *min, max, rule); !s.ok()) return s;
      } else {
        return Error(absl::StrCat("unexpected '", std::string(1, c), "'"));
      }
    }
    return seq;
  }

  // A rule that can reach itself without consuming a byte would make the matcher loop; llama.cpp
  // refuses these too.
  absl::Status CheckLeftRecursion() const {
    const size_t n = rules_.size();
    std::vector<bool> nullable(n, false);
    for (bool changed = true; changed;) {
      changed = false;
      for (size_t r = 0; r < n; ++r) {
        if (nullable[r]) continue;
        for (const auto& alt : rules_[r].alts)
          if (std::all_of(alt.begin(), alt.end(), [&](const Element& e) {
                return e.kind == ElementKind::kRule && nullable[e.arg];
              })) {
            nullable[r] = changed = true;
            break;
          }
      }
    }
    std::vector<std::vector<int32_t>> left(n);  // rules reachable at the left edge
    for (size_t r = 0; r < n; ++r)
      for (const auto& alt : rules_[r].alts)
        for (const Element& e : alt) {
          if (e.kind != ElementKind::kRule) break;
          left[r].push_back(e.arg);
          if (!nullable[e.arg]) break;
        }
    std::vector<int> color(n, 0);  // 0 new, 1 on the path, 2 done
    std::vector<std::pair<int32_t, size_t>> stack;
    for (size_t s = 0; s < n; ++s) {
      if (color[s]) continue;
      stack.push_back({static_cast<int32_t>(s), 0});
      color[s] = 1;
      while (!stack.empty()) {
        auto& [r, i] = stack.back();
        if (i == left[r].size()) {
          color[r] = 2;
          stack.pop_back();
          continue;
        }
        const int32_t next = left[r][i++];
        if (color[next] == 1) {
          // Name the user's rule: synthesized rules are "<rule>_<n>".
          std::string name = names_[next];
          return absl::InvalidArgumentError(absl::StrCat(
              "grammar: rule '", name, "' is left-recursive (it can reach itself without ",
              "matching a character)"));
        }
        if (color[next] == 0) {
          color[next] = 1;
          stack.push_back({next, 0});
        }
      }
    }
    return absl::OkStatus();
  }

  std::string_view s_;
  size_t pos_ = 0;
  int depth_ = 0;
  std::vector<Rule> rules_;
  std::vector<std::string> names_;
  std::map<std::string, int32_t> index_;
  std::vector<ByteSet> sets_;
};

}  // namespace

absl::StatusOr<Program> ParseGbnf(std::string_view text, std::string_view root) {
  return Parser(text).Run(root);
}

}  // namespace amoeba::grammar
