#include "openai_response.h"

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
  if (r && r->draft)
    a["speculation"] = {{"draft", {{"depth", r->draft->depth}, {"width", r->draft->width}}},
                        {"drafted_tokens", r->drafted_tokens},
                        {"accepted_tokens", r->accepted_tokens},
                        {"checks", r->draft_rounds}};
  return a;
}

json CompletionBody(const OpenAiResponseHead& h, const std::string& text, const JobResult& r) {
  json choice = {{"index", 0}, {"finish_reason", OpenAiFinish(r.reason)}};
  if (h.chat) {
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  } else {
    choice["text"] = text;
    choice["logprobs"] = nullptr;
  }
  return {{"id", h.id},
          {"object", h.chat ? "chat.completion" : "text_completion"},
          {"created", h.created},
          {"model", h.model},
          {"choices", json::array({choice})},
          {"usage", Usage(r)},
          {"amoeba", AmoebaExtension(h, &r)}};
}

json ChunkBody(const OpenAiResponseHead& h, const json& delta_or_text, const json& finish) {
  json choice = {{"index", 0}, {"finish_reason", finish}};
  if (h.chat) {
    choice["delta"] = delta_or_text;
  } else {
    choice["text"] = delta_or_text;
    choice["logprobs"] = nullptr;
  }
  return {{"id", h.id},
          {"object", h.chat ? "chat.completion.chunk" : "text_completion"},
          {"created", h.created},
          {"model", h.model},
          {"choices", json::array({choice})}};
}

json LastChunkBody(const OpenAiResponseHead& h, const JobResult& r) {
  json last = ChunkBody(h, h.chat ? json::object() : json(""), OpenAiFinish(r.reason));
  last["usage"] = Usage(r);
  last["amoeba"] = AmoebaExtension(h, &r);
  return last;
}

}  // namespace amoeba
