// An OpenAI-compatible HTTP front end (cpp-httplib) beside the gRPC one, over the same Serving
// core: GET /v1/models (every grid shape as a model id, plus aliases), POST /v1/completions and
// /v1/chat/completions (JSON or server-sent events), GET /health and /metrics. A model name picks
// the shape; "amoeba": {"budget": {...}} lets the planner pick it instead.
#pragma once
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
  int port = 0;                          // 0 = any free port
  std::string tls_cert, tls_key;         // PEM files; both set = HTTPS
  std::map<std::string, Shape> aliases;  // --model-alias name=depth=D,width=W
  ChatTemplate chat_template = ChatTemplate::kPlain;
  size_t max_body_bytes = 1 << 20;  // larger request bodies are 413
};

class HttpFrontend {
 public:
  HttpFrontend(Serving& serving, HttpOptions options);
  ~HttpFrontend();
  // Binds and serves on a thread of its own.
  absl::Status Start();
  int port() const { return port_; }
  // From now on /health says 503 and generation requests are refused with 503.
  void SetDraining();
  void Stop();

 private:
  void Routes();
  Serving& serving_;
  HttpOptions options_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
  std::atomic<bool> draining_{false};
  std::atomic<uint64_t> next_id_{1};
};

// "amoeba:depth=6,width=0.75", "depth=6,width=0.75", "full", "smallest" or an alias → shape.
absl::StatusOr<Shape> ShapeForModel(const Supernet& s, const std::map<std::string, Shape>& aliases,
                                    const std::string& model);
// The model id of a shape: "amoeba:depth=6,width=0.75".
std::string ModelId(const Shape& s);

}  // namespace amoeba
