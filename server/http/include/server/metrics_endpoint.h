// GET /metrics (Prometheus text format) on a port of its own, for scrapers kept off the API
// port; /health beside it. Same transport and limits as the API port.
#pragma once
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "server/http_limits.h"
#include "server/metrics.h"

namespace amoeba {

class HttpServer;

class MetricsEndpoint {
 public:
  // `token`: when set (--auth-all), /metrics needs "Authorization: Bearer <token>" (Prometheus'
  // scrape config `authorization`); /health never does.
  explicit MetricsEndpoint(const Metrics& metrics, std::string token = "", HttpLimits limits = {});
  ~MetricsEndpoint();
  // Binds host:port (0 = any free port) and serves on threads of its own.
  absl::Status Start(const std::string& host, int port);
  int port() const;
  void Stop();

 private:
  const Metrics& metrics_;
  const std::string token_;
  const HttpLimits limits_;
  std::unique_ptr<HttpServer> server_;
};

}  // namespace amoeba
