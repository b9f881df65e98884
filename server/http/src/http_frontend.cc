#include "server/http_frontend.h"

#include <httplib.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <future>
#include <mutex>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "http_status.h"
#include "model/errors.h"
#include "openai_request.h"
#include "openai_response.h"
#include "server/metrics.h"
#include "server/request_checks.h"
#include "tar_stream.h"

namespace amoeba {

const char* PlaygroundHtml();  // playground_page.cc, generated from playground.html

namespace {
using nlohmann::json;

// Every route the server has: /metrics counts requests under these labels only ("other" for
// the rest), so a client cannot grow the label set.
constexpr const char* kRoutes[] = {"/",
                                   "/health",
                                   "/metrics",
                                   "/v1/models",
                                   "/v1/completions",
                                   "/v1/chat/completions",
                                   "/v1/amoeba/shapes",
                                   "/v1/amoeba/export"};

std::string_view RouteLabel(const std::string& path) {
  for (const char* r : kRoutes)
    if (path == r) return r;
  return "other";
}

RequestContext ContextOf(const httplib::Request& req) {
  RequestContext c;
  if (req.has_header("Authorization")) c.authorization = req.get_header_value("Authorization");
  return c;
}

int64_t UnixSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Events of one streamed response, filled on the scheduler thread and drained by the HTTP
// thread; shared so that either side may go first.
struct StreamState {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::string> events;
  bool done = false;

  void Push(std::string e, bool last = false) {
    std::lock_guard<std::mutex> l(mu);
    events.push_back(std::move(e));
    done = done || last;
    cv.notify_all();
  }
};

std::string Event(const json& j) {
  return "data: " + j.dump() + "\n\n";
}

}  // namespace

struct HttpFrontend::Routes {
  Serving& serving;
  const HttpOptions& options;
  ModelNames names{options.aliases};

  void Health(httplib::Response& res) const {
    const bool draining = serving.draining();
    res.status = draining ? 503 : 200;
    res.set_content(draining ? R"({"status":"NOT_SERVING"})" : R"({"status":"SERVING"})",
                    "application/json");
  }

  // Every shape with the planner's estimates (the playground's grid and frontier).
  void Shapes(const httplib::Request& req, httplib::Response& res) const {
    auto shapes = serving.Shapes(ContextOf(req));
    if (!shapes.ok()) return SendError(res, shapes.status());
    json out = json::array();
    for (const auto& e : *shapes) {
      out.push_back(
          {{"shape", {{"depth", e.profile.shape.depth}, {"width", e.profile.shape.width}}},
           {"params", e.profile.params},
           {"weight_bytes", e.profile.weight_bytes},
           {"decode_ms_per_token", e.decode_ms},
           {"quality", e.quality},
           {"quality_source", e.quality_source},
           {"latency_source", e.latency_source}});
    }
    res.set_content(json{{"shapes", out}}.dump(), "application/json");
  }

  void Models(const httplib::Request& req, httplib::Response& res) const {
    if (absl::Status st = serving.CheckAuth(ContextOf(req), false); !st.ok())
      return SendError(res, st);
    json data = json::array();
    const int64_t created = UnixSeconds();
    auto add = [&](const std::string& id, const Shape& sh) {
      data.push_back({{"id", id},
                      {"object", "model"},
                      {"created", created},
                      {"owned_by", "amoeba"},
                      {"amoeba", {{"shape", {{"depth", sh.depth}, {"width", sh.width}}}}}});
    };
    const ModelInfo& m = serving.info();
    for (const Shape& sh : m.grid) add(ModelId(sh), sh);
    add("full", m.full);
    add("smallest", m.smallest);
    for (const auto& [name, sh] : names.aliases) add(name, sh);
    res.set_content(json{{"object", "list"}, {"data", data}}.dump(), "application/json");
  }

  void Generate(const httplib::Request& req, httplib::Response& res, bool chat) const {
    // The token first: an unauthenticated client learns nothing about its body.
    const RequestContext ctx = ContextOf(req);
    if (absl::Status st = serving.CheckAuth(ctx, false); !st.ok()) return SendError(res, st);
    auto call = ParseOpenAiCall(serving, names, options.chat_template, req.body, chat);
    if (!call.ok()) return SendError(res, call.status());
    call->req.request_id = req.get_header_value("X-Request-Id");
    auto g = serving.Prepare(call->req, ctx);
    if (!g.ok()) return SendError(res, g.status());
    OpenAiResponseHead head;
    head.id = absl::StrCat(chat ? "chatcmpl-" : "cmpl-", (*g)->request_id());
    head.created = UnixSeconds();
    head.chat = chat;
    head.shape = (*g)->shape();
    head.model = call->model.empty() ? ModelId(head.shape) : call->model;
    res.set_header("X-Request-Id", (*g)->request_id());
    if (call->stream)
      Stream(*g, head, res);
    else
      Whole(*g, head, res);
  }

