#include "openai_request.h"

#include <algorithm>
#include <cctype>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "model/status_macros.h"
#include "model/token_logprobs.h"
#include "server/request_checks.h"
#include "server/tool_calls.h"

namespace amoeba {
// ordered: a JSON schema's properties keep their order (the output follows it).
using json = nlohmann::ordered_json;

namespace {

// Options a client may send: the OpenAI fields we implement, the ones accepted only at their
// neutral value, and our extensions. Anything else is a 400 naming it, never silently ignored.
const std::set<std::string>& KnownFields(bool chat) {
  static const std::set<std::string> completion = {"model",
                                                   "prompt",
                                                   "max_tokens",
                                                   "temperature",
                                                   "top_p",
                                                   "stop",
                                                   "seed",
                                                   "stream",
                                                   "n",
                                                   "echo",
                                                   "best_of",
                                                   "logprobs",
                                                   "presence_penalty",
                                                   "frequency_penalty",
                                                   "logit_bias",
                                                   "user",
                                                   "stream_options",
                                                   "response_format",
                                                   "grammar",
                                                   "metadata",
                                                   "top_k",
                                                   "repetition_penalty",
                                                   "min_p",
                                                   "amoeba"};
  static const std::set<std::string> chatc = {"model",
                                              "messages",
                                              "max_tokens",
                                              "max_completion_tokens",
                                              "temperature",
                                              "top_p",
                                              "stop",
                                              "seed",
                                              "stream",
                                              "n",
                                              "logprobs",
                                              "top_logprobs",
                                              "presence_penalty",
                                              "frequency_penalty",
                                              "logit_bias",
                                              "user",
                                              "stream_options",
                                              "response_format",
                                              "grammar",
                                              "tools",
                                              "tool_choice",
                                              "parallel_tool_calls",
                                              "metadata",
                                              "top_k",
                                              "repetition_penalty",
                                              "amoeba"};
  return chat ? chatc : completion;
}

template <typename T>
absl::StatusOr<std::optional<T>> Optional(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::optional<T>();
  try {
    if constexpr (std::is_same_v<T, bool>) {
      if (!it->is_boolean()) return InvalidField(key, "must be true or false");
    } else if constexpr (std::is_arithmetic_v<T>) {
      if (!it->is_number()) return InvalidField(key, "must be a number");
      if constexpr (std::is_integral_v<T>) {
        if (!it->is_number_integer()) return InvalidField(key, "must be an integer");
      }
    } else {
      if (!it->is_string()) return InvalidField(key, "must be a string");
    }
    return std::optional<T>(it->get<T>());
  } catch (const json::exception&) {
    return InvalidField(key, "out of range");
  }
}

absl::StatusOr<PlanBudget> BudgetFromJson(const json& b) {
  if (!b.is_object()) return InvalidField("amoeba.budget", "must be an object");
  PlanBudget p;
  for (auto& [k, v] : b.items()) {
    if (k == "platform") continue;
    static const std::set<std::string> known = {
        "max_params",     "max_memory_bytes", "max_decode_ms_per_token",
        "max_prefill_ms", "prompt_tokens",    "max_context_tokens"};
    if (!known.count(k)) return InvalidField("amoeba.budget." + k, "unknown field");
    if (!v.is_number()) return InvalidField("amoeba.budget." + k, "must be a number");
  }
  try {
    if (b.contains("max_params")) p.max_params = b["max_params"].get<int64_t>();
    if (b.contains("max_memory_bytes")) p.max_memory_bytes = b["max_memory_bytes"].get<int64_t>();
    if (b.contains("max_decode_ms_per_token"))
      p.max_decode_ms_per_token = b["max_decode_ms_per_token"].get<double>();
    if (b.contains("max_prefill_ms")) p.max_prefill_ms = b["max_prefill_ms"].get<double>();
    if (b.contains("prompt_tokens")) p.prompt_tokens = b["prompt_tokens"].get<int32_t>();
    if (b.contains("max_context_tokens"))
      p.max_context_tokens = b["max_context_tokens"].get<int32_t>();
    if (b.contains("platform")) {
      const json& pl = b["platform"];
      if (!pl.is_object()) return InvalidField("amoeba.budget.platform", "must be an object");
      if (pl.contains("memory_bandwidth_gbs"))
        p.bandwidth_gbs = pl["memory_bandwidth_gbs"].get<double>();
      if (pl.contains("compute_gflops")) p.compute_gflops = pl["compute_gflops"].get<double>();
      if (pl.contains("memory_bytes")) p.platform_memory_bytes = pl["memory_bytes"].get<int64_t>();
    }
  } catch (const json::exception&) {
    return InvalidField("amoeba.budget", "a field has the wrong type or is out of range");
  }
  return p;
}

}  // namespace

std::string ModelId(const Shape& s) {
  return "amoeba:" + s.ToString();
}

absl::StatusOr<Shape> ShapeForModel(const Serving& s, const ModelNames& names,
                                    const std::string& model) {
  if (model == "full") return s.info().full;
  if (model == "smallest") return s.info().smallest;
  if (auto it = names.aliases.find(model); it != names.aliases.end()) return it->second;
  std::string spec = model;
  if (spec.rfind("amoeba:", 0) == 0) spec = spec.substr(7);
  auto shape = s.ParseShape(spec);
  if (!shape.ok()) {
    return absl::NotFoundError(absl::StrCat("model '", LogSafe(model, 80),
                                            "' does not exist (GET /v1/models lists them)"));
  }
  return *shape;
}

// A message's content: a string, or an array of content parts of which only text parts
// ({"type": "text", "text": ...}) can be served; their texts are joined with newlines, as
// OpenAI's own chat templates do.
absl::StatusOr<std::string> MessageContent(const json& m, const std::string& where) {
  if (!m.contains("content")) return InvalidField(where + ".content", "required");
  const json& c = m["content"];
  if (c.is_string()) return c.get<std::string>();
  if (!c.is_array())
    return InvalidField(where + ".content", "must be a string or an array of text parts");
  std::string text;
  for (size_t k = 0; k < c.size(); ++k) {
    const json& part = c[k];
    const std::string at = absl::StrCat(where, ".content[", k, "]");
    if (!part.is_object() || !part.contains("type") || !part["type"].is_string())
      return InvalidField(at, "must be an object with a string type");
    const std::string type = part["type"].get<std::string>();
    if (type != "text")
      return InvalidField(
          at + ".type",
          absl::StrCat("\"", LogSafe(type, 40),
                       "\" parts are not supported (text only: this is a text model)"));
    if (!part.contains("text") || !part["text"].is_string())
      return InvalidField(at + ".text", "must be a string");
    if (!text.empty()) text += "\n";
    text += part["text"].get<std::string>();
  }
  return text;
}

// A chat message, checked and normalized for RenderChatMessages: {role, content (text),
// tool_calls (as sent), tool_call_id}.
absl::StatusOr<json> Message(const json& m, const std::string& where) {
  const std::string role = m["role"].get<std::string>();
  if (role != "system" && role != "user" && role != "assistant" && role != "tool")
    return InvalidField(where + ".role", absl::StrCat("'", LogSafe(role, 20),
                                                      "' (system, user, assistant or tool)"));
  json out = {{"role", role}};
  if (role == "tool") {
    if (!m.contains("tool_call_id") || !m["tool_call_id"].is_string())
      return InvalidField(where + ".tool_call_id", "required for a tool message");
    out["tool_call_id"] = m["tool_call_id"];
  }
  const bool calls = role == "assistant" && m.contains("tool_calls") && !m["tool_calls"].is_null();
  if (!calls || (m.contains("content") && !m["content"].is_null())) {
    ASSIGN_OR_RETURN(std::string content, MessageContent(m, where));
    out["content"] = std::move(content);
  } else {
    out["content"] = nullptr;
  }
  if (calls) {
    const json& tc = m["tool_calls"];
    if (!tc.is_array()) return InvalidField(where + ".tool_calls", "must be an array");
    json list = json::array();
    for (size_t k = 0; k < tc.size(); ++k) {
      const std::string at = absl::StrCat(where, ".tool_calls[", k, "]");
      if (!tc[k].is_object() || !tc[k].contains("function") || !tc[k]["function"].is_object())
        return InvalidField(at, "needs a function");
      const json& f = tc[k]["function"];
      if (!f.contains("name") || !f["name"].is_string())
        return InvalidField(at + ".function.name", "required: a string");
      if (!f.contains("arguments") || !f["arguments"].is_string())
        return InvalidField(at + ".function.arguments", "required: a JSON string");
      list.push_back({{"id", tc[k].value("id", absl::StrCat("call_", k))},
                      {"type", "function"},
                      {"function", {{"name", f["name"]}, {"arguments", f["arguments"]}}}});
    }
    out["tool_calls"] = std::move(list);
  }
  return out;
}

// `tools`, `tool_choice` and `parallel_tool_calls` of a chat request.
absl::StatusOr<ToolOptions> ParseTools(const json& j) {
  ToolOptions o;
  if (j.contains("tools") && !j["tools"].is_null()) {
    const json& tools = j["tools"];
    if (!tools.is_array()) return InvalidField("tools", "must be an array");
    if (tools.size() > 128) return InvalidField("tools", "at most 128");
    for (size_t i = 0; i < tools.size(); ++i) {
      const std::string at = absl::StrCat("tools[", i, "]");
      const json& t = tools[i];
      if (!t.is_object() || t.value("type", "") != "function" || !t.contains("function") ||
          !t["function"].is_object())
        return InvalidField(at, "must be {\"type\": \"function\", \"function\": {...}}");
      const json& f = t["function"];
      for (auto& [k, v] : f.items())
        if (k != "name" && k != "description" && k != "parameters" && k != "strict")
          return InvalidField(at + ".function." + k, "unknown field");
      if (!f.contains("name") || !f["name"].is_string())
        return InvalidField(at + ".function.name", "required: a string");
      ToolFunction fn;
      fn.name = f["name"].get<std::string>();
      if (fn.name.empty() || fn.name.size() > 64 ||
          !std::all_of(fn.name.begin(), fn.name.end(), [](char c) {
            return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-';
          }))
        return InvalidField(at + ".function.name", "1 to 64 of [A-Za-z0-9_-]");
      if (f.contains("description") && f["description"].is_string())
        fn.description = f["description"].get<std::string>();
      fn.parameters = f.contains("parameters") && !f["parameters"].is_null()
                          ? f["parameters"].dump()
                          : std::string(R"({"type": "object"})");
      o.tools.push_back(std::move(fn));
    }
  }
  if (j.contains("tool_choice") && !j["tool_choice"].is_null()) {
    const json& tc = j["tool_choice"];
    if (tc == "none") {
      o.choice = ToolChoice::kNone;
    } else if (tc == "auto") {
      o.choice = ToolChoice::kAuto;
    } else if (tc == "required") {
      o.choice = ToolChoice::kRequired;
    } else if (tc.is_object() && tc.value("type", "") == "function" && tc.contains("function") &&
               tc["function"].is_object() && tc["function"].contains("name") &&
               tc["function"]["name"].is_string()) {
      o.choice = ToolChoice::kNamed;
      o.named = tc["function"]["name"].get<std::string>();
    } else {
      return InvalidField("tool_choice",
                          "\"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                          "\"function\": {\"name\": ...}}");
    }
    if (o.tools.empty() && o.choice != ToolChoice::kNone)
      return InvalidField("tool_choice", "needs tools");
  }
  ASSIGN_OR_RETURN(auto parallel, Optional<bool>(j, "parallel_tool_calls"));
  o.parallel = parallel.value_or(true);
  return o;
}

absl::StatusOr<OpenAiCall> ParseOpenAiCall(const Serving& serving, const ModelNames& names,
                                           const ChatFormat& chat_format, const std::string& body,
                                           bool chat) {
  json j = json::parse(body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return InvalidField("body", "not a JSON object");
  for (auto& [k, v] : j.items())
    if (!KnownFields(chat).count(k)) return InvalidField(k, "not supported by this server");
  OpenAiCall c;
  c.chat = chat;
  // Accepted only at their neutral values.
  ASSIGN_OR_RETURN(auto n, Optional<int64_t>(j, "n"));
  if (n && (*n < 1 || *n > kMaxChoices))
    return InvalidField("n", absl::StrCat("must be in [1, ", kMaxChoices, "]"));
  c.n = static_cast<int>(n.value_or(1));
  ASSIGN_OR_RETURN(auto best_of, Optional<int64_t>(j, "best_of"));
  if (best_of && *best_of != 1) return InvalidField("best_of", "only 1 is supported");
  if (j.contains("response_format") && !j["response_format"].is_null()) {
    const json& rf = j["response_format"];
    if (!rf.is_object() || !rf.contains("type") || !rf["type"].is_string())
      return InvalidField("response_format", "must be an object with a string type");
    const std::string type = rf["type"];
    for (auto& [k, v] : rf.items())
      if (k != "type" && !(type == "json_schema" && k == "json_schema"))
        return InvalidField("response_format." + k, "unknown field");
    if (type == "json_object") {
      c.req.json_object = true;
    } else if (type == "json_schema") {
      if (!rf.contains("json_schema") || !rf["json_schema"].is_object())
        return InvalidField("response_format.json_schema", "required: {name, schema, strict}");
      const json& js = rf["json_schema"];
      for (auto& [k, v] : js.items())
        if (k != "name" && k != "schema" && k != "strict" && k != "description")
          return InvalidField("response_format.json_schema." + k, "unknown field");
      if (!js.contains("name") || !js["name"].is_string())
        return InvalidField("response_format.json_schema.name", "required: a string");
      if (js.contains("strict") && !js["strict"].is_boolean() && !js["strict"].is_null())
        return InvalidField("response_format.json_schema.strict", "must be true or false");
      // No schema: any JSON value (OpenAI's default is an empty schema).
      c.req.json_schema = js.contains("schema") ? js["schema"].dump() : std::string("{}");
    } else if (type != "text") {
      return InvalidField(
          "response_format.type",
          absl::StrCat("\"", LogSafe(type, 40), "\" is not one of text, json_object, json_schema"));
    }
  }
  // llama.cpp's extension: a GBNF grammar.
  ASSIGN_OR_RETURN(auto grammar, Optional<std::string>(j, "grammar"));
  if (grammar && (c.req.json_object || c.req.json_schema))
    return InvalidField("grammar", "give either a grammar or a response_format, not both");
  if (grammar) c.req.grammar = *grammar;
  if (j.contains("metadata") && !j["metadata"].is_null() && !j["metadata"].is_object())
    return InvalidField("metadata", "must be an object");
  ASSIGN_OR_RETURN(auto user, Optional<std::string>(j, "user"));
  (void)user;  // an end-user id for abuse tracking: accepted, not used
  if (j.contains("stream_options") && !j["stream_options"].is_null()) {
    const json& so = j["stream_options"];
    if (!so.is_object()) return InvalidField("stream_options", "must be an object");
    for (auto& [k, v] : so.items()) {
      if (k != "include_usage") return InvalidField("stream_options." + k, "unknown field");
      if (!v.is_boolean())
        return InvalidField("stream_options.include_usage", "must be true or false");
    }
  }
  // Echo (completions): the prompt comes back, scored when logprobs are asked for (evaluation
  // harnesses send echo, logprobs and max_tokens 0 to score a text).
  ASSIGN_OR_RETURN(auto echo, Optional<bool>(j, "echo"));
  c.echo = echo.value_or(false);
  if (c.echo) c.req.prompt_logprobs = true;
  // Log-probabilities: chat's `logprobs: true` with `top_logprobs` alternatives (0..20);
  // completions' `logprobs: N` alternatives (0..5, OpenAI's legacy limit).
  if (chat) {
    ASSIGN_OR_RETURN(auto want, Optional<bool>(j, "logprobs"));
    ASSIGN_OR_RETURN(auto top, Optional<int64_t>(j, "top_logprobs"));
    if (top && !want.value_or(false))
      return InvalidField("top_logprobs", "requires \"logprobs\": true");
    if (top && (*top < 0 || *top > kMaxTopLogprobs))
      return InvalidField("top_logprobs", absl::StrCat("must be in [0, ", kMaxTopLogprobs, "]"));
    if (want.value_or(false)) c.req.logprobs = static_cast<int32_t>(top.value_or(0));
  } else {
    ASSIGN_OR_RETURN(auto top, Optional<int64_t>(j, "logprobs"));
    if (top && (*top < 0 || *top > 5)) return InvalidField("logprobs", "must be in [0, 5]");
    if (top) c.req.logprobs = static_cast<int32_t>(*top);
  }

  GenerationRequest& r = c.req;
  // The target: a model name, or a budget for the planner.
  if (j.contains("amoeba")) {
    const json& a = j["amoeba"];
    if (!a.is_object()) return InvalidField("amoeba", "must be an object");
    for (auto& [k, v] : a.items())
      if (k != "budget" && k != "speculate" && k != "draft_tokens" && k != "time_limit_ms" &&
          k != "priority")
        return InvalidField("amoeba." + k, "unknown field");
    if (a.contains("budget")) {
      ASSIGN_OR_RETURN(auto b, BudgetFromJson(a["budget"]));
      r.budget = b;
    }
    if (a.contains("speculate")) {
      if (!a["speculate"].is_string())
        return InvalidField("amoeba.speculate", "must be \"auto\", \"off\" or a draft shape");
      r.speculate = a["speculate"].get<std::string>();
    }
    if (a.contains("time_limit_ms")) {
      if (!a["time_limit_ms"].is_number_integer())
        return InvalidField("amoeba.time_limit_ms", "must be an integer");
      r.time_limit_ms = a["time_limit_ms"].get<int64_t>();
    }
    if (a.contains("priority")) {
      if (!a["priority"].is_number_integer())
        return InvalidField("amoeba.priority", "must be an integer");
      r.priority = a["priority"].get<int64_t>();
    }
    if (a.contains("draft_tokens")) {
      if (!a["draft_tokens"].is_number_integer())
        return InvalidField("amoeba.draft_tokens", "must be an integer");
      r.draft_tokens = a["draft_tokens"].get<int64_t>();
    }
  }
  ASSIGN_OR_RETURN(auto model, Optional<std::string>(j, "model"));
  c.model = model.value_or("");
  if (!r.budget) {
    if (c.model.empty()) return InvalidField("model", "required (or amoeba.budget)");
    ASSIGN_OR_RETURN(auto shape, ShapeForModel(serving, names, c.model));
    r.shape = shape;
  }
  // The prompt.
  if (chat) {
    if (!j.contains("messages") || !j["messages"].is_array())
      return InvalidField("messages", "required: a list of {role, content}");
    ASSIGN_OR_RETURN(ToolOptions tools, ParseTools(j));
    json msgs = json::array();
    for (size_t i = 0; i < j["messages"].size(); ++i) {
      const json& m = j["messages"][i];
      const std::string where = absl::StrCat("messages[", i, "]");
      if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
        return InvalidField(where, "needs a string role");
      ASSIGN_OR_RETURN(json msg, Message(m, where));
      msgs.push_back(std::move(msg));
    }
    if (!tools.tools.empty() && tools.choice != ToolChoice::kNone) {
      if (r.grammar || r.json_schema || r.json_object)
        return InvalidField("tools", "cannot be combined with a grammar or a JSON response_format");
      ASSIGN_OR_RETURN(std::string g, ToolCallGrammar(tools));
      r.grammar = std::move(g);
      c.tool_calls = true;
    }
    // The tools as the template sees them (OpenAI's shape, parameters included).
    json tool_list = json::array();
    if (j.contains("tools") && j["tools"].is_array()) tool_list = j["tools"];
    ASSIGN_OR_RETURN(auto text, RenderChatMessages(chat_format, msgs, tool_list));
    r.text = text;
  } else {
    if (!j.contains("prompt")) return InvalidField("prompt", "required");
    const json& p = j["prompt"];
    if (p.is_string()) {
      r.text = p.get<std::string>();
    } else if (p.is_array() && p.size() == 1 && p[0].is_string()) {
      r.text = p[0].get<std::string>();
    } else if (p.is_array() && !p.empty() && p[0].is_number_integer()) {
      std::vector<int32_t> ids;
      for (const auto& t : p) {
        if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX)
          return InvalidField("prompt", "token ids must be non-negative integers");
        ids.push_back(static_cast<int32_t>(t.get<int64_t>()));
      }
      r.tokens = std::move(ids);
    } else {
      return InvalidField("prompt", "a string, a list of one string, or a list of token ids");
    }
    if (c.echo && r.text) c.echo_text = *r.text;
  }
  // Sampling: OpenAI's defaults (temperature 1).
  ASSIGN_OR_RETURN(auto temperature, Optional<double>(j, "temperature"));
  r.temperature = static_cast<float>(temperature.value_or(1.0));
  ASSIGN_OR_RETURN(auto top_p, Optional<double>(j, "top_p"));
  if (top_p) r.top_p = static_cast<float>(*top_p);
  ASSIGN_OR_RETURN(auto top_k, Optional<int64_t>(j, "top_k"));
  if (top_k) r.top_k = *top_k;
  ASSIGN_OR_RETURN(auto rep, Optional<double>(j, "repetition_penalty"));
  if (rep) r.repetition_penalty = static_cast<float>(*rep);
  ASSIGN_OR_RETURN(auto min_p, Optional<double>(j, "min_p"));
  if (min_p) r.min_p = static_cast<float>(*min_p);
  ASSIGN_OR_RETURN(auto presence, Optional<double>(j, "presence_penalty"));
  if (presence) r.presence_penalty = static_cast<float>(*presence);
  ASSIGN_OR_RETURN(auto frequency, Optional<double>(j, "frequency_penalty"));
  if (frequency) r.frequency_penalty = static_cast<float>(*frequency);
  // {"token id as a string": bias}, as OpenAI takes it.
  if (j.contains("logit_bias") && !j["logit_bias"].is_null()) {
    const json& lb = j["logit_bias"];
    if (!lb.is_object()) return InvalidField("logit_bias", "must be an object of token id -> bias");
    for (const auto& [k, v] : lb.items()) {
      int32_t token = 0;
      if (!absl::SimpleAtoi(k, &token) || token < 0)
        return InvalidField("logit_bias",
                            absl::StrCat("\"", LogSafe(k, 20), "\" is not a token id"));
      if (!v.is_number()) return InvalidField("logit_bias", "biases must be numbers");
      r.logit_bias.emplace_back(token, v.get<float>());
    }
  }
  ASSIGN_OR_RETURN(auto seed, Optional<int64_t>(j, "seed"));
  if (seed) r.seed = static_cast<uint64_t>(*seed);
  ASSIGN_OR_RETURN(auto max_tokens, Optional<int64_t>(j, chat && j.contains("max_completion_tokens")
                                                             ? "max_completion_tokens"
                                                             : "max_tokens"));
  // OpenAI: 16 for completions; chat runs to the server's limit.
  r.max_new_tokens = max_tokens.value_or(chat ? serving.options().limits.max_new_tokens : 16);
  if (j.contains("stop") && !j["stop"].is_null()) {
    const json& s = j["stop"];
    if (s.is_string()) {
      r.stop.push_back(s.get<std::string>());
    } else if (s.is_array()) {
      for (const auto& x : s) {
        if (!x.is_string()) return InvalidField("stop", "must be a string or a list of strings");
        r.stop.push_back(x.get<std::string>());
      }
    } else {
      return InvalidField("stop", "must be a string or a list of strings");
    }
  }
  ASSIGN_OR_RETURN(auto stream, Optional<bool>(j, "stream"));
  c.stream = stream.value_or(false);
  return c;
}

}  // namespace amoeba
