// Constrained decoding: GBNF grammars (llama.cpp's syntax) compiled to a byte-level pushdown
// automaton, and the per-sequence state that masks a step's logits to the tokens the grammar
// allows next.
//
// Character classes and literals become UTF-8 byte sequences at compile time, so matching walks
// bytes. A stack of the automaton is a node in an interned tree (position, parent), so equal
// stacks are one id and a state is a sorted set of ids. The allowed tokens of a state come from
// one walk of a byte trie of the vocabulary that prunes every prefix the state rejects, and are
// cached per state: a schema's states recur (every string, every number), so most steps are a
// cache hit and a mask is a bitset applied to the row.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "model/tokenizer.h"

namespace amoeba {

// The vocabulary as a byte trie (control and special tokens, which have no bytes, are not in it).
// Built once per tokenizer and shared by every grammar.
class TokenTrie {
 public:
  TokenTrie(const Tokenizer& tok, std::span<const int64_t> eos_token_ids);
  int64_t vocab_size() const { return vocab_; }

 private:
  friend class Grammar;
  friend class GrammarState;
  struct Node {
    int32_t first_child = 0, children = 0;  // into child_byte_ / child_node_, sorted by byte
    int32_t first_token = 0, tokens = 0;    // into tokens_: tokens whose bytes end here
  };
  int64_t vocab_ = 0;
  int32_t max_depth_ = 0;  // the longest token's bytes
  std::vector<Node> nodes_;
  std::vector<uint8_t> child_byte_;
  std::vector<int32_t> child_node_;
  std::vector<int32_t> tokens_;
  std::vector<std::string> bytes_;  // per token id
  std::vector<int32_t> eos_;
};

class Grammar;

// Where one sequence is in its grammar.
class GrammarState {
 public:
  // `strip_leading_space`: the text starts here and the tokenizer drops a leading space there
  // (SentencePiece), so the first token's leading space is not matched.
  GrammarState(std::shared_ptr<Grammar> grammar, bool strip_leading_space);
  // Sets every token the grammar does not allow next to -inf (the row has `vocab` entries; ids
  // past the tokenizer's are never allowed). End-of-sequence tokens are allowed exactly when the
  // text so far is a complete sentence of the grammar. Returns false when nothing is allowed.
  bool Mask(float* logits, int64_t vocab);
  // Advances over `token`'s bytes; false (state unchanged) if the grammar does not allow it.
  bool Accept(int32_t token);
  // The text so far is complete and nothing can follow: only end-of-sequence is allowed.
  bool finished() const;
  bool complete() const;  // the text so far is a complete sentence (more may follow)

 private:
  std::shared_ptr<Grammar> grammar_;
  std::vector<int32_t> stacks_;
  bool at_start_ = false;
};

// A compiled grammar bound to a vocabulary. Thread-safe: its caches are behind a mutex.
class Grammar {
 public:
  // Compiles GBNF text. Errors name the rule or the offset that is wrong (undefined rules, left
  // recursion, bad escapes, unbalanced groups, a missing `root`).
  static absl::StatusOr<std::shared_ptr<Grammar>> Compile(std::string_view gbnf,
                                                          std::shared_ptr<const TokenTrie> trie);
  ~Grammar();

  struct Stats {
    int64_t rules = 0, elements = 0, stacks = 0, masks_cached = 0, mask_hits = 0, mask_misses = 0;
  };
  Stats stats() const;

  struct Impl;

 private:
  friend class GrammarState;
  explicit Grammar(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace amoeba