  void Whole(const std::shared_ptr<Generation>& g, const OpenAiResponseHead& head,
             httplib::Response& res) const {
    auto text = std::make_shared<std::string>();
    auto done = std::make_shared<std::promise<JobResult>>();
    GenerationCallbacks cb;
    cb.on_token = [text](int32_t, std::string_view t) { text->append(t); };
    cb.on_done = [done](const JobResult& r) { done->set_value(r); };
    auto result = done->get_future();
    if (absl::Status st = serving.Start(g, std::move(cb)); !st.ok()) return SendError(res, st);
    const JobResult r = result.get();
    if (absl::Status st = FinishError(r); !st.ok()) return SendError(res, st);
    res.set_content(CompletionBody(head, *text, r).dump(), "application/json");
  }

  // Server-sent events: one chunk per text delta, the finish reason, [DONE].
  void Stream(const std::shared_ptr<Generation>& g, const OpenAiResponseHead& head,
              httplib::Response& res) const {
    auto state = std::make_shared<StreamState>();
    if (head.chat) state->Push(Event(ChunkBody(head, json{{"role", "assistant"}}, nullptr)));
    GenerationCallbacks cb;
    cb.on_token = [state, head](int32_t, std::string_view t) {
      if (t.empty()) return;
      const json d = head.chat ? json{{"content", std::string(t)}} : json(std::string(t));
      state->Push(Event(ChunkBody(head, d, nullptr)));
    };
    cb.on_done = [state, head](const JobResult& r) {
      const absl::Status error = FinishError(r);
      state->Push(error.ok() ? Event(LastChunkBody(head, r)) : Event(ErrorBody(error)));
      state->Push("data: [DONE]\n\n", /*last=*/true);
    };
    if (absl::Status st = serving.Start(g, std::move(cb)); !st.ok()) return SendError(res, st);
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [state, g](size_t, httplib::DataSink& sink) {
          std::unique_lock<std::mutex> l(state->mu);
          // Wake at least every 100 ms to notice a client that went away.
          state->cv.wait_for(l, std::chrono::milliseconds(100),
                             [&] { return !state->events.empty() || state->done; });
          while (!state->events.empty()) {
            std::string e = std::move(state->events.front());
            state->events.pop_front();
            l.unlock();
            if (!sink.write(e.data(), e.size())) {
              g->Cancel();  // the client went away
              return false;
            }
            l.lock();
          }
          if (state->done) {
            l.unlock();
            sink.done();
            return true;
          }
          if (!sink.is_writable()) {
            g->Cancel();
            return false;
          }
          return true;
        },
        [g](bool) { g->Cancel(); });  // no-op once finished
  }

  // POST /v1/amoeba/export {"shape": "depth=D,width=W" | {"depth", "width"}, "format", "dtype",
  // "uniform_width", "no_adapters"}: the export's files as a tar stream, then SHA256SUMS.
  void Export(const httplib::Request& req, httplib::Response& res) const {
    const RequestContext ctx = ContextOf(req);
    if (absl::Status st = serving.CheckAuth(ctx, true); !st.ok()) return SendError(res, st);
    auto r = ParseExport(req.body);
    if (!r.ok()) return SendError(res, r.status());
    r->request_id = req.get_header_value("X-Request-Id");
    auto cancelled = std::make_shared<std::atomic<bool>>(false);
    auto ready = std::make_shared<std::promise<absl::StatusOr<std::unique_ptr<ExportStream>>>>();
    auto staged = ready->get_future();
    auto id = serving.StartExport(*r, ctx, cancelled,
                                  [ready](auto s) { ready->set_value(std::move(s)); });
    if (!id.ok()) return SendError(res, id.status());
    auto stream = staged.get();
    if (!stream.ok()) return SendError(res, stream.status());
    std::shared_ptr<ExportStream> files = std::move(*stream);
    auto sums = std::make_shared<std::string>();
    auto finished = std::make_shared<bool>(false);
    const int64_t mtime = UnixSeconds();
    res.set_header("X-Request-Id", *id);
    res.set_chunked_content_provider(
        "application/x-tar",
        [files, sums, finished, mtime](size_t, httplib::DataSink& sink) {
          if (*finished) return false;
          ExportChunk c;
          auto more = files->Next(c);
          if (!more.ok()) return false;  // the client sees a cut archive; the log says why
          std::string out;
          if (!*more) {
            out = TarHeader("SHA256SUMS", sums->size(), mtime) + *sums + TarPadding(sums->size()) +
                  TarEnd();
            *finished = true;
            if (!sink.write(out.data(), out.size())) return false;
            sink.done();
            return true;
          }
          if (c.offset == 0) out = TarHeader(c.path, c.total_size, mtime);
          out += c.data;
          if (c.last_chunk) {
            out += TarPadding(c.total_size);
            absl::StrAppend(sums.get(), c.sha256, "  ", c.path, "\n");
          }
          return sink.write(out.data(), out.size());
        },
        [cancelled](bool) { *cancelled = true; });
  }

