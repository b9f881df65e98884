// What a draft shape buys a target shape in speculative decoding, measured and chosen. Eval
// measures, on held-out text, how many of a draft's greedy guesses in a row the target agrees
// with (teacher-forced: the target's and the draft's next-token argmax at every position); the
// server picks, per target, the draft and number of drafted tokens that maximise expected tokens
// per second from those runs and the shapes' decode and check costs, or none when none pays.
#pragma once
#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "model/weight_format.h"
#include "model/weights.h"
#include "subnet/supernet.h"

namespace amoeba {

inline constexpr int64_t kMaxDraftTokens = 8;  // drafted tokens per check, at most

// The model's greedy next token at every position of every window ([N, T] int64 → [N, T]).
absl::StatusOr<at::Tensor> GreedyNextTokens(const std::shared_ptr<const Model>& m,
                                            const at::Tensor& windows);

// P(r): the fraction of positions from which exactly r consecutive draft guesses agree with the
// target before one does not, r = 0..kMaxDraftTokens (the last bin: at least that many). Both
// [N, T] from GreedyNextTokens over the same windows.
std::vector<double> DraftRunHistogram(const at::Tensor& target_tokens,
                                      const at::Tensor& draft_tokens);

// Expected drafted tokens kept in one check of k from a run histogram: sum P(r) min(r, k).
double ExpectedKept(const std::vector<double>& runs, int64_t k);

struct DraftChoice {
  Shape draft;
  int64_t tokens = 0;           // drafted per check
  double expected_kept = 0;     // per check
  double expected_speedup = 1;  // tokens per second over decoding token by token
};

struct DraftCosts {
  double target_ms = 0;       // one decode step of the target
  double draft_ms = 0;        // one decode step of the draft
  double check_extra_ms = 0;  // the target's cost per extra row checked in one step
};
// Expected tokens per second over token-by-token decoding: (1 + kept(k)) · target /
// (k · draft + target + k · extra).
double ExpectedSpeedup(const std::vector<double>& runs, int64_t k, const DraftCosts& c);

// The best draft and k for `target` over the profile's measured pairs, with the costs `costs`
// gives for a (target, draft) pair (nullopt: unknown, the pair is skipped); nullopt when no
// choice is expected to reach `min_speedup`.
std::optional<DraftChoice> ChooseDraft(
    const SupernetSpec& spec, const Shape& target,
    const std::function<std::optional<DraftCosts>(const Shape&, const Shape&)>& costs,
    double min_speedup = 1.1);

// A --draft-weights-dtype flag: the format drafts read their own copies in, or nullopt when the
// flag is empty or names the serving format (drafts read the target's panels).
absl::StatusOr<std::optional<WeightFormat>> ParseDraftFormat(std::string_view name,
                                                             WeightFormat serving);

// The best k for a given pair (the default 4 when the profile has no runs for it).
int64_t ChooseDraftTokens(const SupernetSpec& spec, const Shape& target, const Shape& draft,
                          const std::optional<DraftCosts>& costs);

}  // namespace amoeba
