#include "model/grammar.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"
#include "grammar_program.h"

namespace amoeba {

using grammar::ByteSet;
using grammar::ElementKind;

TokenTrie::TokenTrie(const Tokenizer& tok, std::span<const int64_t> eos_token_ids)
    : vocab_(tok.vocab_size()) {
  bytes_.resize(vocab_);
  // Built as a map trie, then flattened: children sorted by byte, one array each.
  struct Build {
    std::map<uint8_t, int32_t> children;
    std::vector<int32_t> tokens;
  };
  std::vector<Build> b(1);
  for (int32_t id = 0; id < vocab_; ++id) {
    bytes_[id] = tok.TokenBytes(id);
    if (bytes_[id].empty()) continue;
    int32_t n = 0;
    for (char c : bytes_[id]) {
      auto it = b[n].children.find(static_cast<uint8_t>(c));
      if (it == b[n].children.end()) {
        const int32_t next = static_cast<int32_t>(b.size());
        b[n].children[static_cast<uint8_t>(c)] = next;
        b.emplace_back();
        n = next;
      } else {
        n = it->second;
      }
    }
    b[n].tokens.push_back(id);
    max_depth_ = std::max(max_depth_, static_cast<int32_t>(bytes_[id].size()));
  }
  nodes_.resize(b.size());
  for (size_t i = 0; i < b.size(); ++i) {
    Node& n = nodes_[i];
    n.first_child = static_cast<int32_t>(child_byte_.size());
    n.children = static_cast<int32_t>(b[i].children.size());
    for (auto [byte, child] : b[i].children) {
      child_byte_.push_back(byte);
      child_node_.push_back(child);
    }
    n.first_token = static_cast<int32_t>(tokens_.size());
    n.tokens = static_cast<int32_t>(b[i].tokens.size());
    tokens_.insert(tokens_.end(), b[i].tokens.begin(), b[i].tokens.end());
  }
  for (int64_t e : eos_token_ids)
    if (e >= 0 && e < vocab_) eos_.push_back(static_cast<int32_t>(e));
}

namespace {

constexpr int32_t kAccept = -1;           // the empty stack: the text is a complete sentence
constexpr size_t kMaxCachedMasks = 4096;  // per grammar; cleared when full
// Bounds against grammars whose ambiguity multiplies stacks (`r ::= "a" r "b" | "a" r "c" | ""`
// has 2^n after n bytes): a state keeps at most kMaxStacks (a subset of the stacks only narrows
// what may follow, it never lets a wrong byte through), and a grammar that has made kMaxNodes
// stacks in all allows nothing more (the sequence ends there).
constexpr size_t kMaxStacks = 4096;
constexpr size_t kMaxNodes = size_t{1} << 18;
// Stack steps one mask may take (a JSON state over a 32k vocabulary takes well under 1%): past
// it the walk stops and the mask holds the tokens found so far, so a state with thousands of
// stacks that accept every byte costs bounded time per token (fewer tokens, never a wrong one).
constexpr int64_t kMaxWalkSteps = int64_t{1} << 24;

struct StateHash {
  size_t operator()(const std::vector<int32_t>& v) const {
    return absl::HashOf(absl::MakeConstSpan(v));
  }
};

}  // namespace

struct Grammar::Impl {
  grammar::Program prog;
  std::shared_ptr<const TokenTrie> trie;
  std::mutex mu;
  // Interned stacks: node = (element position, parent node); equal stacks share one id.
  std::vector<std::pair<int32_t, int32_t>> nodes;
  absl::flat_hash_map<uint64_t, int32_t> intern;
  // (node, byte) -> the stacks after matching the byte, as [offset, count) in `pool`.
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> advance_memo;
  std::vector<int32_t> pool;
  absl::flat_hash_map<std::vector<int32_t>, std::vector<uint64_t>, StateHash> masks;
  std::vector<int32_t> initial;
  std::vector<std::vector<int32_t>> depth_buf;  // the trie walk's state per depth
  std::vector<int32_t> expand_seen;
  std::vector<uint64_t> scratch_mask;
  int64_t walk_budget = 0;
  Stats stats;

  int32_t Intern(int32_t pos, int32_t parent) {
    const uint64_t key =
        (static_cast<uint64_t>(static_cast<uint32_t>(pos)) << 32) | static_cast<uint32_t>(parent);
    auto [it, inserted] = intern.try_emplace(key, static_cast<int32_t>(nodes.size()));
    if (inserted) nodes.push_back({pos, parent});
    return it->second;
  }

