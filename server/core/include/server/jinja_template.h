// The Jinja2 subset that model chat templates (tokenizer_config.json `chat_template`) are written
// in, rendered the way Hugging Face's apply_chat_template renders them: trim_blocks and
// lstrip_blocks on, `{%- -%}` whitespace control, loop controls, tojson as Python's json.dumps
// (ensure_ascii off), raise_exception() and strftime_now().
//
// Statements: if / elif / else, for (with `k, v` unpacking, an `if` filter, else, loop.index,
// index0, first, last, length, revindex, revindex0), set (names and namespace attributes), break,
// continue, and HF's generation block; comments. Expressions: literals (strings, numbers, true /
// false / none, lists, dicts), names, attributes and items, slices, calls, filters, tests
// (`is [not] name`), `a if c else b`, not / and / or, comparisons, in / not in, + - * / // % **
// and ~. The filters, tests, functions and methods the common families use are listed in
// jinja_template.cc. Values are JSON (nlohmann::ordered_json): messages and tools already are.
#pragma once
#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"

namespace amoeba {

class JinjaTemplate {
 public:
  // INVALID_ARGUMENT naming the line and what is wrong (an unknown tag, an unclosed block, ...).
  static absl::StatusOr<std::shared_ptr<const JinjaTemplate>> Parse(std::string_view source);
  ~JinjaTemplate();

  // Renders with the variables of `context` (an object). A template's raise_exception(), an
  // unknown filter or a type error is INVALID_ARGUMENT with its message.
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& context) const;

  struct Node;

 private:
  explicit JinjaTemplate(std::unique_ptr<Node> root);
  std::unique_ptr<Node> root_;
};

}  // namespace amoeba
