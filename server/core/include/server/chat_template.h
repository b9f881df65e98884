// Chat prompts for /v1/chat/completions: the common template families, recognised from a
// tokenizer_config.json `chat_template` by their markers (no Jinja engine: the families differ
// only in how roles and turns are delimited), or named explicitly with --chat-template.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

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

}  // namespace amoeba
