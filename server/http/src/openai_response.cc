#include "openai_response.h"

#include "absl/strings/str_cat.h"
#include "server/tool_calls.h"

#include <cmath>

namespace amoeba {
using nlohmann::json;

const char* OpenAiFinish(FinishReason r) {
  switch (r) {
    case FinishReason::kEos:
    case FinishReason::kStopSequence:
      return "stop";
    case FinishReason::kTimeLimit:
      return "time_limit";
    default:
      return "length";
  }
}

absl::Status FinishError(const JobResult& r) {
  if (r.reason == FinishReason::kError)
    return r.error.ok() ? absl::InternalError("generation failed") : r.error;
  if (r.reason == FinishReason::kCancelled)
    return absl::UnavailableError("generation cancelled: the server is shutting down");
  return absl::OkStatus();
}

json Usage(const JobResult& r) {
  return json{{"prompt_tokens", r.prompt_tokens},
              {"completion_tokens", r.completion_tokens},
              {"total_tokens", r.prompt_tokens + r.completion_tokens},
              {"prompt_tokens_details", {{"cached_tokens", r.cached_tokens}}}};
}

json AmoebaExtension(const OpenAiResponseHead& h, const JobResult* r) {
  json a = {{"shape", {{"depth", h.shape.depth}, {"width", h.shape.width}}}};
  // The server's own clock, as gRPC's Timings: from arrival in the queue to the first token
  // sampled (what a client sees later when the first token's text is held back) and to the end.
  if (r)
    a["timings"] = {{"queue_ms", r->queue_ms},
                    {"time_to_first_token_ms", r->ttft_ms},
                    {"total_ms", r->total_ms}};
  if (h.load_plan) {
    const LoadPlan& p = *h.load_plan;
    a["load_plan"] = {
        {"idle_choice", {{"depth", p.idle_choice.depth}, {"width", p.idle_choice.width}}},
        {"idle_decode_ms", p.idle_decode_ms},
        {"predicted_decode_ms", p.predicted_decode_ms},
        {"sequences_in_flight", p.sequences_in_flight},
        {"load_changed_choice", p.load_changed_choice}};
  }
  if (r && r->draft)
    a["speculation"] = {{"draft", {{"depth", r->draft->depth}, {"width", r->draft->width}}},
                        {"drafted_tokens", r->drafted_tokens},
                        {"accepted_tokens", r->accepted_tokens},
                        {"checks", r->draft_rounds}};
  return a;
}

json LogprobsBody(bool chat, const std::vector<TokenLogprobs>& tokens,
                  const std::function<std::string(int32_t)>& piece,
                  const std::function<const std::string&(int32_t)>& bytes, int64_t* text_offset) {
  auto byte_list = [&](int32_t id) {
    json b = json::array();
    for (unsigned char c : bytes(id)) b.push_back(static_cast<int>(c));
    return b;
  };
  if (chat) {
    json content = json::array();
    for (const TokenLogprobs& t : tokens) {
      json top = json::array();
      for (const auto& [id, lp] : t.top)
        top.push_back({{"token", piece(id)}, {"logprob", lp}, {"bytes", byte_list(id)}});
      content.push_back({{"token", piece(t.token)},
                         {"logprob", std::isnan(t.logprob) ? json(nullptr) : json(t.logprob)},
                         {"bytes", byte_list(t.token)},
                         {"top_logprobs", std::move(top)}});
    }
    return {{"content", std::move(content)}, {"refusal", nullptr}};
  }
  json toks = json::array(), lps = json::array(), tops = json::array(), offsets = json::array();
  for (const TokenLogprobs& t : tokens) {
    toks.push_back(piece(t.token));
    offsets.push_back(*text_offset);
    *text_offset += static_cast<int64_t>(bytes(t.token).size());
    if (std::isnan(t.logprob)) {
      lps.push_back(nullptr);
      tops.push_back(nullptr);
      continue;
    }
    lps.push_back(t.logprob);
    json top = json::object();
    // OpenAI's map from piece to logprob: pieces may collide (byte tokens all read U+FFFD); the
    // most likely keeps its place.
    for (const auto& [id, lp] : t.top) top.emplace(piece(id), lp);
    tops.push_back(std::move(top));
  }
  return {{"tokens", std::move(toks)},
          {"token_logprobs", std::move(lps)},
          {"top_logprobs", std::move(tops)},
          {"text_offset", std::move(offsets)}};
}

json ToolCallsJson(const OpenAiResponseHead& h, int choice, const std::string& reply, bool delta) {
  bool complete = true;
  const auto calls = ParseToolCalls(reply, &complete);
  if (!calls) return nullptr;
  json out = json::array();
  for (size_t k = 0; k < calls->size(); ++k) {
    json call = {{"id", absl::StrCat("call_", h.id, "_", choice, "_", k)},
                 {"type", "function"},
                 {"function", {{"name", (*calls)[k].name}, {"arguments", (*calls)[k].arguments}}}};
    if (delta) call["index"] = k;
    out.push_back(std::move(call));
  }
  return out;
}

json CompletionChoice(const OpenAiResponseHead& h, int index, const std::string& text,
                      const JobResult& r, const json& logprobs) {
  json choice = {{"index", index}, {"finish_reason", OpenAiFinish(r.reason)}};
  const json calls = h.tool_calls ? ToolCallsJson(h, index, text, false) : json(nullptr);
  if (!calls.is_null()) {
    choice["message"] = {{"role", "assistant"}, {"content", nullptr}, {"tool_calls", calls}};
    // Cut short (length, time limit): the whole calls so far, and why it stopped.
    if (r.reason == FinishReason::kEos || r.reason == FinishReason::kStopSequence)
      choice["finish_reason"] = "tool_calls";
  } else if (h.chat) {
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  } else {
    choice["text"] = text;
  }
  choice["logprobs"] = logprobs;
  return choice;
}

json CompletionBody(const OpenAiResponseHead& h, json choices, const JobResult& r) {
  return {{"id", h.id},
          {"object", h.chat ? "chat.completion" : "text_completion"},
          {"created", h.created},
          {"model", h.model},
          {"choices", std::move(choices)},
          {"usage", Usage(r)},
          {"amoeba", AmoebaExtension(h, &r)}};
}

json ChunkBody(const OpenAiResponseHead& h, const json& delta_or_text, const json& finish,
               const json& logprobs, int index) {
  json choice = {{"index", index}, {"finish_reason", finish}};
  if (h.chat) {
    choice["delta"] = delta_or_text;
  } else {
    choice["text"] = delta_or_text;
  }
  choice["logprobs"] = logprobs;
  return {{"id", h.id},
          {"object", h.chat ? "chat.completion.chunk" : "text_completion"},
          {"created", h.created},
          {"model", h.model},
          {"choices", json::array({choice})}};
}

json LastChunkBody(const OpenAiResponseHead& h, const JobResult& r, const json& logprobs,
                   const char* finish) {
  json last = ChunkBody(h, h.chat ? json::object() : json(""),
                        finish ? finish : OpenAiFinish(r.reason), logprobs);
  last["usage"] = Usage(r);
  last["amoeba"] = AmoebaExtension(h, &r);
  return last;
}

json UsageChunkBody(const OpenAiResponseHead& h, const JobResult& r) {
  json last = ChunkBody(h, json::object(), nullptr);
  last["choices"] = json::array();
  last["usage"] = Usage(r);
  last["amoeba"] = AmoebaExtension(h, &r);
  return last;
}

}  // namespace amoeba
