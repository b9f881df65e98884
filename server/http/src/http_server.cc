#include "http_server.h"

#include <spdlog/spdlog.h>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <chrono>
#include <deque>
#include <limits>
#include <map>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "model/errors.h"

namespace amoeba {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
namespace ssl = net::ssl;
using tcp = net::ip::tcp;
using Ms = std::chrono::milliseconds;

bool EqualsNoCase(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (absl::ascii_tolower(static_cast<unsigned char>(a[i])) !=
        absl::ascii_tolower(static_cast<unsigned char>(b[i])))
      return false;
  return true;
}

std::string_view TrimSpace(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

std::optional<std::string> HttpRequest::Header(std::string_view name) const {
  for (const auto& [k, v] : headers)
    if (EqualsNoCase(k, name)) return v;
  return std::nullopt;
}

// What a connection does for the exchange numbered `seq`; calls for an exchange that is over
// are ignored there.
class Connection {
 public:
  virtual ~Connection() = default;
  virtual void Reply(uint64_t seq, HttpReply r) = 0;
  virtual void BeginStream(uint64_t seq, int status, std::string content_type,
                           HttpHeaders headers) = 0;
  virtual void Write(uint64_t seq, std::string bytes, int64_t n, std::function<void()> sent) = 0;
  virtual void End(uint64_t seq) = 0;
  virtual void Close(uint64_t seq) = 0;
  virtual net::any_io_executor executor() = 0;
};

// Open while the server runs: a post after Stop() would reach an io_context that is gone.
struct Gate {
  std::mutex mu;
  bool open = true;
};

class HttpExchange::Sink {
 public:
  Sink(std::shared_ptr<Gate> gate, std::weak_ptr<Connection> conn, uint64_t seq)
      : gate_(std::move(gate)), conn_(std::move(conn)), seq_(seq) {}
  // Runs f(connection, seq) on the connection's strand, if both still exist.
  template <class F>
  void Post(F f) {
    std::lock_guard<std::mutex> l(gate_->mu);
    if (!gate_->open) return;
    auto c = conn_.lock();
    if (!c) return;
    net::post(c->executor(), [c, seq = seq_, f = std::move(f)]() mutable { f(*c, seq); });
  }

 private:
  std::shared_ptr<Gate> gate_;
  std::weak_ptr<Connection> conn_;
  uint64_t seq_;
};

HttpExchange::HttpExchange(std::shared_ptr<Sink> sink, int64_t max_buffered)
    : sink_(std::move(sink)), max_buffered_(max_buffered) {}

HttpExchange::~HttpExchange() = default;

void HttpExchange::Reply(HttpReply r) {
  sink_->Post(
      [r = std::move(r)](Connection& c, uint64_t seq) mutable { c.Reply(seq, std::move(r)); });
}

void HttpExchange::BeginStream(int status, std::string content_type, HttpHeaders headers) {
  sink_->Post([=, ct = std::move(content_type), h = std::move(headers)](Connection& c,
                                                                        uint64_t seq) mutable {
    c.BeginStream(seq, status, std::move(ct), std::move(h));
  });
}

bool HttpExchange::Write(std::string bytes, std::function<void()> sent) {
  if (closed_) return false;
  const int64_t n = static_cast<int64_t>(bytes.size());
  const int64_t before = buffered_.fetch_add(n);
  // A write is always taken when nothing is waiting: one chunk may exceed the bound.
  if (before > 0 && before + n > max_buffered_) {
    closed_ = true;
    sink_->Post([](Connection& c, uint64_t seq) { c.Close(seq); });
    return false;
  }
  sink_->Post([b = std::move(bytes), n, s = std::move(sent)](Connection& c, uint64_t seq) mutable {
    c.Write(seq, std::move(b), n, std::move(s));
  });
  return true;
}

void HttpExchange::End() {
  sink_->Post([](Connection& c, uint64_t seq) { c.End(seq); });
}

void HttpExchange::Abort() {
  closed_ = true;
  sink_->Post([](Connection& c, uint64_t seq) { c.Close(seq); });
}

void HttpExchange::OnClose(std::function<void()> f) {
  std::unique_lock<std::mutex> l(mu_);
  if (close_ran_) {
    l.unlock();
    f();
    return;
  }
  on_close_ = std::move(f);
}

void HttpExchange::MarkClosed() {
  closed_ = true;
  std::function<void()> f;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (close_ran_) return;
    close_ran_ = true;
    f = std::move(on_close_);
  }
  if (f) f();
}

void HttpExchange::MarkComplete() {
  std::function<void()> drop;
  std::lock_guard<std::mutex> l(mu_);
  close_ran_ = true;  // nothing left to cancel
  drop = std::move(on_close_);
}

void HttpExchange::Sent(int64_t n) {
  buffered_ -= n;
}

namespace {

// The most a closing connection reads and drops after its response (besides the body limit):
// enough for any body a client declares in earnest, small next to what an attacker could send.
constexpr int64_t kMaxLingerBytes = 16 << 20;

std::string ResponseHead(int status, std::string_view content_type, const HttpHeaders& headers,
                         std::optional<size_t> content_length, bool close) {
  std::string reason(http::obsolete_reason(http::int_to_status(status)));
  if (reason == "<unknown-status>") reason = "Unknown";
  std::string h = absl::StrCat("HTTP/1.1 ", status, " ", reason, "\r\nServer: amoeba\r\n");
  if (!content_type.empty())
    absl::StrAppend(&h, "Content-Type: ", std::string(content_type), "\r\n");
  if (status == 204 || status == 304)
    ;  // no body and, by RFC 9110, no Content-Length
  else if (content_length)
    absl::StrAppend(&h, "Content-Length: ", *content_length, "\r\n");
  else
    h += "Transfer-Encoding: chunked\r\n";
  for (const auto& [k, v] : headers) absl::StrAppend(&h, k, ": ", v, "\r\n");
  if (close) h += "Connection: close\r\n";
  h += "\r\n";
  return h;
}

// The raw head: obs-fold (a field continued on a line starting with a space or tab) is refused
// here, since the parser would accept it; the field count is capped.
std::optional<std::pair<int, std::string>> CheckRawHead(std::string_view head, int max_fields) {
  if (head.find("\r\n ") != std::string_view::npos || head.find("\r\n\t") != std::string_view::npos)
    return std::make_pair(400, std::string("obsolete line folding in a header field"));
  int lines = 0;
  for (size_t at = head.find("\r\n"); at != std::string_view::npos; at = head.find("\r\n", at + 2))
    ++lines;
  if (lines - 2 > max_fields)  // the request line and the empty line are not fields
    return std::make_pair(431, absl::StrCat("more than ", max_fields, " header fields"));
  return std::nullopt;
}

}  // namespace

class HttpServerImpl {
 public:
  HttpServerImpl(HttpServerOptions options, HttpHandlers handlers)
      : options_(std::move(options)),
        handlers_(std::move(handlers)),
        gate_(std::make_shared<Gate>()),
        ioc_(std::max(1, options_.limits.io_threads)),
        acceptor_(net::make_strand(ioc_)),
        pool_(std::max(1, options_.limits.handler_threads)) {}

