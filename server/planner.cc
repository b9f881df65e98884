#include "server/planner.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace amoeba {

ShapeEstimateResult Estimate(const ShapeProfile& p, const PlanBudget& b, const HostSpeed& host) {
  ShapeEstimateResult e;
  e.profile = p;
  const bool client = b.bandwidth_gbs.has_value() || b.compute_gflops.has_value();
  const double bw = b.bandwidth_gbs.value_or(host.bandwidth_gbs);
  const double gflops = b.compute_gflops.value_or(host.compute_gflops);
  if (!client && p.measured_decode_ms) {
    e.decode_ms = *p.measured_decode_ms;
    e.latency_source = "measured";
  } else {
    e.decode_ms = static_cast<double>(p.decode_weight_bytes) / (bw * 1e9) * 1e3;
    e.latency_source = "roofline";
  }
  // Prefill is compute-bound: 2 FLOPs per weight per token, but never faster than one weight pass.
  e.prefill_ms =
      std::max(2.0 * static_cast<double>(p.params) * b.prompt_tokens / (gflops * 1e9) * 1e3,
               static_cast<double>(p.decode_weight_bytes) / (bw * 1e9) * 1e3);
  e.memory_bytes = p.weight_bytes + p.kv_bytes_per_token * b.max_context_tokens;
  if (p.heldout_perplexity) {
    e.quality = -*p.heldout_perplexity;
    e.quality_source = "heldout_perplexity";
  } else {
    e.quality = static_cast<double>(p.params);
    e.quality_source = "params";
  }
  return e;
}

std::vector<ShapeEstimateResult> EstimateAll(const std::vector<ShapeProfile>& profiles,
                                             const PlanBudget& b, const HostSpeed& host) {
  std::vector<ShapeEstimateResult> out;
  for (const auto& p : profiles) out.push_back(Estimate(p, b, host));
  return out;
}

namespace {
std::string Why(const ShapeEstimateResult& e, const PlanBudget& b) {
  std::string why;
  auto add = [&](const std::string& s) { absl::StrAppend(&why, why.empty() ? "" : ", ", s); };
  if (b.max_params && e.profile.params > *b.max_params)
    add(absl::StrCat("params ", e.profile.params, " > ", *b.max_params));
  const std::optional<int64_t> mem =
      b.max_memory_bytes ? b.max_memory_bytes : b.platform_memory_bytes;
  if (mem && e.memory_bytes > *mem)
    add(absl::StrCat("memory ", e.memory_bytes, " B > ", *mem, " B"));
  if (b.max_decode_ms_per_token && e.decode_ms > *b.max_decode_ms_per_token)
    add(absl::StrFormat("decode %.2f ms/token > %.2f", e.decode_ms, *b.max_decode_ms_per_token));
  if (b.max_prefill_ms && e.prefill_ms > *b.max_prefill_ms)
    add(absl::StrFormat("prefill %.1f ms > %.1f", e.prefill_ms, *b.max_prefill_ms));
  return why;
}
}  // namespace

absl::StatusOr<PlanResult> PlanShape(const std::vector<ShapeProfile>& profiles, const PlanBudget& b,
                                     const HostSpeed& host) {
  if (profiles.empty()) return absl::FailedPreconditionError("no shapes");
  auto all = EstimateAll(profiles, b, host);
  PlanResult r;
  // Frontier: no other shape has higher-or-equal quality and lower-or-equal latency (one strictly).
  for (const auto& e : all) {
    bool dominated = false;
    for (const auto& o : all) {
      if ((o.quality >= e.quality && o.decode_ms <= e.decode_ms) &&
          (o.quality > e.quality || o.decode_ms < e.decode_ms)) {
        dominated = true;
        break;
      }
    }
    if (!dominated) r.frontier.push_back(e);
  }
  std::sort(r.frontier.begin(), r.frontier.end(),
            [](const auto& a, const auto& b) { return a.decode_ms < b.decode_ms; });
  const ShapeEstimateResult* best = nullptr;
  for (const auto& e : all) {
    if (!Why(e, b).empty()) continue;
    if (!best || e.quality > best->quality ||
        (e.quality == best->quality && e.decode_ms < best->decode_ms))
      best = &e;
  }
  if (!best) {
    const ShapeEstimateResult* smallest = &all[0];
    for (const auto& e : all)
      if (e.profile.params < smallest->profile.params) smallest = &e;
    return absl::FailedPreconditionError(absl::StrCat("no shape fits the budget; the smallest, ",
                                                      smallest->profile.shape.ToString(),
                                                      ", needs ", Why(*smallest, b)));
  }
  r.chosen = *best;
  // Quality is "higher is better" (minus the perplexity); show the perplexity itself.
  const bool by_ppl = best->profile.heldout_perplexity.has_value();
  r.explanation = absl::StrFormat(
      "%s: %s %g, the best among shapes within the budget; %.2f ms/token decode (%s), %.1f ms "
      "prefill for %d tokens, %lld bytes with a %d-token context",
      best->profile.shape.ToString(), by_ppl ? "held-out perplexity" : "parameters",
      by_ppl ? -best->quality : best->quality, best->decode_ms, best->latency_source,
      best->prefill_ms, b.prompt_tokens, static_cast<long long>(best->memory_bytes),
      b.max_context_tokens);
  return r;
}

std::vector<ShapeProfile> ProfilesFromSupernet(const Supernet& s) {
  std::vector<ShapeProfile> out;
  for (const auto& j : s.spec().profile) {
    ShapeProfile p;
    p.shape = {j.value("depth", int64_t{0}), j.value("width", 1.0)};
    p.params = j.value("params", int64_t{0});
    p.weight_bytes = j.value("weight_bytes", int64_t{0});
    p.decode_weight_bytes = j.value("decode_weight_bytes", p.weight_bytes);
    p.kv_bytes_per_token = j.value("kv_bytes_per_token", int64_t{0});
    if (j.contains("heldout_perplexity"))
      p.heldout_perplexity = j["heldout_perplexity"].get<double>();
    if (j.contains("decode_ms_per_token"))
      p.measured_decode_ms = j["decode_ms_per_token"].get<double>();
    out.push_back(p);
  }
  return out;
}

}  // namespace amoeba
