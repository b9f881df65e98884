// OpenAI request bodies (/v1/completions, /v1/chat/completions) to the core's GenerationRequest.
// Unknown fields are a 400 naming them, never silently ignored.
#pragma once
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "server/chat_template.h"
#include "server/serving.h"

namespace amoeba {

// Extra model names (--model-alias) beside "amoeba:depth=D,width=W", "full" and "smallest".
struct ModelNames {
  std::map<std::string, Shape> aliases;
};

inline constexpr int kMaxChoices = 8;  // `n`

struct OpenAiCall {
  GenerationRequest req;
  bool chat = false, stream = false;
  int n = 1;                // choices, each its own sequence (the prompt prefilled once)
  bool echo = false;        // completions: the prompt comes back before the completion ...
  std::string echo_text;    // ... as the client sent it (empty for a prompt of token ids)
  std::string model;        // as echoed in responses
  bool tool_calls = false;  // chat with tools: the reply may be tool calls (server/tool_calls.h)
};

absl::StatusOr<OpenAiCall> ParseOpenAiCall(const Serving& serving, const ModelNames& names,
                                           const ChatFormat& chat_format, const std::string& body,
                                           bool chat);

// A model name → its shape; NOT_FOUND naming it otherwise.
absl::StatusOr<Shape> ShapeForModel(const Serving& s, const ModelNames& names,
                                    const std::string& model);
// The model id of a shape: "amoeba:depth=6,width=0.75".
std::string ModelId(const Shape& s);

}  // namespace amoeba