  ~HttpServerImpl() { Stop(); }

  absl::Status Start();
  void BeginShutdown();
  void Stop();
  int port() const { return port_; }
  int connections() const {
    std::lock_guard<std::mutex> l(mu_);
    return total_;
  }

  const HttpServerOptions& options() const { return options_; }
  const HttpLimits& limits() const { return options_.limits; }
  const HttpHandlers& handlers() const { return handlers_; }
  const std::shared_ptr<Gate>& gate() const { return gate_; }
  net::thread_pool& pool() { return pool_; }
  bool shutting_down() const { return shutting_down_; }

  // The body bytes a request may hold; false when all requests together would pass the cap.
  bool ReserveBody(int64_t n) {
    int64_t cur = inflight_body_.load();
    do {
      if (n > 0 && cur + n > limits().max_inflight_body_bytes) return false;
    } while (!inflight_body_.compare_exchange_weak(cur, cur + n));
    return true;
  }
  void ReleaseBody(int64_t n) { inflight_body_ -= n; }

  void Unregister(uint64_t id, const std::string& client) {
    std::lock_guard<std::mutex> l(mu_);
    sessions_.erase(id);
    --total_;
    if (--per_client_[client] == 0) per_client_.erase(client);
  }

 private:
  class SessionBase;
  template <class Stream>
  class Session;

  void Accept();
  void OnAccept(tcp::socket socket);
  template <class F>
  void ForEachSession(F f);

