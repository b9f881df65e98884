#include "server/chat_template.h"

#include <filesystem>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "model/file_util.h"

namespace amoeba {

const char* ChatTemplateName(ChatTemplate t) {
  switch (t) {
    case ChatTemplate::kChatML:
      return "chatml";
    case ChatTemplate::kLlama2:
      return "llama2";
    case ChatTemplate::kLlama3:
      return "llama3";
    case ChatTemplate::kZephyr:
      return "zephyr";
    default:
      return "plain";
  }
}

absl::StatusOr<ChatTemplate> ParseChatTemplate(const std::string& name) {
  for (ChatTemplate t : {ChatTemplate::kPlain, ChatTemplate::kChatML, ChatTemplate::kLlama2,
                         ChatTemplate::kLlama3, ChatTemplate::kZephyr})
    if (name == ChatTemplateName(t)) return t;
  return absl::InvalidArgumentError(absl::StrCat(
      "chat template '", name, "' is not one of plain, chatml, llama2, llama3, zephyr"));
}

std::optional<ChatTemplate> DetectChatTemplate(const std::string& j) {
  auto has = [&](const char* s) { return j.find(s) != std::string::npos; };
  if (has("<|start_header_id|>")) return ChatTemplate::kLlama3;
  if (has("<|im_start|>")) return ChatTemplate::kChatML;
  if (has("[INST]")) return ChatTemplate::kLlama2;
  if (has("<|user|>") || has("<|assistant|>")) return ChatTemplate::kZephyr;
  return std::nullopt;
}

ChatTemplate ChatTemplateForModel(const std::string& dir) {
  auto text = ReadFile((std::filesystem::path(dir) / "tokenizer_config.json").string());
  if (!text.ok()) return ChatTemplate::kPlain;
  auto j = nlohmann::json::parse(*text, nullptr, false);
  if (!j.is_object() || !j.contains("chat_template") || !j["chat_template"].is_string())
    return ChatTemplate::kPlain;
  return DetectChatTemplate(j["chat_template"].get<std::string>()).value_or(ChatTemplate::kPlain);
}

absl::StatusOr<std::string> RenderChat(ChatTemplate t, const std::vector<ChatMessage>& messages) {
  if (messages.empty()) return absl::InvalidArgumentError("messages: empty");
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& r = messages[i].role;
    if (r != "system" && r != "user" && r != "assistant")
      return absl::InvalidArgumentError(absl::StrCat("messages[", i, "].role: '", r.substr(0, 20),
                                                     "' (system, user or assistant)"));
  }
  std::string out;
  switch (t) {
    case ChatTemplate::kChatML:
      for (const auto& m : messages)
        absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
      out += "<|im_start|>assistant\n";
      break;
    case ChatTemplate::kLlama3:
      for (const auto& m : messages)
        absl::StrAppend(&out, "<|start_header_id|>", m.role, "<|end_header_id|>\n\n", m.content,
                        "<|eot_id|>");
      out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      break;
    case ChatTemplate::kZephyr:
      for (const auto& m : messages)
        absl::StrAppend(&out, "<|", m.role, "|>\n", m.content, "</s>\n");
      out += "<|assistant|>\n";
      break;
    case ChatTemplate::kLlama2: {
      // The system prompt goes inside the first [INST]; every later user turn opens a new
      // sequence after the previous answer's </s>.
      std::string system;
      bool first = true;
      for (const auto& m : messages) {
        if (m.role == "system") {
          system = m.content;
        } else if (m.role == "user") {
          absl::StrAppend(&out, first ? "" : "<s>", "[INST] ");
          if (!system.empty()) absl::StrAppend(&out, "<<SYS>>\n", system, "\n<</SYS>>\n\n");
          system.clear();
          absl::StrAppend(&out, m.content, " [/INST]");
          first = false;
        } else {
          absl::StrAppend(&out, " ", m.content, " </s>");
        }
      }
      break;
    }
    default:
      for (const auto& m : messages) absl::StrAppend(&out, m.role, ": ", m.content, "\n");
      out += "assistant:";
      break;
  }
  return out;
}

}  // namespace amoeba
