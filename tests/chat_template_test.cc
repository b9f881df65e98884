// Chat templates: detection from tokenizer_config.json's Jinja by family markers, each family's
// rendering against its known form, and the Jinja renderer against Python's jinja2 (rendering as
// transformers does) on the public templates of several model families.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "server/chat_template.h"
#include "server/jinja_template.h"
#include "server/tool_calls.h"
#include "tests/test_util.h"

namespace amoeba {
namespace chat_template_test {  // named: a unity build joins test files

const std::vector<ChatMessage> kChat = {
    {"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello."}, {"user", "Bye"}};

TEST(ChatTemplateTest, EachFamilyRendersItsKnownForm) {
  EXPECT_EQ(*RenderChat(ChatTemplate::kChatML, kChat),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(*RenderChat(ChatTemplate::kLlama3, kChat),
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(*RenderChat(ChatTemplate::kLlama2, kChat),
            "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Bye [/INST]");
  EXPECT_EQ(
      *RenderChat(ChatTemplate::kZephyr, kChat),
      "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello.</s>\n<|user|>\nBye</s>\n"
      "<|assistant|>\n");
  EXPECT_EQ(*RenderChat(ChatTemplate::kPlain, {{"user", "Hi"}}), "user: Hi\nassistant:");
  EXPECT_FALSE(RenderChat(ChatTemplate::kChatML, {}).ok());
  auto bad = RenderChat(ChatTemplate::kChatML, {{"wizard", "x"}});
  EXPECT_NE(bad.status().message().find("messages[0].role"), std::string::npos);
}

TEST(ChatTemplateTest, FamiliesAreRecognisedFromTheirJinja) {
  // Abridged from the templates these model families ship.
  EXPECT_EQ(DetectChatTemplate("{% for message in messages %}{{'<|im_start|>' + message['role'] + "
                               "'\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"),
            ChatTemplate::kChatML);
  EXPECT_EQ(DetectChatTemplate("{{ '<|start_header_id|>' + message['role'] + "
                               "'<|end_header_id|>\\n\\n' }}"),
            ChatTemplate::kLlama3);
  EXPECT_EQ(DetectChatTemplate("{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"),
            ChatTemplate::kLlama2);
  EXPECT_EQ(DetectChatTemplate("{% if message['role'] == 'user' %}{{ '<|user|>\\n' + "
                               "message['content'] + eos_token }}"),
            ChatTemplate::kZephyr);
  EXPECT_FALSE(DetectChatTemplate("{{ messages }}").has_value());
  testing::TempDir d;
  EXPECT_EQ(ChatTemplateForModel(d.path()), ChatTemplate::kPlain);
  std::ofstream(d.file("tokenizer_config.json"))
      << R"({"chat_template": "{{ '<|im_start|>' + message['role'] }}"})";
  EXPECT_EQ(ChatTemplateForModel(d.path()), ChatTemplate::kChatML);
  EXPECT_EQ(*ParseChatTemplate("llama3"), ChatTemplate::kLlama3);
  EXPECT_FALSE(ParseChatTemplate("jinja").ok());
}

// Conversations every template is rendered with: plain turns, a system prompt, tools with an
// earlier call and its result, and characters JSON and Python escape differently.
std::vector<nlohmann::ordered_json> Conversations() {
  using json = nlohmann::ordered_json;
  const json tool = json::parse(R"({"type": "function", "function": {"name": "get_weather",
      "description": "Weather \"now\" in a city", "parameters": {"type": "object",
      "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
      "required": ["city"]}}})");
  std::vector<json> out;
  out.push_back({{"messages", json::parse(R"([{"role": "user", "content": "Hi there"}])")}});
  out.push_back({{"messages", json::parse(R"([{"role": "system", "content": "  Be brief.\n"},
      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
      {"role": "user", "content": "Café — \"quotes\" & <tags>\ttab"}])")}});
  out.push_back({{"messages", json::parse(R"([{"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
       "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
      {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18 C"},
      {"role": "assistant", "content": "It is 18 C."}, {"role": "user", "content": "Thanks"}])")},
                 {"tools", json::array({tool})}});
  for (json& c : out) {
    c["add_generation_prompt"] = true;
    c["bos_token"] = "<s>";
    c["eos_token"] = "</s>";
    c["date_string"] = "05 Dec 2026";
  }
  return out;
}

TEST(JinjaTemplateTest, MatchesJinja2OnPublicTemplates) {
  const std::filesystem::path dir =
      std::filesystem::path(AMOEBA_SOURCE_DIR) / "tests/chat_templates";
  testing::TempDir tmp;
  int compared = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() != ".jinja") continue;
    std::ifstream in(entry.path());
    std::stringstream source;
    source << in.rdbuf();
    auto t = JinjaTemplate::Parse(source.str());
    EXPECT_TRUE(t.ok()) << entry.path() << ": " << t.status();
    if (!t.ok()) continue;
    // One jinja2 process per template renders every conversation.
    const std::vector<nlohmann::ordered_json> contexts = Conversations();
    std::string cmd =
        "/usr/bin/python3 " + (dir / "render_reference.py").string() + " " + entry.path().string();
    for (size_t k = 0; k < contexts.size(); ++k) {
      const std::string ctx = tmp.file("context" + std::to_string(k) + ".json");
      std::ofstream(ctx) << contexts[k].dump();
      cmd += " " + ctx;
    }
    FILE* p = popen(cmd.c_str(), "r");
    ASSERT_NE(p, nullptr);
    std::string text;
    char buf[4096];
    for (size_t k; (k = fread(buf, 1, sizeof buf, p)) > 0;) text.append(buf, k);
    ASSERT_EQ(pclose(p), 0) << entry.path() << ": " << text;
    const auto want = nlohmann::json::parse(text, nullptr, false);
    ASSERT_TRUE(want.is_array() && want.size() == contexts.size()) << text;
    for (size_t k = 0; k < contexts.size(); ++k) {
      auto got = t.value()->Render(contexts[k]);
      const std::string where =
          entry.path().filename().string() + " conversation " + std::to_string(k);
      if (want[k].contains("raised")) {  // the template refuses this conversation: so must we
        EXPECT_FALSE(got.ok()) << where << " rendered what jinja2 refused: " << want[k]["raised"];
        continue;
      }
      EXPECT_TRUE(got.ok()) << where << ": " << got.status();
      if (!got.ok()) continue;
      EXPECT_EQ(*got, want[k]["text"].get<std::string>()) << where;
      ++compared;
    }
  }
  EXPECT_GE(compared, 60);  // of 35 templates x 3 conversations; the rest refuse some
}

// Expressions and statements the public templates use rarely, each against jinja2's output.
TEST(JinjaTemplateTest, ExpressionsRenderAsJinja2Does) {
  for (
      auto [source, want] : std::vector<std::pair<const char*, const char*>>{
          {R"({{ "a-b-c" | replace("-", "+") }}{{ "x.y".replace(".", "") }})", "a+b+cxy"},
          {R"({{ [1, 2, 3, 4][1:3] }} {{ "abc"[::-1] }} {{ [1, 2][-1] }})", "[2, 3] cba 2"},
          {R"({% set ns = namespace(n=0) %}{% for x in [3, 4] %}{% set ns.n = ns.n + x %}{% endfor %}{{ ns.n }})",
           "7"},
          {R"({% for x in "ab" %}{{ loop.index }}{{ x }}{% if not loop.last %},{% endif %}{% endfor %})",
           "1a,2b"},
          {R"({% macro m(a, b="z") %}{{ a }}{{ b }}{% endmacro %}{{ m("x") }}{{ m("x", b="y") }})",
           "xzxy"},
          {R"({{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ 2 ** 3 }} {{ 1 / 2 }} {{ "a" ~ 1 }})",
           "3 -4 1 8 0.5 a1"},
          {R"({{ {"b": 1, "a": [true, none]} | tojson }} {{ none }} {{ true }})",
           R"({"b": 1, "a": [true, null]} None True)"},
          {R"({{ "x" if 0 else "y" }}{{ "  pad  " | trim }}{{ "A b" | lower }}{{ "a b" | title }})",
           "ypada bA B"},
          {R"({% for k, v in {"a": 1} | items %}{{ k }}={{ v }}{% endfor %}{{ [1, 2] | join("+") }})",
           "a=11+2"},
      }) {
    auto t = JinjaTemplate::Parse(source);
    ASSERT_TRUE(t.ok()) << source << ": " << t.status();
    auto got = t.value()->Render(nlohmann::ordered_json::object());
    ASSERT_TRUE(got.ok()) << source << ": " << got.status();
    EXPECT_EQ(*got, want) << source;
  }
}

TEST(JinjaTemplateTest, ErrorsNameTheLineAndTheProblem) {
  for (auto [source, want] : std::vector<std::pair<const char*, const char*>>{
           {"{% if x %}a", "missing {% endif %}"},
           {"line one\n{% frobnicate %}", "line 2: unsupported tag 'frobnicate'"},
           {"{{ 'unterminated }}", "unclosed tag"},
           {"{{ x | nosuchfilter }}", "unknown filter 'nosuchfilter'"},
           {"{{ raise_exception('no system role') }}", "the template raised: no system role"},
           {"{{ 1 + 'a' }}", "unsupported operands"},
       }) {
    auto t = JinjaTemplate::Parse(source);
    absl::Status st =
        t.ok() ? t.value()->Render(nlohmann::ordered_json::object()).status() : t.status();
    ASSERT_FALSE(st.ok()) << source;
    EXPECT_NE(std::string(st.message()).find(want), std::string::npos) << source << " -> " << st;
  }
}

TEST(JinjaTemplateTest, ChatFormatRendersAModelsOwnTemplateWithoutItsBos) {
  testing::TempDir d;
  std::ofstream(d.file("tokenizer_config.json")) << R"({"bos_token": "<B>", "chat_template":
      "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content | trim }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"})";
  const ChatFormat f = ChatFormatForModel(d.path());
  ASSERT_NE(f.jinja, nullptr);
  EXPECT_EQ(f.Name(), "jinja");
  auto text = RenderChatMessages(
      f, nlohmann::ordered_json::parse(R"([{"role": "user", "content": " hi "}])"),
      nlohmann::ordered_json::array());
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "[user]hi[assistant]");
}