  // Declared before the io_context: sessions its handlers still hold unregister here when it
  // is destroyed.
  HttpServerOptions options_;
  HttpHandlers handlers_;
  mutable std::mutex mu_;
  int total_ = 0;
  std::map<std::string, int> per_client_;
  uint64_t next_session_ = 1;
  std::map<uint64_t, std::weak_ptr<SessionBase>> sessions_;
  std::atomic<int64_t> inflight_body_{0};
  std::atomic<bool> shutting_down_{false};
  bool stopped_ = false;
  std::shared_ptr<Gate> gate_;
  std::optional<ssl::context> tls_;
  net::io_context ioc_;
  tcp::acceptor acceptor_;
  net::thread_pool pool_;
  std::vector<std::thread> threads_;
  int port_ = 0;
};

class HttpServerImpl::SessionBase : public Connection,
                                    public std::enable_shared_from_this<SessionBase> {
 public:
  // On the session's strand.
  virtual void CloseIfNotResponding() = 0;
  virtual void CloseNow() = 0;
  // After the I/O threads have stopped: drop the reference a session holds to itself.
  virtual void Release() = 0;
};

template <class Stream>
class HttpServerImpl::Session final : public HttpServerImpl::SessionBase {
 public:
  static constexpr bool kTls = !std::is_same_v<Stream, beast::tcp_stream>;

  template <class... Args>
  Session(HttpServerImpl& server, uint64_t id, std::string client, Args&&... args)
      : server_(server),
        id_(id),
        client_(std::move(client)),
        stream_(std::forward<Args>(args)...) {}

  ~Session() override {
    if (reserved_ > 0) server_.ReleaseBody(reserved_);
    server_.Unregister(id_, client_);
  }

  net::any_io_executor executor() override { return stream_.get_executor(); }

  void Start() {
    self_ = this->shared_from_this();  // held while the session may wait on nobody's I/O
    net::post(executor(), [this, self = this->shared_from_this()] {
      if constexpr (kTls) {
        Lowest().expires_after(Ms(server_.limits().header_timeout_ms));
        stream_.async_handshake(ssl::stream_base::server,
                                [this, self = this->shared_from_this()](beast::error_code ec) {
                                  if (ec) return CloseNow();
                                  ReadHead(true);
                                });
      } else {
        ReadHead(true);
      }
    });
  }

  void CloseIfNotResponding() override {
    if (!responding_) CloseNow();
  }

  void CloseNow() override {
    if (closed_) return;
    closed_ = true;
    if (exchange_) exchange_->MarkClosed();
    exchange_.reset();
    beast::error_code ec;
    Lowest().socket().shutdown(tcp::socket::shutdown_both, ec);
    Lowest().close();
    out_.clear();
    self_.reset();
  }

  void Release() override { self_.reset(); }

  // Connection, on the strand:
  void Reply(uint64_t seq, HttpReply r) override {
    if (!Current(seq) || started_) return;
    SendReply(std::move(r));
  }

  void BeginStream(uint64_t seq, int status, std::string content_type,
                   HttpHeaders headers) override {
    if (!Current(seq) || started_) return;
    started_ = true;
    Observe(status);
    Enqueue(ResponseHead(status, content_type, headers, std::nullopt, CloseAfter(false)), 0,
            nullptr);
  }

  void Write(uint64_t seq, std::string bytes, int64_t n, std::function<void()> sent) override {
    if (!Current(seq) || !started_ || done_) return;
    if (bytes.empty()) {  // an empty chunk would end the body
      if (exchange_) exchange_->Sent(0);
      if (sent) sent();
      return;
    }
    char size[24];
    std::snprintf(size, sizeof(size), "%zx\r\n", bytes.size());
    bytes.insert(0, size);
    bytes += "\r\n";
    Enqueue(std::move(bytes), n, std::move(sent));
  }

  void End(uint64_t seq) override {
    if (!Current(seq) || !started_ || done_) return;
    done_ = true;
    Enqueue("0\r\n\r\n", 0, nullptr);
  }

  void Close(uint64_t seq) override {
    if (Current(seq)) CloseNow();
  }

 private:
  beast::tcp_stream& Lowest() { return beast::get_lowest_layer(stream_); }
  bool Current(uint64_t seq) const { return !closed_ && responding_ && seq == seq_; }

  // Whether this response ends the connection.
  bool CloseAfter(bool asked) {
    close_after_ = close_after_ || asked || !keep_alive_ || server_.shutting_down();
    return close_after_;
  }

