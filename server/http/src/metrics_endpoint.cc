#include "server/metrics_endpoint.h"

#include "http_server.h"
#include "http_status.h"
#include "server/request_checks.h"

namespace amoeba {

MetricsEndpoint::MetricsEndpoint(const Metrics& metrics, std::string token, HttpLimits limits)
    : metrics_(metrics), token_(std::move(token)), limits_(limits) {}

MetricsEndpoint::~MetricsEndpoint() {
  Stop();
}

absl::Status MetricsEndpoint::Start(const std::string& host, int port) {
  HttpServerOptions o;
  o.host = host;
  o.port = port;
  o.limits = limits_;
  o.limits.io_threads = o.limits.handler_threads = 1;
  o.name = "metrics";
  HttpHandlers h;
  h.admit = [this](const HttpRequest& req) -> std::optional<HttpReply> {
    if (req.path != "/metrics" && req.path != "/health")
      return TransportErrorReply(404, "no route " + LogSafe(req.path, 80));
    if (req.method != "GET" && req.method != "HEAD") {
      HttpReply r = TransportErrorReply(405, "only GET and HEAD are allowed");
      r.headers.emplace_back("Allow", "GET, HEAD");
      return r;
    }
    if (req.path == "/metrics" && !token_.empty()) {
      if (absl::Status st = CheckBearerToken(req.Header("Authorization"), token_); !st.ok())
        return ErrorReply(st);
    }
    return std::nullopt;
  };
  h.handle = [this](HttpRequest&& req, std::shared_ptr<HttpExchange> ex) {
    HttpReply r;
    if (req.path == "/health") {
      r.body = R"({"status":"SERVING"})";
    } else {
      r.content_type = Metrics::kContentType;
      r.body = metrics_.Render();
    }
    ex->Reply(std::move(r));
  };
  h.error = [](int status, std::string message) { return TransportErrorReply(status, message); };
  server_ = std::make_unique<HttpServer>(std::move(o), std::move(h));
  if (absl::Status st = server_->Start(); !st.ok()) {
    server_.reset();
    return st;
  }
  return absl::OkStatus();
}

int MetricsEndpoint::port() const {
  return server_ ? server_->port() : 0;
}

void MetricsEndpoint::Stop() {
  if (server_) server_->Stop();
}

}  // namespace amoeba
