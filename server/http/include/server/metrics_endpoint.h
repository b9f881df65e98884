// GET /metrics (Prometheus text format) on a port of its own, for scrapers kept off the API port.
#pragma once
#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "server/metrics.h"

namespace httplib {
class Server;
}

namespace amoeba {

class MetricsEndpoint {
 public:
  explicit MetricsEndpoint(const Metrics& metrics);
  ~MetricsEndpoint();
  // Binds host:port (0 = any free port) and serves on a thread of its own.
  absl::Status Start(const std::string& host, int port);
  int port() const { return port_; }
  void Stop();

 private:
  const Metrics& metrics_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace amoeba
