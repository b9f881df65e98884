#include "server/request.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "model/status_macros.h"
#include "model/token_logprobs.h"
#include "model/tokenizer.h"
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
  if (r.min_p && !(*r.min_p >= 0 && *r.min_p <= 1))
    return InvalidField("sampling.min_p", "must be in [0, 1]");
  for (const auto& [name, v] : {std::pair{"sampling.presence_penalty", r.presence_penalty},
                                std::pair{"sampling.frequency_penalty", r.frequency_penalty}})
    if (v && !(*v >= -2 && *v <= 2)) return InvalidField(name, "must be in [-2, 2]");
  if (r.logit_bias.size() > 300) return InvalidField("sampling.logit_bias", "more than 300 tokens");
  for (const auto& [token, bias] : r.logit_bias) {
    if (token < 0 || token >= vocab)
      return InvalidField(
          "sampling.logit_bias",
          absl::StrCat("token ", token, " is not in the vocabulary [0, ", vocab, ")"));
    if (!(bias >= -100 && bias <= 100))
      return InvalidField("sampling.logit_bias",
                          absl::StrCat("token ", token, ": bias must be in [-100, 100]"));
  }
  if (r.logprobs && (*r.logprobs < 0 || *r.logprobs > kMaxTopLogprobs))
    return InvalidField(
        "logprobs", absl::StrCat("must be in [0, ", kMaxTopLogprobs, "] (alternatives per token)"));
  // Scoring a prompt may ask for no new token at all.
  if ((r.grammar ? 1 : 0) + (r.json_schema ? 1 : 0) + (r.json_object ? 1 : 0) > 1)
    return InvalidField("grammar", "give one of a grammar, a JSON schema or json_object");
  if (r.grammar && r.grammar->size() > kMaxGrammarBytes)
    return InvalidField("grammar", absl::StrCat("over ", kMaxGrammarBytes, " bytes"));
  if (r.json_schema && r.json_schema->size() > kMaxGrammarBytes)
    return InvalidField("json_schema", absl::StrCat("over ", kMaxGrammarBytes, " bytes"));
  const int64_t min_new = r.prompt_logprobs ? 0 : 1;
  if (r.max_new_tokens && (*r.max_new_tokens < min_new || *r.max_new_tokens > l.max_new_tokens))
    return InvalidField("max_new_tokens",
                        absl::StrCat("must be in [", min_new, ", ", l.max_new_tokens, "]",
                                     min_new ? " (0 only when scoring the prompt)" : ""));
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
  if (r.priority && (*r.priority < -100 || *r.priority > 100))
    return InvalidField("priority", "must be in [-100, 100]");
  if (r.budget) return ValidateBudget(*r.budget);
  return absl::OkStatus();
}

}  // namespace amoeba
