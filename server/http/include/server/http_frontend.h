// The OpenAI-compatible HTTP front end (cpp-httplib) beside the gRPC one, over the same serving
// core: GET /v1/models (every grid shape as a model id, plus aliases), POST /v1/completions and
// /v1/chat/completions (JSON or server-sent events), POST /v1/amoeba/export (a tar stream),
// GET /v1/amoeba/shapes, /health, /metrics and the playground at /. A model name picks the
// shape; "amoeba": {"budget": {...}} lets the planner pick it instead.
#pragma once
#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "server/chat_template.h"
#include "server/serving.h"

namespace httplib {
class Server;
}

namespace amoeba {

struct HttpOptions {
  std::string host = "0.0.0.0";
  int port = -1;                         // -1 = off, 0 = any free port
  std::string tls_cert, tls_key;         // PEM files; both set = HTTPS
  std::map<std::string, Shape> aliases;  // --model-alias name=depth=D,width=W
  ChatTemplate chat_template = ChatTemplate::kPlain;
  size_t max_body_bytes = 1 << 20;  // larger request bodies are 413
  // Test-only fault injection: called with the path before each handler runs; what it throws
  // goes through the front end's exception handler (a 500 with OpenAI's error body).
  std::function<void(const std::string& path)> fault_hook;
};

class HttpFrontend {
 public:
  HttpFrontend(Serving& serving, HttpOptions options);
  ~HttpFrontend();
  // Binds and serves on a thread of its own.
  absl::Status Start();
  int port() const { return port_; }
  void Stop();

 private:
  struct Routes;
  Serving& serving_;
  HttpOptions options_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace amoeba
