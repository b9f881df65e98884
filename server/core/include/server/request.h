// The requests both front ends hand to the serving core, and their validation. Front ends only
// translate their wire formats to and from these types: nothing is validated in one front end
// and not the other. Free of ATen and of any protocol library.
#pragma once
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "server/planner.h"
#include "subnet/shape.h"

namespace amoeba {

// Every limit is checked before any work is done for a request (docs/api.md lists them).
struct ServiceLimits {
  int64_t max_prompt_tokens = 2048;
  int64_t max_prompt_bytes = 32768;  // text prompts and Tokenize text, checked before tokenising
  int64_t max_new_tokens = 1024;
  int64_t max_stop_strings = 16;
  int64_t max_stop_length = 256;
  int64_t max_time_limit_ms = 24ll * 3600 * 1000;
};

// What the transport knows about a call, besides its message.
struct RequestContext {
  std::string request_id;                    // for the log lines of calls without a request type
  std::optional<std::string> authorization;  // the "authorization" header's value, if sent
  // The client's deadline (gRPC); beyond a day it is treated as a day.
  std::optional<std::chrono::system_clock::time_point> deadline;
};

// Grammars and JSON schemas are compiled per distinct text; this bounds the text.
inline constexpr size_t kMaxGrammarBytes = 65536;

// A generation request as either front end received it.
struct GenerationRequest {
  std::string request_id;                      // "" = assigned by the server
  std::optional<std::string> text;             // the prompt: text ...
  std::optional<std::vector<int32_t>> tokens;  // ... or token ids (exactly one of them)
  bool add_bos = true;                         // text prompts
  std::optional<Shape> shape;                  // target: a shape, a budget, or neither (full)
  std::optional<PlanBudget> budget;
  std::optional<float> temperature, top_p, repetition_penalty;
  std::optional<float> min_p;                                // [0, 1]
  std::optional<float> presence_penalty, frequency_penalty;  // [-2, 2], OpenAI's
  std::vector<std::pair<int32_t, float>> logit_bias;         // token -> [-100, 100]
  std::optional<int64_t> top_k;
  std::optional<uint64_t> seed;
  std::optional<int64_t> max_new_tokens;  // default 128
  std::vector<std::string> stop;
  std::optional<int64_t> time_limit_ms;
  std::optional<std::string> speculate;  // "auto" | "off" | a draft shape; unset: the default
  std::optional<int64_t> draft_tokens;
  // Log-probabilities of the new tokens with this many alternatives each, 0..20 (unset: none).
  std::optional<int32_t> logprobs;
  // Also the prompt tokens' log-probabilities (each given those before it), with `logprobs`
  // alternatives: scoring. max_new_tokens may then be 0.
  bool prompt_logprobs = false;
  // Structured output, at most one: a GBNF grammar (llama.cpp's syntax), a JSON schema (JSON
  // text; model/json_schema_grammar.h lists what is supported), or any JSON object.
  std::optional<std::string> grammar;
  std::optional<std::string> json_schema;
  bool json_object = false;
  // Admission class in [-100, 100] (unset: 0): higher classes leave the queue first.
  std::optional<int64_t> priority;
};

struct TokenizeRequest {
  std::string request_id;
  std::string text;
  bool add_bos = true;  // as for a generation's text prompt
};

struct DetokenizeRequest {
  std::string request_id;
  std::vector<int32_t> ids;  // at most ServiceLimits::max_prompt_tokens, each in the vocabulary
};

struct TokenizeResult {
  std::vector<int32_t> ids;
  std::vector<std::string> pieces;  // UTF-8; a byte token inside a character is U+FFFD
};

struct ExportRequest {
  std::string request_id;
  Shape shape;  // depth 0 = full depth, width 0 = full width
  bool uniform_width = false;
  bool adapters = true;  // merge the SMoL adapters (false: the base weights)
  std::string format;    // "" | "hf" | "gguf"
  std::string dtype;     // GGUF: f16 | q8_0 | q4_0 ("" = f16)
};

// INVALID_ARGUMENT "field: why": the form of every request-validation error.
absl::Status InvalidField(const std::string& field, const std::string& why);

// INVALID_ARGUMENT naming the field, or OK.
absl::Status ValidateGenerationRequest(const GenerationRequest& r, const ServiceLimits& l,
                                       int64_t vocab_size);
absl::Status ValidateBudget(const PlanBudget& b);

}  // namespace amoeba
