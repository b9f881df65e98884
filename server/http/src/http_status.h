// The HTTP front end's one mapping from the core's statuses: the HTTP status and OpenAI's error
// body {"error": {"message", "type", "param", "code"}}.
#pragma once
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "http_server.h"

namespace amoeba {

int HttpStatusFor(absl::StatusCode c);
nlohmann::json ErrorBody(const absl::Status& s);
// The reply for a status: its HTTP status and OpenAI's error body.
HttpReply ErrorReply(const absl::Status& s);
// The transport's own errors (HttpHandlers::error), in the same body.
HttpReply TransportErrorReply(int http_status, const std::string& message);

}  // namespace amoeba
