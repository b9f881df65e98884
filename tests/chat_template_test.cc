// Chat templates: detection from tokenizer_config.json's Jinja by family markers, and each
// family's rendering against its known form.
#include <gtest/gtest.h>

#include <fstream>

#include "server/chat_template.h"
#include "tests/test_util.h"

namespace amoeba {
namespace {

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

}  // namespace
}  // namespace amoeba
