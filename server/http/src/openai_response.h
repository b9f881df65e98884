// OpenAI response bodies: whole completions, streamed chunks, usage, finish reasons, and the
// "amoeba" extension (the shape served and what drafting did).
#pragma once
#include <string>

#include <nlohmann/json.hpp>

#include "server/job_result.h"

namespace amoeba {

// What one response's bodies share.
struct OpenAiResponseHead {
  std::string id;     // "cmpl-<request id>" / "chatcmpl-<request id>"
  std::string model;  // as the client named it
  int64_t created = 0;
  bool chat = false;
  Shape shape;
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
// A whole (non-streamed) response.
nlohmann::json CompletionBody(const OpenAiResponseHead& h, const std::string& text,
                              const JobResult& r);
// One streamed chunk: a text delta (or, for chat, a delta object) and the finish reason.
nlohmann::json ChunkBody(const OpenAiResponseHead& h, const nlohmann::json& delta_or_text,
                         const nlohmann::json& finish);
// The last streamed chunk: finish reason, usage and the extension.
nlohmann::json LastChunkBody(const OpenAiResponseHead& h, const JobResult& r);

}  // namespace amoeba
