#include "server/chat_template.h"

#include <filesystem>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "model/file_util.h"
#include "server/tool_calls.h"

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
  return ChatFormatForModel(dir).family;
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

namespace {

std::string JsonString(const nlohmann::json& j, const char* key) {
  if (!j.contains(key)) return "";
  const auto& v = j[key];
  if (v.is_string()) return v.get<std::string>();
  // {"content": "<s>", ...} as older tokenizer configs write it.
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  return "";
}

}  // namespace

ChatFormat ChatFormatForModel(const std::string& dir) {
  ChatFormat f;
  auto text = ReadFile((std::filesystem::path(dir) / "tokenizer_config.json").string());
  if (!text.ok()) return f;
  auto j = nlohmann::json::parse(*text, nullptr, false);
  if (!j.is_object() || !j.contains("chat_template") || !j["chat_template"].is_string()) return f;
  const std::string source = j["chat_template"].get<std::string>();
  f.family = DetectChatTemplate(source).value_or(ChatTemplate::kPlain);
  auto jinja = JinjaTemplate::Parse(source);
  if (jinja.ok()) f.jinja = *jinja;
  f.bos_token = JsonString(j, "bos_token");
  f.eos_token = JsonString(j, "eos_token");
  return f;
}

absl::StatusOr<ChatFormat> ChatFormatFromFlag(const std::string& flag, const std::string& dir) {
  if (flag == "auto") return ChatFormatForModel(dir);
  if (flag.size() > 6 && flag.substr(flag.size() - 6) == ".jinja") {
    auto text = ReadFile(flag);
    if (!text.ok()) return text.status();
    ChatFormat f = ChatFormatForModel(dir);  // the model's bos_token / eos_token
    auto jinja = JinjaTemplate::Parse(*text);
    if (!jinja.ok()) return jinja.status();
    f.jinja = *jinja;
    return f;
  }
  auto family = ParseChatTemplate(flag);
  if (!family.ok()) return family.status();
  ChatFormat f;
  f.family = *family;
  return f;
}

absl::StatusOr<std::string> RenderChatMessages(const ChatFormat& f,
                                               const nlohmann::ordered_json& messages,
                                               const nlohmann::ordered_json& tools) {
  using json = nlohmann::ordered_json;
  if (!messages.is_array() || messages.empty())
    return absl::InvalidArgumentError("messages: empty");
  if (f.jinja) {
    json msgs = messages;
    for (json& m : msgs)
      if (m.contains("tool_calls") && m["tool_calls"].is_array())
        for (json& c : m["tool_calls"])
          if (c.contains("function") && c["function"].contains("arguments") &&
              c["function"]["arguments"].is_string()) {
            json args = json::parse(c["function"]["arguments"].get<std::string>(), nullptr, false);
            if (!args.is_discarded()) c["function"]["arguments"] = std::move(args);
          }
    json context = {{"messages", std::move(msgs)},
                    {"add_generation_prompt", true},
                    {"bos_token", f.bos_token},
                    {"eos_token", f.eos_token}};
    if (tools.is_array() && !tools.empty()) context["tools"] = tools;
    auto text = f.jinja->Render(context);
    if (!text.ok()) return text.status();
    if (!f.bos_token.empty() && text->compare(0, f.bos_token.size(), f.bos_token) == 0)
      text->erase(0, f.bos_token.size());
    return text;
  }
  std::vector<ChatMessage> msgs;
  for (size_t i = 0; i < messages.size(); ++i) {
    const json& m = messages[i];
    const std::string role = m.value("role", "");
    const std::string content =
        m.contains("content") && m["content"].is_string() ? m["content"].get<std::string>() : "";
    if (role == "tool") {
      msgs.push_back({"user", RenderToolResult(content)});
      continue;
    }
    ChatMessage msg{role, content};
    if (m.contains("tool_calls") && m["tool_calls"].is_array()) {
      std::vector<ToolCall> calls;
      for (const json& c : m["tool_calls"])
        calls.push_back({c["function"].value("name", ""), c["function"].value("arguments", "{}")});
      if (!msg.content.empty()) msg.content += "\n";
      msg.content += RenderToolCalls(calls);
    }
    msgs.push_back(std::move(msg));
  }
  if (tools.is_array() && !tools.empty()) {
    std::vector<ToolFunction> fns;
    for (const json& t : tools) {
      const json& fn = t["function"];
      fns.push_back({fn.value("name", ""), fn.value("description", ""),
                     fn.contains("parameters") ? fn["parameters"].dump() : "{}"});
    }
    const std::string section = ToolsSystemPrompt(fns);
    if (msgs[0].role == "system")
      msgs[0].content = absl::StrCat(msgs[0].content, "\n\n", section);
    else
      msgs.insert(msgs.begin(), ChatMessage{"system", section});
  }
  return RenderChat(f.family, msgs);
}

}  // namespace amoeba
