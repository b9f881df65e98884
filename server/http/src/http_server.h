// The HTTP transport under the OpenAI front end and the metrics port: an asynchronous
// HTTP/1.1 server (Boost.Beast over Asio) where a connection costs a socket and its buffers, not
// a thread. It knows nothing of OpenAI or of the serving core; it enforces the limits a hostile
// or careless client could otherwise turn against every other client:
//   - the whole request head must arrive within `header_timeout_ms` (a client that drips one
//     byte a second is cut off), the body within `body_timeout_ms`, an idle keep-alive
//     connection is closed after `idle_timeout_ms`;
//   - head bytes and field count are capped (431), the body is checked against its limit as it
//     arrives, chunked included, and before anything is allocated for it (413); bodies of all
//     requests in flight share one cap (503);
//   - `admit` sees the head before the body is read (the token is checked there), so an
//     unauthenticated client cannot make the server hold its body;
//   - connections are capped in all and per client address (excess ones are closed at once);
//   - a response is written without blocking anyone: a streaming client that stops reading is
//     closed once `max_stream_buffer_bytes` are waiting for it, a write that makes no progress
//     for `write_timeout_ms` closes the connection, and a client that goes away while its
//     response is being made is noticed at once (the exchange's on_close runs: the front end
//     cancels the work);
//   - strict parsing: obs-fold, conflicting or signed Content-Length and malformed heads are
//     400; pipelined requests are served in order.
// Handlers run on a small pool of their own, never on the I/O threads.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "server/http_limits.h"

namespace amoeba {

using HttpHeaders = std::vector<std::pair<std::string, std::string>>;

// ASCII case-insensitive equality (header names, tokens, media types).
bool EqualsNoCase(std::string_view a, std::string_view b);
// Without leading and trailing spaces and tabs.
std::string_view TrimSpace(std::string_view s);

struct HttpRequest {
  std::string method;  // "GET", "POST", ... as sent
  std::string target;  // as sent: path and query
  std::string path;    // target without the query, percent-decoding not applied
  std::string client;  // the peer's address
  HttpHeaders headers;
  std::string body;  // empty in `admit`
  // The first value of a field (names compare case-insensitively), or nullopt.
  std::optional<std::string> Header(std::string_view name) const;
  // Content-Length when sent (the parser has checked it), else nullopt (chunked or none).
  std::optional<uint64_t> content_length;
  bool chunked = false;
};

struct HttpReply {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  HttpHeaders headers;
  bool close = false;  // close the connection after this response
};

// One request's response, used from any thread. Either Reply once, or BeginStream, Write any
// number of times, End. Calls after the connection is gone are ignored.
class HttpExchange {
 public:
  class Sink;  // the connection's side (http_server.cc)
  HttpExchange(std::shared_ptr<Sink> sink, int64_t max_buffered);
  ~HttpExchange();

  void Reply(HttpReply r);
  void BeginStream(int status, std::string content_type, HttpHeaders headers);
  // Queues bytes as one chunk. False when the client is gone or already `max_buffered` bytes
  // behind (the connection is then closed). `sent`, if set, runs on an I/O thread once these
  // bytes are written (not if the connection closes first).
  bool Write(std::string bytes, std::function<void()> sent = nullptr);
  void End();
  // Ends the connection without completing the response (a chunked body cut short tells the
  // client it is incomplete).
  void Abort();
  // Runs once, on an I/O thread, if the connection ends before the response is complete (the
  // client left, a timeout, shutdown); at once if it already has.
  void OnClose(std::function<void()> f);
  bool closed() const { return closed_; }

  // The transport's side: the connection ended early (runs on_close); n bytes were written;
  // the response is complete (on_close is dropped unrun: what it holds, often the generation
  // whose callbacks hold this exchange, is let go).
  void MarkClosed();
  void Sent(int64_t n);
  void MarkComplete();

 private:
  std::shared_ptr<Sink> sink_;
  const int64_t max_buffered_;
  std::atomic<int64_t> buffered_{0};
  std::atomic<bool> closed_{false};
  std::mutex mu_;
  std::function<void()> on_close_;
  bool close_ran_ = false;
};

struct HttpHandlers {
  // After the head, before the body is read: a reply to send at once (the connection is then
  // closed if a body was announced), or nullopt to read the body and call `handle`.
  std::function<std::optional<HttpReply>(const HttpRequest& head)> admit;
  // On a handler thread, with the whole body.
  std::function<void(HttpRequest&& request, std::shared_ptr<HttpExchange> exchange)> handle;
  // The error responses the transport itself sends (400, 408, 413, 431, 503).
  std::function<HttpReply(int status, std::string message)> error;
  // Once per response, when its head is written (for metrics).
  std::function<void(const HttpRequest& head, int status)> on_response;
};

struct HttpServerOptions {
  std::string host = "0.0.0.0";
  int port = 0;                   // 0 = any free port
  std::string tls_cert, tls_key;  // PEM files; both set = HTTPS
  HttpLimits limits;
  std::string name = "http";  // in log lines
};

class HttpServerImpl;

class HttpServer {
 public:
  HttpServer(HttpServerOptions options, HttpHandlers handlers);
  ~HttpServer();
  // Binds and starts the I/O and handler threads.
  absl::Status Start();
  int port() const;
  // The drain: closes every connection that is not in the middle of a response (idle, or still
  // sending its request: slow clients cannot hold the exit). Responses under way go on; new
  // connections are still answered (a load balancer may send some until it sees the health
  // check fail), each response then closing its connection.
  void BeginShutdown();
  // Stops accepting, closes everything (responses under way end; their on_close runs) and joins
  // the threads.
  void Stop();
  // Open connections (for tests and the shutdown log).
  int connections() const;

 private:
  std::unique_ptr<HttpServerImpl> impl_;
};

}  // namespace amoeba