  void Observe(int status) {
    if (server_.handlers().on_response) server_.handlers().on_response(head_, status);
  }

  // --- reading a request -------------------------------------------------------------------
  void ReadHead(bool first) {
    responding_ = false;
    started_ = done_ = close_after_ = false;
    head_ = HttpRequest{};
    scanned_ = 0;
    head_started_ = buffer_.size() > 0;
    Lowest().expires_after(Ms(first || head_started_ ? server_.limits().header_timeout_ms
                                                     : server_.limits().idle_timeout_ms));
    TryHead();
  }

  void TryHead() {
    const std::string_view have(static_cast<const char*>(buffer_.data().data()), buffer_.size());
    // Resume the search where the last one stopped (a head sent a byte at a time stays linear).
    const size_t end = have.find("\r\n\r\n", scanned_ > 3 ? scanned_ - 3 : 0);
    scanned_ = have.size();
    const int64_t max = server_.limits().max_header_bytes;
    if (end != std::string_view::npos && static_cast<int64_t>(end + 4) <= max)
      return OnHead(end + 4);
    if (static_cast<int64_t>(have.size()) >= max)
      return Fail(431, absl::StrCat("the request head is larger than ", max, " bytes"));
    const size_t room = static_cast<size_t>(std::min<int64_t>(4096, max - have.size()));
    stream_.async_read_some(buffer_.prepare(room), [this, self = this->shared_from_this()](
                                                       beast::error_code ec, size_t n) {
      if (closed_) return;
      if (ec) return CloseNow();  // timeout (the stream is closed already), EOF, reset
      buffer_.commit(n);
      if (!head_started_) {  // the first byte of a request: the head deadline starts
        head_started_ = true;
        Lowest().expires_after(Ms(server_.limits().header_timeout_ms));
      }
      TryHead();
    });
  }

  void OnHead(size_t n) {
    const std::string_view raw(static_cast<const char*>(buffer_.data().data()), n);
    if (auto bad = CheckRawHead(raw, server_.limits().max_header_fields))
      return Fail(bad->first, bad->second);
    parser_.emplace();
    parser_->header_limit(static_cast<uint32_t>(server_.limits().max_header_bytes));
    // No limit while the head is parsed: the parser would refuse a large Content-Length before
    // `admit` sees the token. The limit is set before the body is read. (Not boost::none: Beast
    // 1.74 compares a length with the optional, and every length is above "none".)
    parser_->body_limit(std::numeric_limits<uint64_t>::max());
    parser_->eager(false);
    beast::error_code ec;
    const size_t used = parser_->put(net::buffer(raw.data(), raw.size()), ec);
    if (ec || !parser_->is_header_done())
      return Fail(400, absl::StrCat("malformed request head: ", ec ? ec.message() : "incomplete"));
    buffer_.consume(used);
    const auto& req = parser_->get();
    head_.method = std::string(req.method_string());
    head_.target = std::string(req.target());
    head_.path = head_.target.substr(0, head_.target.find('?'));
    head_.client = client_;
    for (const auto& f : req) head_.headers.emplace_back(f.name_string(), f.value());
    if (auto n = parser_->content_length()) head_.content_length = *n;
    head_.chunked = parser_->chunked();
    keep_alive_ = parser_->keep_alive();
    if (req.version() != 11 && req.version() != 10)
      return Fail(505, "only HTTP/1.0 and HTTP/1.1 are served");
    const bool has_body = head_.chunked || head_.content_length.value_or(0) > 0;
    const int64_t max_body = server_.limits().max_body_bytes;
    responding_ = true;  // from here on, a reply is this request's
    if (server_.handlers().admit) {
      std::optional<HttpReply> early;
      try {
        early = server_.handlers().admit(head_);
      } catch (...) {
        const absl::Status st = StatusFromException(std::current_exception(), "http admit");
        early = server_.handlers().error(500, std::string(st.message()));
      }
      if (early) {
        early->close = early->close || has_body;  // its body is never read
        return SendReply(std::move(*early));
      }
    }
    if (head_.content_length && static_cast<int64_t>(*head_.content_length) > max_body)
      return Fail(413, absl::StrCat("the body is larger than ", max_body, " bytes"));
    parser_->body_limit(static_cast<uint64_t>(max_body));  // chunked: checked as it arrives
    const int64_t reserve = has_body ? (head_.chunked ? max_body : *head_.content_length) : 0;
    if (!server_.ReserveBody(reserve))
      return Fail(503, "too many request bodies in flight; retry later");
    reserved_ = reserve;
    if (!has_body) return Dispatch();
    Lowest().expires_after(Ms(server_.limits().body_timeout_ms));
    const auto expect = head_.Header("Expect");
    if (expect && EqualsNoCase(*expect, "100-continue")) {
      continue_ = std::make_shared<std::string>("HTTP/1.1 100 Continue\r\n\r\n");
      net::async_write(stream_, net::buffer(*continue_),
                       [this, self = this->shared_from_this()](beast::error_code ec, size_t) {
                         if (closed_) return;
                         if (ec) return CloseNow();
                         ReadBody();
                       });
      return;
    }
    ReadBody();
  }

