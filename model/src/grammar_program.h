// A GBNF grammar compiled to bytes: rules of alternatives, each alternative a run of elements
// (a byte set, or a reference to a rule) closed by an end marker. Private to the grammar code.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace amoeba::grammar {

struct ByteSet {
  std::array<uint64_t, 4> bits{};
  bool Has(uint8_t b) const { return (bits[b >> 6] >> (b & 63)) & 1; }
  void Add(uint8_t b) { bits[b >> 6] |= uint64_t{1} << (b & 63); }
  void AddRange(uint8_t lo, uint8_t hi) {
    for (int b = lo; b <= hi; ++b) Add(static_cast<uint8_t>(b));
  }
};

enum class ElementKind : uint8_t { kBytes, kRule, kEnd };

struct Element {
  ElementKind kind = ElementKind::kEnd;
  int32_t arg = 0;  // kBytes: index into Program::sets; kRule: rule index
};

struct Program {
  std::vector<Element> elements;
  std::vector<ByteSet> sets;
  std::vector<std::vector<int32_t>> alternatives;  // per rule: start positions in `elements`
  std::vector<std::string> rule_names;             // synthesized rules are named after their parent
  int32_t root = -1;
};

// Parses GBNF: `name ::= alternatives` rules; "literals" and [classes] (with ^, ranges and the
// escapes \n \r \t \\ \" \] \- \xHH \uHHHH \UHHHHHHHH), `.`, rule references, ( groups ), and the
// postfix operators * + ? {m} {m,} {m,n}; # comments. Checks that every referenced rule exists,
// that `root` does, and that no rule is left-recursive.
absl::StatusOr<Program> ParseGbnf(std::string_view text, std::string_view root = "root");

}  // namespace amoeba::grammar