  // The stacks whose top is a byte set (or the empty stack) reached from `pos` with `parent`
  // below it, without matching a byte: rule references push their alternatives, ends return to
  // the parent's continuation. `expand_seen` cuts cycles through rules that match nothing.
  void Expand(int32_t pos, int32_t parent, std::vector<int32_t>& out) {
    const grammar::Element& e = prog.elements[pos];
    switch (e.kind) {
      case ElementKind::kBytes:
        out.push_back(Intern(pos, parent));
        return;
      case ElementKind::kRule: {
        const int32_t self = Intern(pos, parent);
        if (std::find(expand_seen.begin(), expand_seen.end(), self) != expand_seen.end()) return;
        expand_seen.push_back(self);
        const int32_t ret = Intern(pos + 1, parent);
        for (int32_t alt : prog.alternatives[e.arg]) Expand(alt, ret, out);
        return;
      }
      case ElementKind::kEnd:
        if (parent == kAccept) {
          out.push_back(kAccept);
        } else {
          // No guard needed: a pop moves down the stack, and a loop must pass a reference.
          Expand(nodes[parent].first, nodes[parent].second, out);
        }
        return;
    }
  }

  static void Canonical(std::vector<int32_t>& v) {
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
  }

  std::pair<int32_t, int32_t> Advance(int32_t node, uint8_t byte) {
    const uint64_t key = (static_cast<uint64_t>(node) << 8) | byte;
    auto it = advance_memo.find(key);
    if (it != advance_memo.end()) return it->second;
    const auto [pos, parent] = nodes[node];
    std::vector<int32_t> out;
    if (prog.sets[prog.elements[pos].arg].Has(byte)) {
      expand_seen.clear();
      Expand(pos + 1, parent, out);
      Canonical(out);
    }
    std::pair<int32_t, int32_t> span{static_cast<int32_t>(pool.size()),
                                     static_cast<int32_t>(out.size())};
    pool.insert(pool.end(), out.begin(), out.end());
    advance_memo.emplace(key, span);
    stats.stacks = static_cast<int64_t>(nodes.size());
    return span;
  }

  // `out` = the state after matching `byte` from `state`.
  void Step(std::span<const int32_t> state, uint8_t byte, std::vector<int32_t>& out) {
    out.clear();
    if (nodes.size() > kMaxNodes) return;
    for (int32_t s : state) {
      if (s == kAccept) continue;
      const auto [off, n] = Advance(s, byte);
      out.insert(out.end(), pool.begin() + off, pool.begin() + off + n);
    }
    if (state.size() > 1) Canonical(out);
    if (out.size() > kMaxStacks) out.resize(kMaxStacks);
  }

  ByteSet NextBytes(std::span<const int32_t> state) const {
    ByteSet u;
    for (int32_t s : state) {
      if (s == kAccept) continue;
      const ByteSet& b = prog.sets[prog.elements[nodes[s].first].arg];
      for (int w = 0; w < 4; ++w) u.bits[w] |= b.bits[w];
    }
    return u;
  }

  // Marks every token whose bytes, from trie node `tn` on, the state can match.
  void Walk(int32_t tn, std::span<const int32_t> state, size_t depth, bool skip_space,
            std::vector<uint64_t>& mask) {
    const TokenTrie& t = *trie;
    const TokenTrie::Node& n = t.nodes_[tn];
    const ByteSet next = NextBytes(state);
    for (int32_t c = n.first_child; c < n.first_child + n.children; ++c) {
      if ((walk_budget -= static_cast<int64_t>(state.size())) < 0) return;
      const uint8_t byte = t.child_byte_[c];
      const int32_t child = t.child_node_[c];
      std::span<const int32_t> after;
      if (skip_space && byte == ' ') {
        after = state;  // SentencePiece drops the text's leading space: nothing to match
      } else {
        if (!next.Has(byte)) continue;
        std::vector<int32_t>& buf = depth_buf[depth];
        Step(state, byte, buf);
        if (buf.empty()) continue;
        after = buf;
      }
      const TokenTrie::Node& cn = t.nodes_[child];
      for (int32_t i = cn.first_token; i < cn.first_token + cn.tokens; ++i) {
        const int32_t id = t.tokens_[i];
        mask[id >> 6] |= uint64_t{1} << (id & 63);
      }
      if (cn.children > 0) Walk(child, after, depth + 1, false, mask);
    }
  }

