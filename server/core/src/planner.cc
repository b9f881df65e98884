#include "server/planner.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/gguf_model.h"
#include "subnet/frontier.h"
#include "subnet/supernet.h"

namespace amoeba {

namespace {

// What every shape of a set shares: the planner ranks and times all shapes alike, never a
// measured figure for some against an estimate for others.
struct Sources {
  bool perplexity = true;  // every shape has a held-out perplexity
  bool measured = true;    // every shape has a measured decode latency on this host
  int64_t with_perplexity = 0, total = 0;
};

Sources CommonSources(const std::vector<ShapeProfile>& profiles) {
  Sources s;
  s.total = static_cast<int64_t>(profiles.size());
  for (const auto& p : profiles) {
    s.perplexity &= p.heldout_perplexity.has_value();
    s.measured &= p.measured_decode_ms.has_value();
    s.with_perplexity += p.heldout_perplexity.has_value();
  }
  return s;
}

ShapeEstimateResult EstimateWith(const ShapeProfile& p, const PlanBudget& b, const HostSpeed& host,
                                 const Sources& src) {
  ShapeEstimateResult e;
  e.profile = p;
  const bool client = b.bandwidth_gbs.has_value() || b.compute_gflops.has_value();
  const double bw = b.bandwidth_gbs.value_or(host.bandwidth_gbs);
  const double gflops = b.compute_gflops.value_or(host.compute_gflops);
  if (!client && src.measured && p.measured_decode_ms) {
    e.decode_ms = *p.measured_decode_ms;
    e.latency_source = "measured";
  } else {
    e.decode_ms = static_cast<double>(p.decode_weight_bytes) / (bw * 1e9) * 1e3;
    e.latency_source = "roofline";
  }
  // Prefill is compute-bound: 2 FLOPs per weight per token, but never faster than one weight pass.
  e.prefill_ms = std::max(2.0 * static_cast<double>(p.params) *
                              static_cast<double>(b.prompt_tokens) / (gflops * 1e9) * 1e3,
                          static_cast<double>(p.decode_weight_bytes) / (bw * 1e9) * 1e3);
  // In double: a client's context length times KV bytes must not overflow.
  e.memory_bytes = static_cast<int64_t>(std::min(
      9e18, static_cast<double>(p.weight_bytes) + static_cast<double>(p.kv_bytes_per_token) *
                                                      static_cast<double>(b.max_context_tokens)));
  if (src.perplexity && p.heldout_perplexity) {
    e.quality = -*p.heldout_perplexity;
    e.quality_source = "heldout_perplexity";
  } else {
    e.quality = static_cast<double>(p.params);
    e.quality_source = "params";
  }
  return e;
}

}  // namespace

std::vector<ShapeEstimateResult> EstimateAll(const std::vector<ShapeProfile>& profiles,
                                             const PlanBudget& b, const HostSpeed& host) {
  const Sources src = CommonSources(profiles);
  std::vector<ShapeEstimateResult> out;
  for (const auto& p : profiles) out.push_back(EstimateWith(p, b, host, src));
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

std::vector<ShapeEstimateResult> FittingShapes(const std::vector<ShapeProfile>& profiles,
                                               const PlanBudget& b, const HostSpeed& host) {
  std::vector<ShapeEstimateResult> out;
  for (auto& e : EstimateAll(profiles, b, host))
    if (Why(e, b).empty()) out.push_back(std::move(e));
  std::stable_sort(out.begin(), out.end(), [](const auto& x, const auto& y) {
    return x.quality > y.quality || (x.quality == y.quality && x.decode_ms < y.decode_ms);
  });
  return out;
}

absl::StatusOr<PlanResult> PlanShape(const std::vector<ShapeProfile>& profiles, const PlanBudget& b,
                                     const HostSpeed& host) {
  if (profiles.empty()) return absl::FailedPreconditionError("no shapes");
  const Sources src = CommonSources(profiles);
  auto all = EstimateAll(profiles, b, host);
  PlanResult r;
  std::vector<FrontierPoint> points;
  for (const auto& e : all) points.push_back({e.decode_ms, e.quality});
  for (size_t i : ParetoFrontier(points)) r.frontier.push_back(all[i]);
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
  const bool by_ppl = best->quality_source == "heldout_perplexity";
  r.explanation = absl::StrFormat(
      "%s: %s %g, the best among shapes within the budget; %.2f ms/token decode (%s), %.1f ms "
      "prefill for %d tokens, %lld bytes with a %d-token context",
      best->profile.shape.ToString(), by_ppl ? "held-out perplexity" : "parameters",
      by_ppl ? -best->quality : best->quality, best->decode_ms, best->latency_source,
      best->prefill_ms, b.prompt_tokens, static_cast<long long>(best->memory_bytes),
      b.max_context_tokens);
  if (!by_ppl) {
    absl::StrAppend(&r.explanation, "; ranked by parameters: held-out perplexity is known for ",
                    src.with_perplexity, " of ", src.total, " shapes (run amoeba-admin eval)");
  }
  return r;
}

absl::StatusOr<ExportPlanResult> PlanExport(const std::vector<ShapeProfile>& profiles,
                                            const PlanBudget& b, const HostSpeed& host) {
  if (profiles.empty()) return absl::FailedPreconditionError("no shapes");
  std::optional<ExportPlanResult> best;
  std::string smallest_why;  // of the smallest shape in q4_0, the cheapest file there is
  for (WeightFormat f : {WeightFormat::kF16, WeightFormat::kQ8_0, WeightFormat::kQ4_0}) {
    std::vector<ShapeProfile> in_format = profiles;
    for (ShapeProfile& p : in_format) {
      const double decode_share = p.weight_bytes > 0 ? static_cast<double>(p.decode_weight_bytes) /
                                                           static_cast<double>(p.weight_bytes)
                                                     : 1.0;
      const int64_t known = p.gguf_bytes[static_cast<int>(f)];
      p.weight_bytes =
          known > 0 ? known
                    : static_cast<int64_t>(static_cast<double>(p.params) * BytesPerWeight(f));
      p.decode_weight_bytes =
          static_cast<int64_t>(decode_share * static_cast<double>(p.weight_bytes));
      p.measured_decode_ms.reset();  // the client's platform, not this host
    }
    const std::vector<ShapeEstimateResult> all = EstimateAll(in_format, b, host);
    if (f == WeightFormat::kQ4_0) {
      const ShapeEstimateResult* smallest = &all[0];
      for (const auto& e : all)
        if (e.profile.params < smallest->profile.params) smallest = &e;
      smallest_why =
          absl::StrCat(smallest->profile.shape.ToString(), ", in q4_0 needs ", Why(*smallest, b));
    }
    for (const ShapeEstimateResult& e : all) {
      if (!Why(e, b).empty()) continue;
      // Strictly better quality only: at equal quality the earlier (more precise) dtype stays.
      if (!best || e.quality > best->chosen.quality) {
        best = ExportPlanResult{e, f, e.profile.weight_bytes, ""};
      }
    }
  }
  if (!best)
    return absl::FailedPreconditionError(
        absl::StrCat("no shape fits the budget in any export dtype; the smallest, ", smallest_why,
                     " (memory = weights + KV for max_context_tokens)"));
  const bool by_ppl = best->chosen.quality_source == "heldout_perplexity";
  best->explanation = absl::StrFormat(
      "%s in %s: a GGUF file of %lld tensor bytes (plus the header: tokenizer); %s %g, the best "
      "shape that fits in any dtype, in the most "
      "precise dtype it fits in; %.2f ms/token decode (roofline), %lld bytes with a %d-token "
      "context",
      best->chosen.profile.shape.ToString(), WeightFormatName(best->format),
      static_cast<long long>(best->file_bytes), by_ppl ? "held-out perplexity" : "parameters",
      by_ppl ? -best->chosen.quality : best->chosen.quality, best->chosen.decode_ms,
      static_cast<long long>(best->chosen.memory_bytes), b.max_context_tokens);
  return *best;
}

std::vector<ShapeProfile> ProfilesFromSupernet(const Supernet& s, int64_t kv_element_bytes) {
  std::vector<ShapeProfile> out;
  for (const Shape& sh : s.GridShapes()) {
    auto m = s.Extract(sh);
    if (!m.ok()) continue;
    ShapeProfile p;
    p.shape = sh;
    p.params = m->config.ParameterCount();
    p.decode_weight_bytes = m->DecodeWeightBytes();
    // Decode reads the projections and the head; the embedding is resident too.
    p.weight_bytes = p.decode_weight_bytes + m->embed.numel() * m->embed.element_size();
    for (WeightFormat f :
         {WeightFormat::kF32, WeightFormat::kF16, WeightFormat::kQ8_0, WeightFormat::kQ4_0})
      p.gguf_bytes[static_cast<int>(f)] = GgufTensorBytes(*m, f);
    p.kv_bytes_per_token = m->KvBytesPerPosition(kv_element_bytes);
    for (const ShapeRecord& r : s.spec().profile) {
      if (r.shape == sh && r.heldout_perplexity) p.heldout_perplexity = r.heldout_perplexity;
    }
    out.push_back(p);
  }
  return out;
}

}  // namespace amoeba
