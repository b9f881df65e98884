// Function calling (OpenAI's `tools`): how the tools are put to the model, the grammar its reply
// is generated under, and how the reply is read back into calls.
//
// The format is the Hermes / Qwen one, which many open models are trained on: the tools are
// listed as JSON inside <tools></tools> in the system prompt, and each call is
// <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>. Arguments are generated under the
// function's JSON schema (model/json_schema_grammar.h), so they always parse and validate.
#pragma once
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace amoeba {

struct ToolFunction {
  std::string name;         // [A-Za-z0-9_-], at most 64 characters (OpenAI's rule)
  std::string description;  // may be empty
  std::string parameters;   // its arguments' JSON schema, as JSON text ("{}": any object)
};

enum class ToolChoice { kNone, kAuto, kRequired, kNamed };

// Calls in one reply with parallel_tool_calls (a small model would otherwise call until its
// token budget runs out).
inline constexpr int kMaxParallelCalls = 4;

struct ToolOptions {
  std::vector<ToolFunction> tools;
  ToolChoice choice = ToolChoice::kAuto;  // OpenAI's default when tools are given
  std::string named;                      // kNamed: the function that must be called
  bool parallel = true;                   // several calls in one reply
};

struct ToolCall {
  std::string name;
  std::string arguments;  // JSON text
};

// The system prompt's tool section (appended to the system message, or made the first one).
std::string ToolsSystemPrompt(const std::vector<ToolFunction>& tools);
// An assistant turn's calls as the model writes them (for earlier turns in `messages`).
std::string RenderToolCalls(const std::vector<ToolCall>& calls);
// A tool's result as the next user turn reads it.
std::string RenderToolResult(std::string_view content);

// The reply's grammar: calls only (kRequired, kNamed: that function only), or either calls or a
// text that does not start with '<' (kAuto); no constraint (empty) for kNone. Errors name the
// function whose schema is refused.
absl::StatusOr<std::string> ToolCallGrammar(const ToolOptions& o);

// The calls in a reply made under ToolCallGrammar; nullopt when the reply is text. With
// `complete`, a reply cut short inside a later call gives the whole calls before it and
// *complete = false.
std::optional<std::vector<ToolCall>> ParseToolCalls(std::string_view reply,
                                                    bool* complete = nullptr);
// Whether a reply that begins with `prefix` may still turn out to be calls (a stream holds such
// text back until it knows).
bool MayBeToolCalls(std::string_view prefix);

}  // namespace amoeba
