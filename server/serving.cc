#include "server/serving.h"

#include "subnet/speculation.h"

#include <cmath>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "model/status_macros.h"
#include "model/tokenizer.h"
#include "model/weight_format.h"
#include "server/request_checks.h"

namespace amoeba {
absl::Status InvalidField(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", why));
}

absl::Status ValidateBudget(const PlanBudget& b) {
  if (b.max_params && *b.max_params <= 0) return InvalidField("budget.max_params", "must be > 0");
  if (b.max_memory_bytes && *b.max_memory_bytes <= 0)
    return InvalidField("budget.max_memory_bytes", "must be > 0");
  if (b.max_decode_ms_per_token && !(*b.max_decode_ms_per_token > 0))
    return InvalidField("budget.max_decode_ms_per_token", "must be > 0");
  if (b.max_prefill_ms && !(*b.max_prefill_ms > 0))
    return InvalidField("budget.max_prefill_ms", "must be > 0");
  if (b.prompt_tokens <= 0) return InvalidField("budget.prompt_tokens", "must be > 0");
  if (b.max_context_tokens <= 0) return InvalidField("budget.max_context_tokens", "must be > 0");
  if (b.bandwidth_gbs && !(*b.bandwidth_gbs > 0 && *b.bandwidth_gbs <= 1e6))
    return InvalidField("budget.platform.memory_bandwidth_gbs", "must be in (0, 1e6]");
  if (b.compute_gflops && !(*b.compute_gflops > 0 && *b.compute_gflops <= 1e9))
    return InvalidField("budget.platform.compute_gflops", "must be in (0, 1e9]");
  if (b.platform_memory_bytes && *b.platform_memory_bytes <= 0)
    return InvalidField("budget.platform.memory_bytes", "must be > 0");
  return absl::OkStatus();
}

absl::Status ValidateGenerationRequest(const GenerationRequest& r, const ServiceLimits& l,
                                       int64_t vocab) {
  RETURN_IF_ERROR(ValidateRequestId(r.request_id));
  if (!r.text && !r.tokens) return InvalidField("prompt", "empty (set text or tokens)");
  if (r.tokens) {
    const auto& ids = *r.tokens;
    if (ids.empty()) return InvalidField("prompt.tokens", "empty");
    if (static_cast<int64_t>(ids.size()) > l.max_prompt_tokens)
      return InvalidField("prompt.tokens", absl::StrCat(ids.size(), " tokens exceed the limit of ",
                                                        l.max_prompt_tokens));
    for (int32_t id : ids)
      if (id < 0 || id >= vocab)
        return InvalidField("prompt.tokens", absl::StrCat("id ", id, " outside [0, ", vocab, ")"));
  } else {
    if (r.text->empty()) return InvalidField("prompt.text", "empty");
    if (static_cast<int64_t>(r.text->size()) > l.max_prompt_bytes)
      return InvalidField("prompt.text", absl::StrCat(r.text->size(), " bytes exceed the limit of ",
                                                      l.max_prompt_bytes));
    if (!IsValidUtf8(*r.text)) return InvalidField("prompt.text", "not valid UTF-8");
  }
  if (r.temperature && !(*r.temperature >= 0 && std::isfinite(*r.temperature)))
    return InvalidField("sampling.temperature", "must be >= 0");
  if (r.top_k && (*r.top_k < 0 || *r.top_k > vocab))
    return InvalidField("sampling.top_k",
                        absl::StrCat("must be in [0, ", vocab, "] (the vocabulary)"));
  if (r.top_p && !(*r.top_p > 0 && *r.top_p <= 1))
    return InvalidField("sampling.top_p", "must be in (0, 1]");
  if (r.repetition_penalty && !(*r.repetition_penalty > 0 && std::isfinite(*r.repetition_penalty)))
    return InvalidField("sampling.repetition_penalty", "must be > 0");
  if (r.max_new_tokens && (*r.max_new_tokens < 1 || *r.max_new_tokens > l.max_new_tokens))
    return InvalidField("max_new_tokens", absl::StrCat("must be in [1, ", l.max_new_tokens, "]"));
  if (static_cast<int64_t>(r.stop.size()) > l.max_stop_strings)
    return InvalidField("stop", absl::StrCat("more than ", l.max_stop_strings, " strings"));
  for (const auto& st : r.stop) {
    if (st.empty()) return InvalidField("stop", "empty string");
    if (static_cast<int64_t>(st.size()) > l.max_stop_length)
      return InvalidField("stop", absl::StrCat("longer than ", l.max_stop_length, " bytes"));
    if (!IsValidUtf8(st)) return InvalidField("stop", "not valid UTF-8");
  }
  if (r.time_limit_ms && (*r.time_limit_ms <= 0 || *r.time_limit_ms > l.max_time_limit_ms))
    return InvalidField("time_limit_ms", absl::StrCat("must be in [1, ", l.max_time_limit_ms, "]"));
  if (r.budget) return ValidateBudget(*r.budget);
  return absl::OkStatus();
}

Serving::Serving(const Supernet& supernet, const Smol* smol, Scheduler& scheduler, Metrics* metrics,
                 ServiceOptions options, HostSpeed host, std::vector<ShapeProfile> profiles)
    : supernet_(supernet),
      smol_(smol),
      scheduler_(scheduler),
      metrics_(metrics),
      options_(std::move(options)),
      host_(host),
      profiles_(std::move(profiles)),
      export_dir_(options_.export_tmp_dir.empty() ? std::filesystem::temp_directory_path().string()
                                                  : options_.export_tmp_dir),
      export_workers_(options_.export_workers) {
  RemoveStaleStagingDirs(export_dir_);
}

std::string Serving::NewRequestId() {
  return absl::StrCat("req-", next_id_++);
}

absl::Status Serving::CheckAuth(std::optional<std::string_view> authorization,
                                bool export_call) const {
  if (options_.auth_token.empty()) {
    if (export_call && !options_.allow_unauthenticated_export) {
      return absl::PermissionDeniedError(
          "ExportSubnet is disabled: the server has no --auth-token (an operator may pass "
          "--allow-unauthenticated-export)");
    }
    return absl::OkStatus();
  }
  if (!export_call && !options_.token_for_all) return absl::OkStatus();
  if (!authorization) return absl::UnauthenticatedError("missing authorization: Bearer <token>");
  // Compared in time independent of where the first difference is.
  const std::string want = "Bearer " + options_.auth_token;
  const std::string_view got = *authorization;
  unsigned char diff = got.size() == want.size() ? 0 : 1;
  for (size_t i = 0; i < want.size(); ++i)
    diff |= static_cast<unsigned char>(want[i] ^ (i < got.size() ? got[i] : 0));
  if (diff != 0) return absl::PermissionDeniedError("invalid token");
  return absl::OkStatus();
}

absl::StatusOr<Shape> Serving::ResolveTarget(const std::optional<Shape>& shape,
                                             const std::optional<PlanBudget>& budget) const {
  if (shape) {
    Shape s = *shape;
    if (s.width == 0) s.width = 1.0;  // unset width: full
    if (s.depth == 0) s.depth = supernet_.base().config.num_hidden_layers;
    RETURN_IF_ERROR(supernet_.Validate(s));
    return s;
  }
  if (budget) {
    ASSIGN_OR_RETURN(PlanResult p, PlanShape(profiles_, *budget, host_));
    return p.chosen.profile.shape;
  }
  return supernet_.FullShape();
}

absl::StatusOr<std::shared_ptr<Job>> Serving::PrepareJob(const GenerationRequest& r,
                                                         const std::string& id) const {
  RETURN_IF_ERROR(
      ValidateGenerationRequest(r, options_.limits, supernet_.base().config.vocab_size));
  ASSIGN_OR_RETURN(Shape shape, ResolveTarget(r.shape, r.budget));
  auto job = std::make_shared<Job>();
  job->request_id = id;
  job->shape = shape;
  if (r.tokens) {
    job->prompt = *r.tokens;
  } else {
    if (r.add_bos)
      job->prompt.push_back(static_cast<int32_t>(supernet_.base().config.bos_token_id));
    for (int32_t t : supernet_.tokenizer()->Encode(*r.text)) job->prompt.push_back(t);
  }
  if (static_cast<int64_t>(job->prompt.size()) > options_.limits.max_prompt_tokens) {
    return InvalidField("prompt", absl::StrCat(job->prompt.size(), " tokens exceed the limit of ",
                                               options_.limits.max_prompt_tokens));
  }
  job->gen.sampling.temperature = r.temperature.value_or(0.f);
  job->gen.sampling.top_k = r.top_k.value_or(0);
  job->gen.sampling.top_p = r.top_p.value_or(1.f);
  job->gen.sampling.repetition_penalty = r.repetition_penalty.value_or(1.f);
  job->gen.sampling.seed = r.seed.value_or(0);
  job->gen.max_new_tokens = r.max_new_tokens.value_or(128);
  job->gen.stop = r.stop;
  job->gen.time_limit_ms = r.time_limit_ms.value_or(0);
  std::string speculate = r.speculate.value_or(options_.speculate);
  if (!r.speculate && speculate != "auto" && speculate != "off") {
    // The server's default draft does not draft for itself.
    auto d = Shape::Parse(speculate, supernet_.base().config.num_hidden_layers);
    if (d.ok() && *d == shape) speculate = "off";
  }
  ASSIGN_OR_RETURN(auto draft, ResolveDraft(shape, speculate, r.draft_tokens));
  if (draft) {
    job->draft = draft->draft;
    job->draft_tokens = draft->tokens;
  }
  return job;
}

absl::StatusOr<std::optional<Serving::DraftPlan>> Serving::ResolveDraft(
    const Shape& target, const std::string& speculate, std::optional<int64_t> tokens) const {
  if (tokens && (*tokens < 1 || *tokens > kMaxDraftTokens))
    return InvalidField("draft_tokens", absl::StrCat("must be in [1, ", kMaxDraftTokens, "]"));
  // Decode costs on this host (the start-up profile), check costs scaled from eval's host.
  auto decode_ms = [&](const Shape& s) -> std::optional<double> {
    for (const ShapeProfile& p : profiles_)
      if (p.shape == s && p.measured_decode_ms) return *p.measured_decode_ms;
    const ShapeRecord* r = supernet_.spec().FindRecord(s);
    return r ? r->decode_ms_per_token : std::nullopt;
  };
  auto draft_ms = [&](const Shape& s) -> std::optional<double> {
    auto ms = decode_ms(s);
    if (!ms || options_.draft_weights_dtype.empty() ||
        options_.draft_weights_dtype == options_.weights_dtype)
      return ms;
    const ShapeRecord* r = supernet_.spec().FindRecord(s);
    if (r && r->decode_ms_per_token) {
      auto it = r->decode_ms_by_dtype.find(options_.draft_weights_dtype);
      if (it != r->decode_ms_by_dtype.end()) return *ms * it->second / *r->decode_ms_per_token;
    }
    const auto serving = ParseWeightFormat(options_.weights_dtype),
               draft = ParseWeightFormat(options_.draft_weights_dtype);
    if (!serving.ok() || !draft.ok()) return ms;
    return *ms * BytesPerWeight(*draft) / BytesPerWeight(*serving);
  };
  auto costs = [&](const Shape& t, const Shape& d) -> std::optional<DraftCosts> {
    const auto tm = decode_ms(t), dm = draft_ms(d);
    if (!tm || !dm) return std::nullopt;
    DraftCosts c{*tm, *dm, 0};
    const ShapeRecord* r = supernet_.spec().FindRecord(t);
    if (r && r->check_ms_per_extra_token && r->decode_ms_per_token)
      c.check_extra_ms = *r->check_ms_per_extra_token / *r->decode_ms_per_token * *tm;
    return c;
  };
  if (speculate == "off") return std::nullopt;
  if (speculate == "auto" || speculate.empty()) {
    auto c = ChooseDraft(supernet_.spec(), target, costs, options_.speculate_min_speedup);
    if (!c) return std::nullopt;
    return DraftPlan{c->draft, tokens.value_or(c->tokens)};
  }
  auto draft = Shape::Parse(speculate, supernet_.base().config.num_hidden_layers);
  if (!draft.ok())
    return InvalidField(
        "speculate", absl::StrCat("\"", speculate.substr(0, 64), "\" is not auto, off or a shape: ",
                                  std::string(draft.status().message())));
  if (absl::Status st = supernet_.Validate(*draft); !st.ok())
    return InvalidField("speculate", std::string(st.message()));
  if (*draft == target)
    return InvalidField("speculate", "the draft must be another shape than the target");
  return DraftPlan{*draft, tokens.value_or(ChooseDraftTokens(supernet_.spec(), target, *draft,
                                                             costs(target, *draft)))};
}

absl::StatusOr<PlanResult> Serving::Plan(const PlanBudget& b) const {
  RETURN_IF_ERROR(ValidateBudget(b));
  return PlanShape(profiles_, b, host_);
}

absl::StatusOr<ExportPlanResult> Serving::PlanExport(const PlanBudget& b) const {
  RETURN_IF_ERROR(ValidateBudget(b));
  return amoeba::PlanExport(profiles_, b, host_);
}

std::vector<ShapeEstimateResult> Serving::Shapes() const {
  return EstimateAll(profiles_, PlanBudget{}, host_);
}

}  // namespace amoeba
