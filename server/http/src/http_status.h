// The HTTP front end's one mapping from the core's statuses: the HTTP status and OpenAI's error
// body {"error": {"message", "type", "param", "code"}}.
#pragma once
#include <httplib.h>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"

namespace amoeba {

int HttpStatusFor(absl::StatusCode c);
nlohmann::json ErrorBody(const absl::Status& s);
void SendError(httplib::Response& res, const absl::Status& s);

}  // namespace amoeba