  void ReadBody() {
    http::async_read(stream_, buffer_, *parser_,
                     [this, self = this->shared_from_this()](beast::error_code ec, size_t) {
                       if (closed_) return;
                       if (ec == http::error::body_limit)
                         return Fail(413, absl::StrCat("the body is larger than ",
                                                       server_.limits().max_body_bytes, " bytes"));
                       if (ec) return CloseNow();  // timeout, EOF, malformed chunking
                       Dispatch();
                     });
  }

  // The whole request is here: the handler runs on the pool; meanwhile the socket is watched
  // so that a client that leaves is noticed at once.
  void Dispatch() {
    HttpRequest request = head_;
    request.body = std::move(parser_->get().body());
    parser_.reset();
    Lowest().expires_never();
    ++seq_;
    exchange_ = std::make_shared<HttpExchange>(
        std::make_shared<HttpExchange::Sink>(
            server_.gate(), std::static_pointer_cast<Connection>(this->shared_from_this()), seq_),
        server_.limits().max_stream_buffer_bytes);
    Watch();
    const int64_t reserved = std::exchange(reserved_, 0);
    net::post(server_.pool(), [server = &server_, request = std::move(request), ex = exchange_,
                               reserved]() mutable {
      try {
        server->handlers().handle(std::move(request), ex);
      } catch (...) {
        const absl::Status st = StatusFromException(std::current_exception(), "http handler");
        spdlog::error("{}: handler: {}", server->options().name, std::string(st.message()));
        ex->Reply(server->handlers().error(500, "internal error"));
      }
      server->ReleaseBody(reserved);
    });
  }

  // Readable while a response is made: EOF or a reset is a client that left; bytes are its
  // next (pipelined) request, left for after this response.
  void Watch() {
    watching_ = true;
    Lowest().socket().async_wait(
        tcp::socket::wait_read,
        net::bind_executor(executor(), [this, self = this->shared_from_this(),
                                        seq = seq_](beast::error_code ec) {
          if (seq == seq_) watching_ = false;
          if (ec || closed_ || !responding_ || seq != seq_) return;
          char c;
          beast::error_code pe;
          // The socket is in non-blocking mode (OnAccept): a readiness that was stale (the
          // request's own bytes, already read) is would_block here, and the watch goes on.
          const size_t n =
              Lowest().socket().receive(net::buffer(&c, 1), tcp::socket::message_peek, pe);
          if (pe == net::error::would_block || pe == net::error::try_again) return Watch();
          if (pe || n == 0) {
            spdlog::debug("{}: client {} left during a response", server_.options().name, client_);
            CloseNow();
          }
        }));
  }

  // --- writing a response ------------------------------------------------------------------
  void SendReply(HttpReply r) {
    started_ = done_ = true;
    Observe(r.status);
    std::string out =
        ResponseHead(r.status, r.content_type, r.headers, r.body.size(), CloseAfter(r.close));
    if (head_.method != "HEAD") out += r.body;
    Enqueue(std::move(out), 0, nullptr);
  }

  // A response to a request that is not read on (or not read at all): sent, then closed.
  void Fail(int status, std::string message) {
    spdlog::info("{}: {} from {}: {}", server_.options().name, status, client_, message);
    responding_ = true;
    ++seq_;
    HttpReply r = server_.handlers().error(status, std::move(message));
    r.status = status;
    r.close = true;
    SendReply(std::move(r));
  }

  struct Pending {
    std::string bytes;
    int64_t n;  // the exchange's bytes in it (for its buffer bound)
    std::function<void()> sent;
  };