  static absl::StatusOr<ExportRequest> ParseExport(const std::string& body) {
    const json j = json::parse(body.empty() ? "{}" : body, nullptr, false);
    if (j.is_discarded() || !j.is_object()) return InvalidField("body", "not a JSON object");
    ExportRequest r;
    for (const auto& [k, v] : j.items()) {
      if (k == "shape") {
        if (v.is_string()) {
          auto s = Shape::Parse(v.get<std::string>(), 0);
          if (!s.ok()) return InvalidField("shape", std::string(s.status().message()));
          r.shape = *s;
        } else if (v.is_object()) {
          if (v.contains("depth")) {
            if (!v["depth"].is_number_integer()) return InvalidField("shape.depth", "an integer");
            r.shape.depth = v["depth"].get<int64_t>();
          }
          if (v.contains("width")) {
            if (!v["width"].is_number()) return InvalidField("shape.width", "a number");
            r.shape.width = v["width"].get<double>();
          }
        } else {
          return InvalidField("shape", "\"depth=D,width=W\" or {\"depth\", \"width\"}");
        }
      } else if (k == "format" || k == "dtype") {
        if (!v.is_string()) return InvalidField(k, "must be a string");
        (k == "format" ? r.format : r.dtype) = v.get<std::string>();
      } else if (k == "uniform_width" || k == "no_adapters") {
        if (!v.is_boolean()) return InvalidField(k, "must be true or false");
        if (k == "uniform_width")
          r.uniform_width = v.get<bool>();
        else
          r.adapters = !v.get<bool>();
      } else {
        return InvalidField(k, "not supported by this server");
      }
    }
    return r;
  }
};

HttpFrontend::HttpFrontend(Serving& serving, HttpOptions options)
    : serving_(serving), options_(std::move(options)) {}

HttpFrontend::~HttpFrontend() {
  Stop();
}

void HttpFrontend::Stop() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

absl::Status HttpFrontend::Start() {
  if (!options_.tls_cert.empty()) {
    auto ssl =
        std::make_unique<httplib::SSLServer>(options_.tls_cert.c_str(), options_.tls_key.c_str());
    if (!ssl->is_valid()) return absl::InvalidArgumentError("http: cannot use the TLS cert/key");
    server_ = std::move(ssl);
  } else {
    server_ = std::make_unique<httplib::Server>();
  }
  httplib::Server& s = *server_;
  s.set_payload_max_length(options_.max_body_bytes);
  // The one boundary for exceptions on an HTTP thread (handlers call the core, which returns
  // statuses; what escapes anyway is mapped as everywhere else).
  s.set_exception_handler([](const httplib::Request& req, httplib::Response& res,
                             std::exception_ptr ep) {
    const absl::Status st = StatusFromException(ep, "http handler");
    spdlog::error("http: {} {}: {}", req.method, LogSafe(req.path, 80),
                  LogSafe(std::string(st.message()), 200));
    SendError(
        res, st.code() == absl::StatusCode::kInternal ? absl::InternalError("internal error") : st);
  });
  s.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
    if (serving_.metrics()) serving_.metrics()->ObserveHttp(RouteLabel(req.path), res.status);
  });
  auto routes = std::make_shared<Routes>(Routes{serving_, options_});
  using Handler = std::function<void(const httplib::Request&, httplib::Response&)>;
  auto route = [this](Handler h) -> httplib::Server::Handler {
    return [this, h = std::move(h)](const httplib::Request& req, httplib::Response& res) {
      if (options_.fault_hook) options_.fault_hook(req.path);
      h(req, res);
    };
  };
  s.Get("/health", route([routes](const auto&, auto& res) { routes->Health(res); }));
  s.Get("/metrics", route([this](const auto&, auto& res) {
          res.set_content(serving_.metrics() ? serving_.metrics()->Render() : "",
                          Metrics::kContentType);
        }));
  s.Get("/", route([](const auto&, auto& res) {
          res.set_content(PlaygroundHtml(), "text/html; charset=utf-8");
        }));
  s.Get("/v1/amoeba/shapes",
        route([routes](const auto& req, auto& res) { routes->Shapes(req, res); }));
  s.Get("/v1/models", route([routes](const auto& req, auto& res) { routes->Models(req, res); }));
  s.Post("/v1/completions",
         route([routes](const auto& req, auto& res) { routes->Generate(req, res, false); }));
  s.Post("/v1/chat/completions",
         route([routes](const auto& req, auto& res) { routes->Generate(req, res, true); }));
  s.Post("/v1/amoeba/export",
         route([routes](const auto& req, auto& res) { routes->Export(req, res); }));
  port_ = options_.port == 0 ? s.bind_to_any_port(options_.host)
                             : (s.bind_to_port(options_.host, options_.port) ? options_.port : -1);
  if (port_ <= 0)
    return absl::UnavailableError(
        absl::StrCat("http: cannot listen on ", options_.host, ":", options_.port));
  thread_ = std::thread([this] { server_->listen_after_bind(); });
  return absl::OkStatus();
}

}  // namespace amoeba