  const std::vector<uint64_t>& MaskOf(const std::vector<int32_t>& state, bool at_start) {
    if (!at_start) {
      auto it = masks.find(state);
      if (it != masks.end()) {
        ++stats.mask_hits;
        return it->second;
      }
    }
    ++stats.mask_misses;
    std::vector<uint64_t> mask((trie->vocab_ + 63) / 64, 0);
    walk_budget = kMaxWalkSteps;
    Walk(0, state, 0, at_start, mask);
    if (std::binary_search(state.begin(), state.end(), kAccept))
      for (int32_t e : trie->eos_) mask[e >> 6] |= uint64_t{1} << (e & 63);
    if (at_start) {
      scratch_mask = std::move(mask);
      return scratch_mask;
    }
    if (masks.size() >= kMaxCachedMasks) masks.clear();
    stats.masks_cached = static_cast<int64_t>(masks.size() + 1);
    return masks.emplace(state, std::move(mask)).first->second;
  }
};

Grammar::Grammar(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Grammar::~Grammar() = default;

absl::StatusOr<std::shared_ptr<Grammar>> Grammar::Compile(std::string_view gbnf,
                                                          std::shared_ptr<const TokenTrie> trie) {
  auto prog = grammar::ParseGbnf(gbnf);
  if (!prog.ok()) return prog.status();
  auto impl = std::make_unique<Impl>();
  impl->prog = *std::move(prog);
  impl->trie = std::move(trie);
  // One state buffer per trie depth, sized once: the walk holds spans into them.
  impl->depth_buf.resize(impl->trie->max_depth_ + 1);
  impl->stats.rules = static_cast<int64_t>(impl->prog.alternatives.size());
  impl->stats.elements = static_cast<int64_t>(impl->prog.elements.size());
  for (int32_t alt : impl->prog.alternatives[impl->prog.root]) {
    impl->expand_seen.clear();
    impl->Expand(alt, kAccept, impl->initial);
  }
  Impl::Canonical(impl->initial);
  return std::shared_ptr<Grammar>(new Grammar(std::move(impl)));
}

Grammar::Stats Grammar::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->stats;
}

GrammarState::GrammarState(std::shared_ptr<Grammar> grammar, bool strip_leading_space)
    : grammar_(std::move(grammar)), at_start_(strip_leading_space) {
  stacks_ = grammar_->impl_->initial;
}

bool GrammarState::Mask(float* logits, int64_t vocab) {
  Grammar::Impl& g = *grammar_->impl_;
  std::lock_guard<std::mutex> lock(g.mu);
  const std::vector<uint64_t>& mask = g.MaskOf(stacks_, at_start_);
  const float kNeg = -std::numeric_limits<float>::infinity();
  const int64_t known = std::min<int64_t>(vocab, g.trie->vocab_);
  bool any = false;
  for (int64_t w = 0; w * 64 < known; ++w) {
    const uint64_t bits = mask[w];
    const int64_t end = std::min<int64_t>(64, known - w * 64);
    if (bits == ~uint64_t{0} && end == 64) {
      any = true;
      continue;
    }
    any |= bits != 0;
    float* row = logits + w * 64;
    for (int64_t i = 0; i < end; ++i)
      if (!((bits >> i) & 1)) row[i] = kNeg;
  }
  for (int64_t i = known; i < vocab; ++i) logits[i] = kNeg;
  return any;
}

bool GrammarState::Accept(int32_t token) {
  Grammar::Impl& g = *grammar_->impl_;
  if (token < 0 || token >= g.trie->vocab_) return false;
  std::lock_guard<std::mutex> lock(g.mu);
  const std::string& bytes = g.trie->bytes_[token];
  if (bytes.empty()) {  // end of sequence (or another special token): allowed when complete
    return std::find(g.trie->eos_.begin(), g.trie->eos_.end(), token) != g.trie->eos_.end() &&
           std::binary_search(stacks_.begin(), stacks_.end(), kAccept);
  }
  // Per-thread scratch: no allocation per token once grown.
  thread_local std::vector<int32_t> state, next;
  state = stacks_;
  size_t i = at_start_ && bytes[0] == ' ' ? 1 : 0;
  for (; i < bytes.size(); ++i) {
    g.Step(state, static_cast<uint8_t>(bytes[i]), next);
    if (next.empty()) return false;
    state.swap(next);
  }
  stacks_.swap(state);
  at_start_ = false;
  return true;
}

bool GrammarState::complete() const {
  return std::binary_search(stacks_.begin(), stacks_.end(), kAccept);
}

bool GrammarState::finished() const {
  return stacks_.size() == 1 && stacks_[0] == kAccept;
}

}  // namespace amoeba
