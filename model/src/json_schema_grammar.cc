#include "model/json_schema_grammar.h"

#include <cctype>
#include <cstdio>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace amoeba {
namespace {

using json = nlohmann::ordered_json;

// The shared pieces; rules a schema does not use are harmless.
constexpr const char* kPrimitives = R"(ws ::= [ ]?
char ::= [^"\\\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})
string ::= "\"" char* "\""
integer ::= "-"? ("0" | [1-9] [0-9]{0,15})
number ::= integer ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,2})?
boolean ::= "true" | "false"
null ::= "null"
value ::= object | array | string | number | boolean | null
object ::= "{" ws (string ws ":" ws value (ws "," ws string ws ":" ws value)*)? ws "}"
array ::= "[" ws (value (ws "," ws value)*)? ws "]"
)";

const std::set<std::string>& Annotations() {
  static const std::set<std::string> k = {"title",    "description", "default",  "examples",
                                          "$schema",  "$id",         "$comment", "deprecated",
                                          "readOnly", "writeOnly",   "$defs",    "definitions"};
  return k;
}

class Converter {
 public:
  Converter(const json& root, std::string prefix) : root_(root), prefix_(std::move(prefix)) {}

  // The value's rule is named `prefix_`; every other rule of the schema starts with it.
  absl::StatusOr<std::string> Run() {
    auto top = Visit(root_, "#", "value");
    if (!top.ok()) return top.status();
    std::string out = absl::StrCat(prefix_, " ::= ", *top, "\n");
    for (const auto& [name, body] : rules_) absl::StrAppend(&out, name, " ::= ", body, "\n");
    return out;
  }

 private:
  static absl::Status Unsupported(const std::string& what, const std::string& where) {
    return absl::InvalidArgumentError(
        absl::StrCat("JSON schema: ", what, " at ", where, " is not supported"));
  }

  // A rule for `body` (one per distinct body), named after `hint`.
  std::string Define(const std::string& hint, const std::string& body) {
    auto it = by_body_.find(body);
    if (it != by_body_.end()) return it->second;
    std::string name = prefix_ + "-";
    for (char c : hint) name += std::isalnum(static_cast<unsigned char>(c)) ? c : '-';
    if (rules_.count(name)) name = absl::StrCat(name, "-", rules_.size());
    rules_[name] = body;
    by_body_[body] = name;
    return name;
  }

  absl::StatusOr<int64_t> Count(const json& s, const char* key, const std::string& where) {
    if (!s.contains(key)) return -1;
    const json& v = s[key];
    if (!v.is_number_integer() || v.get<int64_t>() < 0)
      return absl::InvalidArgumentError(
          absl::StrCat("JSON schema: '", key, "' at ", where, " must be a non-negative integer"));
    if (v.get<int64_t>() > 1000) return Unsupported(absl::StrCat("'", key, "' over 1000"), where);
    return v.get<int64_t>();
  }

  static std::string Bounds(int64_t min, int64_t max) {
    if (min <= 0 && max < 0) return "*";
    if (min == 1 && max < 0) return "+";
    if (max < 0) return absl::StrCat("{", min, ",}");
    return absl::StrCat("{", std::max<int64_t>(min, 0), ",", max, "}");
  }

