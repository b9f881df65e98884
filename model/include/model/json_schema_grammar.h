// JSON Schema, the subset structured output needs, compiled to a GBNF grammar (model/grammar.h).
//
// Supported: type (one or a list), properties, required, additionalProperties (false, or a schema
// for objects without properties), items, minItems, maxItems, enum, const, anyOf / oneOf,
// minLength, maxLength, $ref into #/$defs or #/definitions (recursion allowed); annotations
// (title, description, default, examples, $schema, $id, $comment, deprecated, readOnly,
// writeOnly) are ignored. Any other keyword is refused with its name and where it is.
//
// Objects are written with their properties in the schema's order (optional ones may be left
// out), the way OpenAI's strict mode does; numbers have at most 16 digits before and after the
// point and two in the exponent (what a double holds); whitespace between tokens is at most one
// space (small models spend whole budgets on indentation otherwise) and none after the top
// value, so generation ends as soon as the value is complete.
#pragma once
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace amoeba {

// `schema_json`: the schema as JSON text (parsed here, keeping its properties' order).
absl::StatusOr<std::string> JsonSchemaToGbnf(std::string_view schema_json);

// The same as rules to combine into a larger grammar: the value's rule is `prefix` (a GBNF name)
// and every rule of the schema's starts with it; the shared JSON rules (ws, string, number,
// value, object, ...) are left out: add JsonGbnfPrimitives() once.
absl::StatusOr<std::string> JsonSchemaRules(std::string_view schema_json,
                                            const std::string& prefix);
std::string JsonGbnfPrimitives();

// A GBNF literal matching exactly the bytes of `s` (quotes, backslashes and control bytes escaped).
std::string GbnfLiteral(std::string_view s);

// Any JSON object (OpenAI's response_format "json_object").
std::string JsonObjectGbnf();

}  // namespace amoeba