  void Enqueue(std::string bytes, int64_t n, std::function<void()> sent) {
    out_.push_back({std::move(bytes), n, std::move(sent)});
    if (!writing_) WriteNext();
  }

  void WriteNext() {
    if (closed_) return;
    if (out_.empty()) {
      if (done_) Finish();
      return;
    }
    writing_ = true;
    Lowest().expires_after(Ms(server_.limits().write_timeout_ms));
    net::async_write(stream_, net::buffer(out_.front().bytes),
                     [this, self = this->shared_from_this()](beast::error_code ec, size_t) {
                       writing_ = false;
                       if (closed_) return;
                       if (ec) return CloseNow();  // the client is gone or stopped reading
                       Lowest().expires_never();
                       Pending p = std::move(out_.front());
                       out_.pop_front();
                       if (exchange_) exchange_->Sent(p.n);
                       if (p.sent) p.sent();
                       WriteNext();
                     });
  }

  // The response is out: close, or read the next request.
  void Finish() {
    if (exchange_) exchange_->MarkComplete();
    exchange_.reset();
    responding_ = false;
    if (watching_) {
      beast::error_code ec;
      Lowest().socket().cancel(ec);
    }
    if (close_after_ || server_.shutting_down()) {
      beast::error_code ec;
      Lowest().socket().shutdown(tcp::socket::shutdown_send, ec);
      // Let the client read the response before the socket goes (closing with unread input
      // would reset the connection and could discard the response): read and drop what it
      // still sends, up to a bound in bytes and time, then close.
      Lowest().expires_after(Ms(std::min(server_.limits().idle_timeout_ms, 2000)));
      drain_budget_ = std::max<int64_t>(1 << 20, server_.limits().max_body_bytes);
      // Most clients (Python's http.client, requests, the OpenAI SDK) send a whole declared
      // body before they read any answer: refused on its head, such a body is read and dropped
      // in full, up to a bound, or the client sees a broken pipe instead of the 413.
      if (head_.content_length) {
        const int64_t declared =
            static_cast<int64_t>(std::min<uint64_t>(*head_.content_length, kMaxLingerBytes));
        drain_budget_ = std::max(drain_budget_, declared);
      }
      DrainThenClose();
      return;
    }
    ReadHead(false);
  }

  void DrainThenClose() {
    auto scratch = std::make_shared<std::array<char, 16384>>();
    stream_.async_read_some(net::buffer(*scratch), [this, self = this->shared_from_this(), scratch](
                                                       beast::error_code ec, size_t n) {
      if (closed_) return;
      drain_budget_ -= static_cast<int64_t>(n);
      if (ec || drain_budget_ <= 0) return CloseNow();
      DrainThenClose();
    });
  }

  HttpServerImpl& server_;
  const uint64_t id_;
  const std::string client_;
  Stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::shared_ptr<SessionBase> self_;
  std::shared_ptr<HttpExchange> exchange_;
  std::shared_ptr<std::string> continue_;
  HttpRequest head_;
  std::deque<Pending> out_;
  uint64_t seq_ = 0;
  int64_t reserved_ = 0;
  int64_t drain_budget_ = 0;
  size_t scanned_ = 0;  // head bytes already searched for the blank line
  bool head_started_ = false, keep_alive_ = true, responding_ = false, started_ = false,
       done_ = false, close_after_ = false, writing_ = false, watching_ = false, closed_ = false;
};

absl::Status HttpServerImpl::Start() {
  const HttpServerOptions& o = options_;
  if (!o.tls_cert.empty() || !o.tls_key.empty()) {
    tls_.emplace(ssl::context::tls_server);
    beast::error_code ec;
    tls_->use_certificate_chain_file(o.tls_cert, ec);
    if (!ec) tls_->use_private_key_file(o.tls_key, ssl::context::pem, ec);
    if (ec)
      return absl::InvalidArgumentError(
          absl::StrCat(o.name, ": cannot use the TLS cert/key: ", ec.message()));
  }
  beast::error_code ec;
  const auto address = net::ip::make_address(o.host, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat(o.name, ": bad host ", o.host));
  const tcp::endpoint ep(address, static_cast<unsigned short>(o.port));
  acceptor_.open(ep.protocol(), ec);
  if (!ec) acceptor_.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) acceptor_.bind(ep, ec);
  if (!ec) acceptor_.listen(net::socket_base::max_listen_connections, ec);
  if (ec)
    return absl::UnavailableError(
        absl::StrCat(o.name, ": cannot listen on ", o.host, ":", o.port, ": ", ec.message()));
  port_ = acceptor_.local_endpoint().port();
  Accept();
  for (int i = 0; i < std::max(1, o.limits.io_threads); ++i)
    threads_.emplace_back([this] { ioc_.run(); });
  return absl::OkStatus();
}

