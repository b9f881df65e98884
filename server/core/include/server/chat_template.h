// Chat prompts for /v1/chat/completions: a model's own Jinja `chat_template`
// (tokenizer_config.json, rendered by server/jinja_template.h as Hugging Face renders it), or one
// of the common template families (named with --chat-template, or recognised by their markers when
// a model's template does not parse).
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "server/jinja_template.h"

namespace amoeba {

enum class ChatTemplate {
  kPlain,   // "role: content" lines, then "assistant:" (models without a template)
  kChatML,  // <|im_start|>role\ncontent<|im_end|>
  kLlama2,  // [INST] <<SYS>>...<</SYS>> user [/INST] assistant </s><s>
  kLlama3,  // <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
  kZephyr,  // <|role|>\ncontent</s>
};

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

const char* ChatTemplateName(ChatTemplate t);
// "plain", "chatml", "llama2", "llama3", "zephyr"; INVALID_ARGUMENT otherwise.
absl::StatusOr<ChatTemplate> ParseChatTemplate(const std::string& name);
// The family a Jinja `chat_template` belongs to, by its markers; nullopt when none matches.
std::optional<ChatTemplate> DetectChatTemplate(const std::string& jinja);
// The family for a model directory: tokenizer_config.json's chat_template, else plain.
ChatTemplate ChatTemplateForModel(const std::string& dir);

// The prompt text for `messages`, ending with the assistant's turn opened. The BOS token is not
// part of it (the server adds it as a token). INVALID_ARGUMENT for an unknown role or no message.
absl::StatusOr<std::string> RenderChat(ChatTemplate t, const std::vector<ChatMessage>& messages);

// What chat prompts are rendered with: a model's Jinja template, else a family.
struct ChatFormat {
  ChatTemplate family = ChatTemplate::kPlain;
  std::shared_ptr<const JinjaTemplate> jinja;  // when set, rendered instead of `family`
  std::string bos_token, eos_token;            // the template's variables of those names
  std::string Name() const { return jinja ? "jinja" : ChatTemplateName(family); }
};
// tokenizer_config.json's chat_template as Jinja (with its bos_token / eos_token); a template that
// does not parse falls back to its family's markers, a model without one to plain.
ChatFormat ChatFormatForModel(const std::string& dir);
// --chat-template: "auto" (ChatFormatForModel), a family's name, or a .jinja file.
absl::StatusOr<ChatFormat> ChatFormatFromFlag(const std::string& flag, const std::string& dir);

// OpenAI chat messages ({role, content (text), tool_calls (arguments as JSON text),
// tool_call_id}) and tools (OpenAI's [{type, function}], may be empty) as a prompt ending with the
// assistant's turn opened. A Jinja template gets them as Hugging Face passes them (tool call
// arguments as objects, `tools` only when there are some, add_generation_prompt true) and its
// leading bos_token is dropped (the server adds BOS as a token). A family renders the tools in the
// Hermes format (server/tool_calls.h), earlier calls as the model writes them and tool results as
// user turns.
absl::StatusOr<std::string> RenderChatMessages(const ChatFormat& f,
                                               const nlohmann::ordered_json& messages,
                                               const nlohmann::ordered_json& tools);

}  // namespace amoeba
