#include "browser_guard.h"

#include "absl/strings/str_cat.h"
#include "http_status.h"

namespace amoeba {
namespace {

// "host:port" -> "host"; "[::1]:8080" -> "[::1]".
std::string_view HostName(std::string_view host) {
  if (!host.empty() && host.front() == '[') {
    const size_t end = host.find(']');
    return end == std::string_view::npos ? host : host.substr(0, end + 1);
  }
  return host.substr(0, host.find(':'));
}

bool Listed(const std::vector<std::string>& list, std::string_view value) {
  for (const auto& v : list)
    if (v == "*" || EqualsNoCase(v, value)) return true;
  return false;
}

}  // namespace

std::optional<HttpReply> CheckHost(const HttpRequest& r, const std::vector<std::string>& allowed) {
  if (allowed.empty()) return std::nullopt;
  const std::string host = r.Header("Host").value_or("");
  if (Listed(allowed, HostName(host))) return std::nullopt;
  HttpReply e = TransportErrorReply(
      421, absl::StrCat("Host \"", host.substr(0, 100), "\" is not served here (--allowed-hosts)"));
  return e;
}

OriginVerdict CheckOrigin(const HttpRequest& r, const std::vector<std::string>& allowed) {
  OriginVerdict v;
  const auto origin = r.Header("Origin");
  if (!origin) return v;
  // Same origin: the Origin's authority is the Host the request was sent to.
  const std::string_view o = *origin;
  const size_t scheme = o.find("://");
  const std::string_view authority = scheme == std::string_view::npos ? "" : o.substr(scheme + 3);
  if (!authority.empty() && EqualsNoCase(authority, r.Header("Host").value_or(""))) return v;
  if (!Listed(allowed, o)) {
    v.refused = true;
    return v;
  }
  v.cors = {{"Access-Control-Allow-Origin", *origin}, {"Vary", "Origin"}};
  return v;
}

HttpReply Preflight(const HttpRequest& r, const OriginVerdict& v, std::string_view methods) {
  if (v.refused || !r.Header("Origin"))
    return TransportErrorReply(403,
                               "cross-origin requests from this origin are not allowed "
                               "(--allowed-origins)");
  HttpReply p;
  p.status = 204;
  p.content_type = "";
  p.headers = v.cors;
  p.headers.emplace_back("Access-Control-Allow-Methods", std::string(methods));
  p.headers.emplace_back("Access-Control-Allow-Headers",
                         "Authorization, Content-Type, X-Request-Id");
  p.headers.emplace_back("Access-Control-Max-Age", "600");
  return p;
}

bool IsJsonContentType(std::string_view content_type) {
  const std::string_view media = TrimSpace(content_type.substr(0, content_type.find(';')));
  return EqualsNoCase(media, "application/json");
}

HttpHeaders PlaygroundHeaders() {
  return {{"Content-Security-Policy",
           "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'"},
          {"X-Frame-Options", "DENY"},
          {"X-Content-Type-Options", "nosniff"},
          {"Referrer-Policy", "no-referrer"}};
}

}  // namespace amoeba