  absl::StatusOr<std::string> Visit(const json& s, const std::string& where,
                                    const std::string& hint) {
    // Schemas nest by recursion here: a client's thousand nested "items" must not exhaust it.
    if (++depth_ > 64) return Unsupported("nesting deeper than 64", where.substr(0, 200));
    struct Leave {
      int& d;
      ~Leave() { --d; }
    } leave{depth_};
    if (s.is_boolean()) {
      if (s.get<bool>()) return std::string("value");
      return absl::InvalidArgumentError(
          absl::StrCat("JSON schema: 'false' at ", where, " matches nothing"));
    }
    if (!s.is_object())
      return absl::InvalidArgumentError(absl::StrCat("JSON schema: expected an object at ", where));
    static const std::set<std::string> known = {
        "type",      "properties", "required", "additionalProperties",
        "items",     "minItems",   "maxItems", "enum",
        "const",     "anyOf",      "oneOf",    "minLength",
        "maxLength", "$ref"};
    for (const auto& [key, _] : s.items())
      if (!known.count(key) && !Annotations().count(key))
        return Unsupported(absl::StrCat("the keyword '", key, "'"), where);

    if (s.contains("$ref")) return Ref(s["$ref"], where);
    if (s.contains("const")) return GbnfLiteral(s["const"].dump());
    if (s.contains("enum")) {
      if (!s["enum"].is_array() || s["enum"].empty())
        return absl::InvalidArgumentError(
            absl::StrCat("JSON schema: 'enum' at ", where, " must be a non-empty array"));
      std::vector<std::string> alts;
      for (const json& v : s["enum"]) alts.push_back(GbnfLiteral(v.dump()));
      return Define(hint, absl::StrJoin(alts, " | "));
    }
    for (const char* key : {"anyOf", "oneOf"})
      if (s.contains(key)) {
        if (!s[key].is_array() || s[key].empty())
          return absl::InvalidArgumentError(
              absl::StrCat("JSON schema: '", key, "' at ", where, " must be a non-empty array"));
        std::vector<std::string> alts;
        for (size_t i = 0; i < s[key].size(); ++i) {
          auto a = Visit(s[key][i], absl::StrCat(where, "/", key, "/", i), hint);
          if (!a.ok()) return a.status();
          alts.push_back(*a);
        }
        return Define(hint, absl::StrJoin(alts, " | "));
      }

    std::vector<std::string> types;
    if (s.contains("type")) {
      if (s["type"].is_string()) {
        types.push_back(s["type"]);
      } else if (s["type"].is_array()) {
        for (const json& t : s["type"]) {
          if (!t.is_string())
            return absl::InvalidArgumentError(
                absl::StrCat("JSON schema: 'type' at ", where, " must name types"));
          types.push_back(t);
        }
      }
    } else if (s.contains("properties") || s.contains("additionalProperties")) {
      types.push_back("object");
    } else if (s.contains("items")) {
      types.push_back("array");
    } else {
      return std::string("value");
    }
    std::vector<std::string> alts;
    for (const std::string& t : types) {
      absl::StatusOr<std::string> a;
      if (t == "string") {
        auto min = Count(s, "minLength", where), max = Count(s, "maxLength", where);
        if (!min.ok()) return min.status();
        if (!max.ok()) return max.status();
        if (*min < 0 && *max < 0)
          a = std::string("string");
        else
          a = Define(hint, absl::StrCat("\"\\\"\" char", Bounds(*min, *max), " \"\\\"\""));
      } else if (t == "integer" || t == "number" || t == "boolean" || t == "null") {
        a = t;
      } else if (t == "array") {
        a = Array(s, where, hint);
      } else if (t == "object") {
        a = Object(s, where, hint);
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("JSON schema: unknown type '", t, "' at ", where));
      }
      if (!a.ok()) return a.status();
      alts.push_back(*a);
    }
    if (alts.size() == 1) return alts[0];
    return Define(hint, absl::StrJoin(alts, " | "));
  }

  absl::StatusOr<std::string> Ref(const json& ref, const std::string& where) {
    if (!ref.is_string()) return Unsupported("a '$ref' that is not a string", where);
    const std::string r = ref;
    for (const char* prefix : {"#/$defs/", "#/definitions/"}) {
      const std::string p = prefix;
      if (r.rfind(p, 0) != 0) continue;
      const std::string name = r.substr(p.size());
      const std::string section = p.substr(2, p.size() - 3);
      if (!root_.contains(section) || !root_[section].contains(name))
        return absl::InvalidArgumentError(
            absl::StrCat("JSON schema: '$ref' ", r, " at ", where, " names nothing"));
      auto it = refs_.find(r);
      if (it != refs_.end()) return it->second;
      // Named before its body is visited, so a recursive definition refers to itself.
      std::string rule = absl::StrCat("ref-", name);
      for (char& c : rule)
        if (!std::isalnum(static_cast<unsigned char>(c))) c = '-';
      rule = absl::StrCat(prefix_, "-", rule, "-", refs_.size());
      refs_[r] = rule;
      auto body = Visit(root_[section][name], r, rule + "-body");
      if (!body.ok()) return body.status();
      rules_[rule] = *body;
      return rule;
    }
    return Unsupported(absl::StrCat("the reference '", r, "' (only #/$defs/ and #/definitions/)"),
                       where);
  }

  absl::StatusOr<std::string> Array(const json& s, const std::string& where,
                                    const std::string& hint) {
    std::string item = "value";
    if (s.contains("items")) {
      if (s["items"].is_array()) return Unsupported("'items' as an array (tuple form)", where);
      auto i = Visit(s["items"], where + "/items", hint + "-item");
      if (!i.ok()) return i.status();
      item = *i;
    }
    auto min = Count(s, "minItems", where), max = Count(s, "maxItems", where);
    if (!min.ok()) return min.status();
    if (!max.ok()) return max.status();
    if (*max == 0) return Define(hint, "\"[\" ws \"]\"");
    const std::string more = absl::StrCat("(ws \",\" ws ", item, ")");
    const int64_t lo = std::max<int64_t>(*min, 0);
    const std::string tail = Bounds(lo > 0 ? lo - 1 : 0, *max < 0 ? -1 : *max - 1);
    std::string items = absl::StrCat(item, " ", more, tail);
    if (lo == 0) items = absl::StrCat("(", items, ")?");
    return Define(hint, absl::StrCat("\"[\" ws ", items, " ws \"]\""));
  }

  absl::StatusOr<std::string> Object(const json& s, const std::string& where,
                                     const std::string& hint) {
    const bool has_props = s.contains("properties");
    if (s.contains("additionalProperties")) {
      const json& ap = s["additionalProperties"];
      if (!(ap.is_boolean() && !ap.get<bool>())) {
        if (has_props && !s["properties"].empty())
          return Unsupported("'additionalProperties' other than false next to 'properties'", where);
        if (ap.is_boolean()) return std::string("object");
        auto v = Visit(ap, where + "/additionalProperties", hint + "-value");
        if (!v.ok()) return v.status();
        const std::string kv = absl::StrCat("string ws \":\" ws ", *v);
        return Define(hint, absl::StrCat("\"{\" ws (", kv, " (ws \",\" ws ", kv, ")*)? ws \"}\""));
      }
    }
    if (!has_props) {
      if (s.contains("additionalProperties")) return Define(hint, "\"{\" ws \"}\"");
      return std::string("object");
    }
    const json& props = s["properties"];
    if (!props.is_object())
      return absl::InvalidArgumentError(
          absl::StrCat("JSON schema: 'properties' at ", where, " must be an object"));
    std::set<std::string> required;
    if (s.contains("required")) {
      if (!s["required"].is_array())
        return absl::InvalidArgumentError(
            absl::StrCat("JSON schema: 'required' at ", where, " must be an array"));
      for (const json& r : s["required"]) {
        if (!r.is_string() || !props.contains(r.get<std::string>()))
          return absl::InvalidArgumentError(absl::StrCat("JSON schema: 'required' at ", where,
                                                         " names ", r.dump(), ", not a property"));
        required.insert(r.get<std::string>());
      }
    }
    std::vector<std::string> kv;
    std::vector<bool> req;
    for (const auto& [key, sub] : props.items()) {
      auto v = Visit(sub, absl::StrCat(where, "/properties/", key), absl::StrCat(hint, "-", key));
      if (!v.ok()) return v.status();
      kv.push_back(absl::StrCat(GbnfLiteral(json(key).dump()), " ws \":\" ws ", *v));
      req.push_back(required.count(key) > 0);
    }
    // first_i: the members from i on with none written yet; rest_i: with one written before.
    const size_t n = kv.size();
    std::vector<std::string> first(n + 1), rest(n + 1);
    first[n] = rest[n] = "\"\"";
    for (size_t i = n; i-- > 0;) {
      const std::string r = Define(
          absl::StrCat(hint, "-rest"),
          req[i] ? absl::StrCat("ws \",\" ws ", kv[i], " ", rest[i + 1])
                 : absl::StrCat("ws \",\" ws ", kv[i], " ", rest[i + 1], " | ", rest[i + 1]));
      const std::string f =
          Define(absl::StrCat(hint, "-first"),
                 req[i] ? absl::StrCat(kv[i], " ", rest[i + 1])
                        : absl::StrCat(kv[i], " ", rest[i + 1], " | ", first[i + 1]));
      rest[i] = r;
      first[i] = f;
    }
    return Define(hint, absl::StrCat("\"{\" ws ", first[0], " ws \"}\""));
  }

  const json& root_;
  const std::string prefix_;
  int depth_ = 0;
  std::map<std::string, std::string> rules_;
  std::map<std::string, std::string> by_body_;
  std::map<std::string, std::string> refs_;
};

}  // namespace

std::string GbnfLiteral(std::string_view s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02X", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

absl::StatusOr<std::string> JsonSchemaRules(std::string_view schema_json,
                                            const std::string& prefix) {
  // ordered_json: properties are written in the schema's own order.
  const json schema = json::parse(schema_json, nullptr, /*allow_exceptions=*/false);
  if (schema.is_discarded()) return absl::InvalidArgumentError("JSON schema: not valid JSON");
  return Converter(schema, prefix).Run();
}

std::string JsonGbnfPrimitives() {
  return kPrimitives;
}

absl::StatusOr<std::string> JsonSchemaToGbnf(std::string_view schema_json) {
  auto rules = JsonSchemaRules(schema_json, "schema");
  if (!rules.ok()) return rules.status();
  return absl::StrCat("root ::= schema\n", *rules, kPrimitives);
}

std::string JsonObjectGbnf() {
  return absl::StrCat("root ::= object\n", kPrimitives);
}

}  // namespace amoeba
