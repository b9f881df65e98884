// What keeps a web page the user visits from driving the API: the Host check (DNS rebinding),
// the Origin check with CORS for listed origins, and JSON-only request bodies (a cross-site
// form or text/plain POST needs no preflight, a JSON one does).
#pragma once
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "http_server.h"

namespace amoeba {

// An error reply when `allowed` is set and the Host header (without its port) is not in it.
std::optional<HttpReply> CheckHost(const HttpRequest& r, const std::vector<std::string>& allowed);

struct OriginVerdict {
  bool refused = false;  // cross-origin and not listed
  HttpHeaders cors;      // what an allowed cross-origin response carries
};
// Same-origin requests (no Origin, or one naming this Host) pass with no CORS headers.
OriginVerdict CheckOrigin(const HttpRequest& r, const std::vector<std::string>& allowed);

// The answer to an OPTIONS preflight for a route that takes `methods` ("GET, HEAD" ...).
HttpReply Preflight(const HttpRequest& r, const OriginVerdict& v, std::string_view methods);

// application/json, any parameters (charset) allowed.
bool IsJsonContentType(std::string_view content_type);

// The headers the playground page is sent with: a CSP that allows only its own inline script
// and style and calls to this server, and no framing.
HttpHeaders PlaygroundHeaders();

}  // namespace amoeba
