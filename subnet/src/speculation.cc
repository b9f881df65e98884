#include "subnet/speculation.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "model/engine.h"

namespace amoeba {

absl::StatusOr<at::Tensor> GreedyNextTokens(const std::shared_ptr<const Model>& m,
                                            const at::Tensor& windows) {
  at::InferenceMode guard;
  const int64_t N = windows.size(0), T = windows.size(1);
  Engine e(m, {.max_len = T});
  KVCache cache = e.NewCache(1);
  at::Tensor out = at::empty({N, T}, at::kLong);
  std::vector<int32_t> ids(T);
  for (int64_t n = 0; n < N; ++n) {
    const at::Tensor w = windows[n].contiguous();
    for (int64_t t = 0; t < T; ++t) ids[t] = static_cast<int32_t>(w[t].item<int64_t>());
    cache.Reset(0);
    SeqInput in{0, ids, /*all_logits=*/true};
    auto logits = e.Forward(cache, {&in, 1});
    if (!logits.ok()) return logits.status();
    out[n].copy_(logits->argmax(1));
  }
  return out;
}

std::vector<double> DraftRunHistogram(const at::Tensor& target_tokens,
                                      const at::Tensor& draft_tokens) {
  std::vector<double> hist(kMaxDraftTokens + 1, 0.0);
  const at::Tensor agree = (target_tokens == draft_tokens).to(at::kByte).contiguous();
  const int64_t N = agree.size(0), T = agree.size(1);
  const uint8_t* a = agree.data_ptr<uint8_t>();
  int64_t count = 0;
  for (int64_t n = 0; n < N; ++n) {
    // Positions whose run could reach the cap inside the window (the rest would be cut short).
    const uint8_t* row = a + n * T;
    for (int64_t t = 0; t + kMaxDraftTokens <= T; ++t) {
      int64_t r = 0;
      while (r < kMaxDraftTokens && row[t + r]) ++r;
      hist[r] += 1;
      ++count;
    }
  }
  if (count > 0)
    for (double& h : hist) h /= static_cast<double>(count);
  return hist;
}

double ExpectedKept(const std::vector<double>& runs, int64_t k) {
  double e = 0;
  for (size_t r = 0; r < runs.size(); ++r)
    e += runs[r] * static_cast<double>(std::min<int64_t>(static_cast<int64_t>(r), k));
  return e;
}

double ExpectedSpeedup(const std::vector<double>& runs, int64_t k, const DraftCosts& c) {
  const double cost = static_cast<double>(k) * (c.draft_ms + c.check_extra_ms) + c.target_ms;
  if (cost <= 0) return 0;
  return (1.0 + ExpectedKept(runs, k)) * c.target_ms / cost;
}

namespace {
// The k in 1..kMaxDraftTokens with the best expected speedup for one pair (the smallest on ties).
int64_t BestTokens(const std::vector<double>& runs, const DraftCosts& c) {
  int64_t best = 1;
  for (int64_t k = 2; k <= kMaxDraftTokens; ++k)
    if (ExpectedSpeedup(runs, k, c) > ExpectedSpeedup(runs, best, c)) best = k;
  return best;
}
}  // namespace

std::optional<DraftChoice> ChooseDraft(
    const SupernetSpec& spec, const Shape& target,
    const std::function<std::optional<DraftCosts>(const Shape&, const Shape&)>& costs,
    double min_speedup) {
  const ShapeRecord* rec = spec.FindRecord(target);
  if (!rec) return std::nullopt;
  std::optional<DraftChoice> best;
  for (const auto& [key, runs] : rec->draft_runs) {
    auto draft = Shape::Parse(key, target.depth);
    if (!draft.ok() || *draft == target) continue;
    const auto c = costs(target, *draft);
    if (!c) continue;
    const int64_t k = BestTokens(runs, *c);
    const double s = ExpectedSpeedup(runs, k, *c);
    if (!best || s > best->expected_speedup)
      best = DraftChoice{*draft, k, ExpectedKept(runs, k), s};
  }
  if (!best || best->expected_speedup < min_speedup) return std::nullopt;
  return best;
}

absl::StatusOr<std::optional<WeightFormat>> ParseDraftFormat(std::string_view name,
                                                             WeightFormat serving) {
  if (name.empty()) return std::optional<WeightFormat>();
  auto f = ParseWeightFormat(name);
  if (!f.ok()) return absl::InvalidArgumentError(absl::StrCat("draft-", f.status().message()));
  return *f == serving ? std::optional<WeightFormat>() : std::optional<WeightFormat>(*f);
}

int64_t ChooseDraftTokens(const SupernetSpec& spec, const Shape& target, const Shape& draft,
                          const std::optional<DraftCosts>& costs) {
  constexpr int64_t kDefault = 4;
  const ShapeRecord* rec = spec.FindRecord(target);
  if (!costs || !rec) return kDefault;
  auto it = rec->draft_runs.find(draft.ToString());
  return it == rec->draft_runs.end() ? kDefault : BestTokens(it->second, *costs);
}

}  // namespace amoeba
