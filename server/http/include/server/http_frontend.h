// The OpenAI-compatible HTTP front end beside the gRPC one, over the same serving core (its
// transport, an asynchronous Boost.Beast server, is in src/http_server.h): GET /v1/models (every
// grid shape as a model id, plus aliases), POST /v1/completions and /v1/chat/completions (JSON or
// server-sent events), POST /v1/amoeba/export (a tar stream), GET /v1/amoeba/shapes, /health,
// /metrics and the playground at /. A model name picks the shape; "amoeba": {"budget": {...}} lets
// the planner pick it instead.
#pragma once
#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "server/chat_template.h"
#include "server/http_limits.h"
#include "server/serving.h"

namespace amoeba {

class HttpServer;

struct HttpOptions {
  std::string host = "0.0.0.0";
  int port = -1;                         // -1 = off, 0 = any free port
  std::string tls_cert, tls_key;         // PEM files; both set = HTTPS
  std::map<std::string, Shape> aliases;  // --model-alias name=depth=D,width=W
  ChatFormat chat_format;                // how chat messages become a prompt
  HttpLimits limits;
  // Browser safety. Cross-origin requests (an Origin header that is not this server's own) are
  // refused unless their origin is listed here ("*" = any; default none); allowed ones get CORS
  // headers and preflights.
  std::vector<std::string> allowed_origins;
  // When set, a request whose Host (without port) is not listed is refused (DNS rebinding).
  std::vector<std::string> allowed_hosts;
  // Test-only fault injection: called with the path before each handler runs; what it throws
  // goes through the transport's exception boundary (a 500 with OpenAI's error body).
  std::function<void(const std::string& path)> fault_hook;
};

class HttpFrontend {
 public:
  HttpFrontend(Serving& serving, HttpOptions options);
  ~HttpFrontend();
  // Binds and serves on threads of its own.
  absl::Status Start();
  int port() const;
  // SIGTERM: close idle and still-sending connections (new ones are answered, then closed);
  // responses under way go on.
  void BeginShutdown();
  // Ends every connection (generations under way are cancelled) and joins the threads.
  void Stop();

 private:
  struct Routes;
  Serving& serving_;
  HttpOptions options_;
  std::shared_ptr<Routes> routes_;
  std::unique_ptr<HttpServer> server_;
};

}  // namespace amoeba
