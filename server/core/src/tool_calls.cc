#include "server/tool_calls.h"

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "model/json_schema_grammar.h"

namespace amoeba {
namespace {

using json = nlohmann::ordered_json;

constexpr std::string_view kOpen = "<tool_call>\n", kClose = "\n</tool_call>";

}  // namespace

std::string ToolsSystemPrompt(const std::vector<ToolFunction>& tools) {
  std::string out =
      "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
      "You are provided with function signatures within <tools></tools> XML tags:\n<tools>";
  for (const ToolFunction& t : tools) {
    json fn = {{"name", t.name}};
    if (!t.description.empty()) fn["description"] = t.description;
    fn["parameters"] = json::parse(t.parameters, nullptr, false);
    absl::StrAppend(&out, "\n", json{{"type", "function"}, {"function", fn}}.dump());
  }
  absl::StrAppend(&out,
                  "\n</tools>\n\nFor each function call, return a json object with function name "
                  "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                  "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>");
  return out;
}

std::string RenderToolCalls(const std::vector<ToolCall>& calls) {
  std::string out;
  for (size_t i = 0; i < calls.size(); ++i) {
    const json args = json::parse(calls[i].arguments, nullptr, false);
    absl::StrAppend(&out, i ? "\n" : "", std::string(kOpen),
                    "{\"name\": ", json(calls[i].name).dump(),
                    ", \"arguments\": ", args.is_discarded() ? calls[i].arguments : args.dump(),
                    "}", std::string(kClose));
  }
  return out;
}

std::string RenderToolResult(std::string_view content) {
  return absl::StrCat("<tool_response>\n", std::string(content), "\n</tool_response>");
}

absl::StatusOr<std::string> ToolCallGrammar(const ToolOptions& o) {
  if (o.choice == ToolChoice::kNone || o.tools.empty()) return std::string();
  std::string rules, alts;
  for (size_t i = 0; i < o.tools.size(); ++i) {
    const ToolFunction& t = o.tools[i];
    if (o.choice == ToolChoice::kNamed && t.name != o.named) continue;
    const std::string prefix = absl::StrCat("tool", i);
    auto args = JsonSchemaRules(t.parameters, prefix + "-args");
    if (!args.ok())
      return absl::InvalidArgumentError(
          absl::StrCat("tools: function '", t.name, "' parameters: ", args.status().message()));
    absl::StrAppend(
        &rules, prefix,
        " ::= ", GbnfLiteral(absl::StrCat("{\"name\": ", json(t.name).dump(), ", \"arguments\": ")),
        " ", prefix, "-args \"}\"\n", *args);
    absl::StrAppend(&alts, alts.empty() ? "" : " | ", prefix);
  }
  if (alts.empty())
    return absl::InvalidArgumentError(
        absl::StrCat("tool_choice: no function named '", o.named, "' in tools"));
  std::string g =
      absl::StrCat("call ::= ", GbnfLiteral(kOpen), " (", alts, ") ", GbnfLiteral(kClose), "\n");
  absl::StrAppend(&g, o.parallel ? absl::StrCat("calls ::= call (\"\\n\" call){0,",
                                                kMaxParallelCalls - 1, "}\n")
                                 : std::string("calls ::= call\n"));
  if (o.choice == ToolChoice::kAuto)
    absl::StrAppend(&g, "root ::= calls | text\ntext ::= [^<] .*\n");
  else
    absl::StrAppend(&g, "root ::= calls\n");
  return absl::StrCat(g, rules, JsonGbnfPrimitives());
}

std::optional<std::vector<ToolCall>> ParseToolCalls(std::string_view reply, bool* complete) {
  if (complete) *complete = true;
  if (reply.substr(0, kOpen.size()) != kOpen) return std::nullopt;
  std::vector<ToolCall> calls;
  while (!reply.empty()) {
    const size_t end = reply.find(kClose);
    // A reply cut short (its token budget ran out) inside a later call: the calls before it.
    if (complete && !calls.empty() && MayBeToolCalls(reply) && end == std::string_view::npos) {
      *complete = false;
      return calls;
    }
    if (reply.substr(0, kOpen.size()) != kOpen) return std::nullopt;
    if (end == std::string_view::npos) return std::nullopt;
    const json call = json::parse(reply.substr(kOpen.size(), end - kOpen.size()), nullptr, false);
    if (call.is_discarded() || !call.contains("name") || !call["name"].is_string() ||
        !call.contains("arguments"))
      return std::nullopt;
    calls.push_back({call["name"].get<std::string>(), call["arguments"].dump()});
    reply.remove_prefix(end + kClose.size());
    if (!reply.empty() && reply[0] == '\n') reply.remove_prefix(1);
  }
  return calls;
}

bool MayBeToolCalls(std::string_view prefix) {
  const size_t n = std::min(prefix.size(), kOpen.size());
  return prefix.substr(0, n) == kOpen.substr(0, n);
}

}  // namespace amoeba
