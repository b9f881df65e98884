#include "server/metrics_endpoint.h"

#include <httplib.h>

namespace amoeba {

MetricsEndpoint::MetricsEndpoint(const Metrics& metrics) : metrics_(metrics) {}

MetricsEndpoint::~MetricsEndpoint() {
  Stop();
}

absl::Status MetricsEndpoint::Start(const std::string& host, int port) {
  server_ = std::make_unique<httplib::Server>();
  server_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics_.Render(), Metrics::kContentType);
  });
  const int bound =
      port == 0 ? server_->bind_to_any_port(host) : (server_->bind_to_port(host, port) ? port : -1);
  if (bound <= 0)
    return absl::UnavailableError("metrics: cannot listen on " + host + ":" + std::to_string(port));
  port_ = bound;
  thread_ = std::thread([this] { server_->listen_after_bind(); });
  return absl::OkStatus();
}

void MetricsEndpoint::Stop() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace amoeba