void HttpServerImpl::Accept() {
  acceptor_.async_accept(net::make_strand(ioc_), [this](beast::error_code ec, tcp::socket s) {
    if (ec == net::error::operation_aborted || !acceptor_.is_open()) return;
    if (!ec) OnAccept(std::move(s));
    Accept();
  });
}

void HttpServerImpl::OnAccept(tcp::socket socket) {
  beast::error_code ec;
  const auto peer = socket.remote_endpoint(ec);
  if (ec) return;
  const std::string client = peer.address().to_string();
  uint64_t id;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (total_ >= limits().max_connections ||
        per_client_[client] >= limits().max_connections_per_client) {
      if (per_client_[client] == 0) per_client_.erase(client);
      spdlog::warn("{}: connection from {} refused ({} open, {} from it)", options_.name, client,
                   total_, per_client_.count(client) ? per_client_[client] : 0);
      socket.close(ec);
      return;
    }
    ++total_;
    ++per_client_[client];
    id = next_session_++;
  }
  socket.set_option(tcp::no_delay(true), ec);
  // Every operation on it is asynchronous but the watch's peek (Session::Watch), which must
  // never wait.
  socket.non_blocking(true, ec);
  if (limits().socket_send_buffer_bytes > 0)
    socket.set_option(net::socket_base::send_buffer_size(limits().socket_send_buffer_bytes), ec);
  std::shared_ptr<SessionBase> s;
  if (tls_)
    s = std::make_shared<Session<beast::ssl_stream<beast::tcp_stream>>>(*this, id, client,
                                                                        std::move(socket), *tls_);
  else
    s = std::make_shared<Session<beast::tcp_stream>>(*this, id, client, std::move(socket));
  {
    std::lock_guard<std::mutex> l(mu_);
    sessions_[id] = s;
  }
  if (tls_)
    static_cast<Session<beast::ssl_stream<beast::tcp_stream>>&>(*s).Start();
  else
    static_cast<Session<beast::tcp_stream>&>(*s).Start();
}

template <class F>
void HttpServerImpl::ForEachSession(F f) {
  std::vector<std::shared_ptr<SessionBase>> live;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [id, w] : sessions_)
      if (auto s = w.lock()) live.push_back(std::move(s));
  }
  for (auto& s : live) f(s);
}

void HttpServerImpl::BeginShutdown() {
  if (shutting_down_.exchange(true)) return;
  ForEachSession([](const std::shared_ptr<SessionBase>& s) {
    net::post(s->executor(), [s] { s->CloseIfNotResponding(); });
  });
}

void HttpServerImpl::Stop() {
  if (stopped_) return;
  stopped_ = true;
  if (threads_.empty()) return;
  BeginShutdown();
  net::post(acceptor_.get_executor(), [this] {
    beast::error_code ec;
    acceptor_.close(ec);
  });
  ForEachSession([](const std::shared_ptr<SessionBase>& s) {
    net::post(s->executor(), [s] { s->CloseNow(); });
  });
  // The closes run on the I/O threads; then nothing is left to wait for.
  for (int i = 0; i < 100 && connections() > 0; ++i) std::this_thread::sleep_for(Ms(10));
  {
    std::lock_guard<std::mutex> l(gate_->mu);
    gate_->open = false;
  }
  ioc_.stop();
  for (auto& t : threads_) t.join();
  pool_.join();
  ForEachSession([](const std::shared_ptr<SessionBase>& s) { s->Release(); });
}

HttpServer::HttpServer(HttpServerOptions options, HttpHandlers handlers)
    : impl_(std::make_unique<HttpServerImpl>(std::move(options), std::move(handlers))) {}

HttpServer::~HttpServer() = default;

absl::Status HttpServer::Start() {
  return impl_->Start();
}

int HttpServer::port() const {
  return impl_->port();
}

void HttpServer::BeginShutdown() {
  impl_->BeginShutdown();
}

void HttpServer::Stop() {
  impl_->Stop();
}

int HttpServer::connections() const {
  return impl_->connections();
}

}  // namespace amoeba
