#include "proto_convert.h"

#include <algorithm>

namespace amoeba {

PlanBudget BudgetFromProto(const v1::Budget& b) {
  PlanBudget p;
  if (b.has_max_params()) p.max_params = b.max_params();
  if (b.has_max_memory_bytes()) p.max_memory_bytes = b.max_memory_bytes();
  if (b.has_max_decode_ms_per_token()) p.max_decode_ms_per_token = b.max_decode_ms_per_token();
  if (b.has_max_prefill_ms()) p.max_prefill_ms = b.max_prefill_ms();
  if (b.has_prompt_tokens()) p.prompt_tokens = b.prompt_tokens();
  if (b.has_max_context_tokens()) p.max_context_tokens = b.max_context_tokens();
  if (b.has_platform()) {
    const auto& pl = b.platform();
    if (pl.has_memory_bandwidth_gbs()) p.bandwidth_gbs = pl.memory_bandwidth_gbs();
    if (pl.has_compute_gflops()) p.compute_gflops = pl.compute_gflops();
    if (pl.has_memory_bytes()) p.platform_memory_bytes = pl.memory_bytes();
  }
  return p;
}

GenerationRequest GenerationRequestFromProto(const v1::GenerateRequest& r) {
  GenerationRequest g;
  g.request_id = r.request_id();
  if (r.has_tokens())
    g.tokens = std::vector<int32_t>(r.tokens().ids().begin(), r.tokens().ids().end());
  else if (r.prompt_case() == v1::GenerateRequest::kText)
    g.text = r.text();
  g.add_bos = !r.has_add_bos() || r.add_bos();
  if (r.has_shape()) g.shape = Shape{r.shape().depth(), r.shape().width()};
  if (r.has_budget()) g.budget = BudgetFromProto(r.budget());
  const auto& sp = r.sampling();
  if (sp.has_temperature()) g.temperature = sp.temperature();
  if (sp.has_top_k()) g.top_k = sp.top_k();
  if (sp.has_top_p()) g.top_p = sp.top_p();
  if (sp.has_repetition_penalty()) g.repetition_penalty = sp.repetition_penalty();
  if (sp.has_seed()) g.seed = sp.seed();
  if (sp.has_min_p()) g.min_p = sp.min_p();
  if (sp.has_presence_penalty()) g.presence_penalty = sp.presence_penalty();
  if (sp.has_frequency_penalty()) g.frequency_penalty = sp.frequency_penalty();
  for (const auto& [token, bias] : sp.logit_bias()) g.logit_bias.emplace_back(token, bias);
  std::sort(g.logit_bias.begin(), g.logit_bias.end());  // map order is unspecified
  if (r.has_logprobs()) g.logprobs = r.logprobs();
  g.prompt_logprobs = r.prompt_logprobs();
  if (r.has_grammar()) g.grammar = r.grammar();
  if (r.has_json_schema()) g.json_schema = r.json_schema();
  g.json_object = r.has_json_object() && r.json_object();
  if (r.has_max_new_tokens()) g.max_new_tokens = r.max_new_tokens();
  g.stop.assign(r.stop().begin(), r.stop().end());
  if (r.has_time_limit_ms()) g.time_limit_ms = r.time_limit_ms();
  if (r.has_priority()) g.priority = r.priority();
  if (r.has_speculate()) g.speculate = r.speculate();
  if (r.has_draft_tokens()) g.draft_tokens = r.draft_tokens();
  return g;
}

ExportRequest ExportRequestFromProto(const v1::ExportSubnetRequest& r) {
  ExportRequest e;
  e.request_id = r.request_id();
  e.shape = Shape{r.shape().depth(), r.shape().width()};
  e.uniform_width = r.uniform_width();
  e.adapters = !r.no_adapters();
  e.format = r.format();
  e.dtype = r.dtype();
  return e;
}

void SetShape(const Shape& s, v1::Shape* out) {
  out->set_depth(static_cast<int32_t>(s.depth));
  out->set_width(s.width);
}

v1::ShapeEstimate ToProto(const ShapeEstimateResult& e) {
  v1::ShapeEstimate p;
  SetShape(e.profile.shape, p.mutable_shape());
  p.set_params(e.profile.params);
  p.set_weight_bytes(e.profile.weight_bytes);
  p.set_kv_bytes_per_token(e.profile.kv_bytes_per_token);
  p.set_decode_ms_per_token(e.decode_ms);
  p.set_prefill_ms(e.prefill_ms);
  p.set_memory_bytes(e.memory_bytes);
  p.set_quality(e.quality);
  p.set_quality_source(e.quality_source);
  p.set_latency_source(e.latency_source);
  return p;
}

v1::FinishReason ToProto(FinishReason r) {
  switch (r) {
    case FinishReason::kLength:
      return v1::LENGTH;
    case FinishReason::kEos:
      return v1::EOS;
    case FinishReason::kStopSequence:
      return v1::STOP_SEQUENCE;
    case FinishReason::kCancelled:
      return v1::CANCELLED;
    case FinishReason::kTimeLimit:
      return v1::TIME_LIMIT;
    case FinishReason::kError:
      return v1::ERROR;
    default:
      return v1::FINISH_REASON_UNSPECIFIED;
  }
}

}  // namespace amoeba