// Tool calls as the model writes them read back; a reply cut short inside a later call gives the
// whole calls before it; text is not calls.
TEST(ToolCallsTest, RenderedCallsParseBackAndACutReplyKeepsItsWholeCalls) {
  const std::vector<ToolCall> calls = {{"get_weather", R"({"city": "Paris"})"},
                                       {"add", R"({"a": 1, "b": 2})"}};
  const std::string text = RenderToolCalls(calls);
  bool complete = false;
  auto parsed = ParseToolCalls(text, &complete);
  ASSERT_TRUE(parsed.has_value());
  EXPECT_TRUE(complete);
  ASSERT_EQ(parsed->size(), 2u);
  EXPECT_EQ((*parsed)[0].name, "get_weather");
  EXPECT_EQ(nlohmann::json::parse((*parsed)[1].arguments),
            nlohmann::json::parse(calls[1].arguments));
  for (size_t cut : {text.size() - 3, text.find("add") + 1, text.find("</tool_call>") + 14}) {
    auto partial = ParseToolCalls(text.substr(0, cut), &complete);
    ASSERT_TRUE(partial.has_value()) << cut;
    EXPECT_FALSE(complete) << cut;
    EXPECT_EQ(partial->size(), 1u) << cut;
  }
  EXPECT_FALSE(ParseToolCalls(text.substr(0, 20), &complete).has_value());  // nothing whole yet
  EXPECT_FALSE(ParseToolCalls("It is sunny.").has_value());
  EXPECT_FALSE(ParseToolCalls(text + "and then some text").has_value());
  EXPECT_TRUE(MayBeToolCalls("<tool"));
  EXPECT_FALSE(MayBeToolCalls("<tools>"));
}

}  // namespace chat_template_test
}  // namespace amoeba
