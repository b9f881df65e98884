// OpenAI response bodies: whole completions, streamed chunks, usage, finish reasons, and the
// "amoeba" extension (the shape served and what drafting did).
#pragma once
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/token_logprobs.h"
#include "server/job_result.h"

namespace amoeba {

// What one response's bodies share.
struct OpenAiResponseHead {
  std::string id;     // "cmpl-<request id>" / "chatcmpl-<request id>"
  std::string model;  // as the client named it
  int64_t created = 0;
  bool chat = false;
  bool logprobs = false;  // the client asked for log-probabilities
  bool echo = false;      // completions: the prompt's text (and tokens) come first
  std::string echo_text;
  int32_t first_prompt_token = -1;  // echo: the one prompt token nothing predicts
  bool tool_calls = false;          // chat with tools: a reply may be calls
  Shape shape;
  std::optional<LoadPlan> load_plan;  // budget planned against the load in flight
};

// OpenAI's values: "stop" (EOS or a stop string), "length"; a time limit is "time_limit" (an
// extension: OpenAI has none). Cancelled and failed requests get no finish reason: they end
// with an error (FinishError).
const char* OpenAiFinish(FinishReason r);
// The status a request that did not finish ends with: its error, or UNAVAILABLE for a
// cancellation (the server drains; a client that left reads nothing). OK otherwise.
absl::Status FinishError(const JobResult& r);

nlohmann::json Usage(const JobResult& r);
nlohmann::json AmoebaExtension(const OpenAiResponseHead& h, const JobResult* r);
// Chat with tools: the calls of a reply in OpenAI's shape ([{id, type, function: {name,
// arguments}}]; streamed deltas also number them with "index"), or null when the reply is text.
// A reply cut short inside a later call gives the whole calls before it.
nlohmann::json ToolCallsJson(const OpenAiResponseHead& h, int choice, const std::string& reply,
                             bool delta);
// A whole (non-streamed) response.
// One choice of a whole response: its text (chat: the message), finish reason and logprobs.
nlohmann::json CompletionChoice(const OpenAiResponseHead& h, int index, const std::string& text,
                                const JobResult& r, const nlohmann::json& logprobs = nullptr);
// A whole response: its choices; usage and the extension from `r` (with n choices: the first
// choice's result, completion tokens summed over all).
nlohmann::json CompletionBody(const OpenAiResponseHead& h, nlohmann::json choices,
                              const JobResult& r);
// Log-probabilities of consecutive new tokens in OpenAI's shape: chat's {"content": [{"token",
// "logprob", "bytes", "top_logprobs"}]}, completions' {"tokens", "token_logprobs",
// "top_logprobs", "text_offset"} (offsets into the completion's text, from *text_offset on, which
// advances). `piece` and `bytes` give a token's text (UTF-8) and raw bytes. A NaN logprob (the
// prompt's first token, which nothing predicts) is null, as its alternatives.
nlohmann::json LogprobsBody(bool chat, const std::vector<TokenLogprobs>& tokens,
                            const std::function<std::string(int32_t)>& piece,
                            const std::function<const std::string&(int32_t)>& bytes,
                            int64_t* text_offset);

// One streamed chunk: a text delta (or, for chat, a delta object), the finish reason, and the
// log-probabilities of its tokens (null: none asked for).
nlohmann::json ChunkBody(const OpenAiResponseHead& h, const nlohmann::json& delta_or_text,
                         const nlohmann::json& finish, const nlohmann::json& logprobs = nullptr,
                         int index = 0);
// The last streamed chunk: finish reason, usage and the extension.
// `finish`: the reason to give instead of r's ("tool_calls").
nlohmann::json LastChunkBody(const OpenAiResponseHead& h, const JobResult& r,
                             const nlohmann::json& logprobs = nullptr,
                             const char* finish = nullptr);
// With n choices, after each choice's finish chunk: no choices, the usage and the extension.
nlohmann::json UsageChunkBody(const OpenAiResponseHead& h, const JobResult& r);

}  // namespace amoeba
