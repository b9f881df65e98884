#include "server/http_frontend.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <deque>
#include <future>
#include <limits>
#include <mutex>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "browser_guard.h"
#include "http_server.h"
#include "http_status.h"
#include "model/errors.h"
#include "model/status_macros.h"
#include "openai_request.h"
#include "openai_response.h"
#include "server/metrics.h"
#include "server/request_checks.h"
#include "server/tool_calls.h"
#include "tar_stream.h"

namespace amoeba {

const char* PlaygroundHtml();  // playground_page.cc, generated from playground.html

namespace {
using nlohmann::json;

enum class RouteKind {
  kPlayground,
  kHealth,
  kMetrics,
  kModels,
  kShapes,
  kCompletions,
  kChat,
  kExport,
  kTokenize,
  kDetokenize
};

struct Route {
  const char* path;
  bool post;  // POST with a JSON body; otherwise GET (and HEAD)
  RouteKind kind;
};

// Every route the server has. /metrics counts requests under these paths only ("other" for the
// rest), so a client cannot grow the label set. Under --auth-all every one needs the token but
// /health, which probes must reach, and the playground's page: static HTML with no server data
// (a browser sends no bearer token on navigation; the page's own calls carry the one typed in).
constexpr Route kRoutes[] = {{"/", false, RouteKind::kPlayground},
                             {"/health", false, RouteKind::kHealth},
                             {"/metrics", false, RouteKind::kMetrics},
                             {"/v1/models", false, RouteKind::kModels},
                             {"/v1/completions", true, RouteKind::kCompletions},
                             {"/v1/chat/completions", true, RouteKind::kChat},
                             {"/v1/amoeba/shapes", false, RouteKind::kShapes},
                             {"/v1/amoeba/export", true, RouteKind::kExport},
                             {"/tokenize", true, RouteKind::kTokenize},
                             {"/detokenize", true, RouteKind::kDetokenize}};

const Route* FindRoute(const std::string& path) {
  for (const Route& r : kRoutes)
    if (path == r.path) return &r;
  return nullptr;
}

std::string_view RouteLabel(const std::string& path) {
  const Route* r = FindRoute(path);
  return r ? std::string_view(r->path) : std::string_view("other");
}

RequestContext ContextOf(const HttpRequest& req) {
  RequestContext c;
  c.authorization = req.Header("Authorization");
  return c;
}

int64_t UnixSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string Event(const json& j) {
  return "data: " + j.dump() + "\n\n";
}

// A request body that must be a JSON object ("" reads as {}).
absl::StatusOr<json> ParseJsonObject(const std::string& body) {
  json j = json::parse(body.empty() ? "{}" : body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return InvalidField("body", "not a JSON object");
  return j;
}

HttpReply JsonReply(const json& body, HttpHeaders headers = {}) {
  HttpReply r;
  r.body = body.dump();
  r.headers = std::move(headers);
  return r;
}

HttpReply WithHeaders(HttpReply r, const HttpHeaders& extra) {
  r.headers.insert(r.headers.end(), extra.begin(), extra.end());
  return r;
}

// A streamed response's events in order: those the scheduler makes before the stream has begun
// (the core's Start must succeed first, or the client gets its error status) wait here.
struct StreamOrder {
  std::mutex mu;
  bool begun = false;
  bool ended = false;  // the last event is among `early`
  std::deque<std::string> early;
};

}  // namespace

struct HttpFrontend::Routes {
  Serving& serving;
  const HttpOptions& options;
  ModelNames names{options.aliases};

  // After the head, before the body: the route, the method, the Host, the Origin, the token
  // and the content type. Nothing of the body is read (or held) for a request refused here.
  std::optional<HttpReply> Admit(const HttpRequest& req) const {
    const Route* route = FindRoute(req.path);
    if (!route)
      return ErrorReply(absl::NotFoundError(absl::StrCat("no route ", LogSafe(req.path, 80))));
    if (auto bad = CheckHost(req, options.allowed_hosts)) return bad;
    const OriginVerdict origin = CheckOrigin(req, options.allowed_origins);
    const char* methods = route->post ? "POST, OPTIONS" : "GET, HEAD, OPTIONS";
    if (req.method == "OPTIONS") return Preflight(req, origin, methods);
    if (origin.refused)
      return TransportErrorReply(
          403, "cross-origin requests from this origin are not allowed (--allowed-origins)");
    const bool method_ok =
        route->post ? req.method == "POST" : (req.method == "GET" || req.method == "HEAD");
    if (!method_ok) {
      HttpReply r = TransportErrorReply(
          405, absl::StrCat(LogSafe(req.method, 20), " is not allowed on ", route->path));
      r.headers.emplace_back("Allow", methods);
      return r;
    }
    if (route->kind != RouteKind::kHealth && route->kind != RouteKind::kPlayground) {
      const absl::Status auth =
          serving.CheckAuth(ContextOf(req), route->kind == RouteKind::kExport);
      if (!auth.ok()) return WithHeaders(ErrorReply(auth), origin.cors);
    }
    if (route->post) {
      const auto type = req.Header("Content-Type");
      const bool has_body = req.chunked || req.content_length.value_or(0) > 0;
      if ((type || has_body) && !IsJsonContentType(type.value_or("")))
        return WithHeaders(TransportErrorReply(415, "Content-Type must be application/json"),
                           origin.cors);
    }
    return std::nullopt;
  }

  void Handle(HttpRequest&& req, const std::shared_ptr<HttpExchange>& ex) const {
    if (options.fault_hook) options.fault_hook(req.path);
    const Route* route = FindRoute(req.path);
    const HttpHeaders cors = CheckOrigin(req, options.allowed_origins).cors;
    switch (route->kind) {
      case RouteKind::kPlayground: {
        HttpReply r;
        r.content_type = "text/html; charset=utf-8";
        r.body = PlaygroundHtml();
        r.headers = PlaygroundHeaders();
        return ex->Reply(std::move(r));
      }
      case RouteKind::kHealth: {
        const bool draining = serving.draining();
        HttpReply r = JsonReply(json{{"status", draining ? "NOT_SERVING" : "SERVING"}}, cors);
        r.status = draining ? 503 : 200;
        return ex->Reply(std::move(r));
      }
      case RouteKind::kMetrics: {
        HttpReply r;
        r.content_type = Metrics::kContentType;
        r.body = serving.metrics() ? serving.metrics()->Render() : "";
        r.headers = cors;
        return ex->Reply(std::move(r));
      }
      case RouteKind::kModels:
        return ex->Reply(Models(req, cors));
      case RouteKind::kShapes:
        return ex->Reply(Shapes(req, cors));
      case RouteKind::kCompletions:
      case RouteKind::kChat:
        return Generate(req, ex, route->kind == RouteKind::kChat, cors);
      case RouteKind::kExport:
        return Export(req, ex, cors);
      case RouteKind::kTokenize:
        return ex->Reply(Tokenize(req, cors));
      case RouteKind::kDetokenize:
        return ex->Reply(Detokenize(req, cors));
    }
  }

  // POST /tokenize {"content": text, "add_special": true, "with_pieces": false}, as llama.cpp's
  // server takes it: {"tokens": [ids]} or, with pieces, [{"id", "piece"}].
  HttpReply Tokenize(const HttpRequest& req, const HttpHeaders& cors) const {
    auto fail = [&](const absl::Status& st) { return WithHeaders(ErrorReply(st), cors); };
    auto parsed = ParseJsonObject(req.body);
    if (!parsed.ok()) return fail(parsed.status());
    const json& j = *parsed;
    TokenizeRequest r;
    r.request_id = req.Header("X-Request-Id").value_or("");
    bool pieces = false;
    for (const auto& [k, v] : j.items()) {
      if (k == "content") {
        if (!v.is_string()) return fail(InvalidField(k, "must be a string"));
        r.text = v.get<std::string>();
      } else if (k == "add_special" || k == "with_pieces") {
        if (!v.is_boolean()) return fail(InvalidField(k, "must be true or false"));
        (k == "add_special" ? r.add_bos : pieces) = v.get<bool>();
      } else {
        return fail(InvalidField(k, "not supported by this server"));
      }
    }
    if (!j.contains("content")) return fail(InvalidField("content", "required"));
    auto out = serving.Tokenize(r, ContextOf(req));
    if (!out.ok()) return fail(out.status());
    json tokens = json::array();
    for (size_t i = 0; i < out->ids.size(); ++i) {
      if (pieces)
        tokens.push_back({{"id", out->ids[i]}, {"piece", out->pieces[i]}});
      else
        tokens.push_back(out->ids[i]);
    }
    return JsonReply(json{{"tokens", tokens}}, cors);
  }

  // POST /detokenize {"tokens": [ids]} -> {"content": text}.
  HttpReply Detokenize(const HttpRequest& req, const HttpHeaders& cors) const {
    auto fail = [&](const absl::Status& st) { return WithHeaders(ErrorReply(st), cors); };
    auto parsed = ParseJsonObject(req.body);
    if (!parsed.ok()) return fail(parsed.status());
    const json& j = *parsed;
    for (const auto& [k, v] : j.items())
      if (k != "tokens") return fail(InvalidField(k, "not supported by this server"));
    if (!j.contains("tokens") || !j["tokens"].is_array())
      return fail(InvalidField("tokens", "required: a list of token ids"));
    DetokenizeRequest r;
    r.request_id = req.Header("X-Request-Id").value_or("");
    for (const json& t : j["tokens"]) {
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX)
        return fail(InvalidField("tokens", "token ids must be non-negative integers"));
      r.ids.push_back(static_cast<int32_t>(t.get<int64_t>()));
    }
    auto text = serving.Detokenize(r, ContextOf(req));
    if (!text.ok()) return fail(text.status());
    return JsonReply(json{{"content", *text}}, cors);
  }

  // What a shape is: size, the planner's latency and quality estimates, and where each comes from.
  static json Estimate(const ShapeEstimateResult& e) {
    return {{"shape", {{"depth", e.profile.shape.depth}, {"width", e.profile.shape.width}}},
            {"params", e.profile.params},
            {"weight_bytes", e.profile.weight_bytes},
            {"decode_ms_per_token", e.decode_ms},
            {"quality", e.quality},
            {"quality_source", e.quality_source},
            {"latency_source", e.latency_source}};
  }

  // Every shape with the planner's estimates (the playground's grid and frontier).
  HttpReply Shapes(const HttpRequest& req, const HttpHeaders& cors) const {
    auto shapes = serving.Shapes(ContextOf(req));
    if (!shapes.ok()) return WithHeaders(ErrorReply(shapes.status()), cors);
    json out = json::array();
    for (const auto& e : *shapes) out.push_back(Estimate(e));
    return JsonReply(json{{"shapes", out}}, cors);
  }

  // OpenAI's model list: every grid shape, "full", "smallest" and the aliases; each entry's
  // "amoeba" says what the shape is (Estimate).
  HttpReply Models(const HttpRequest& req, const HttpHeaders& cors) const {
    auto shapes = serving.Shapes(ContextOf(req));
    if (!shapes.ok()) return WithHeaders(ErrorReply(shapes.status()), cors);
    json data = json::array();
    const int64_t created = UnixSeconds();
    auto add = [&](const std::string& id, const Shape& sh) {
      json about = {{"shape", {{"depth", sh.depth}, {"width", sh.width}}}};
      for (const auto& e : *shapes)
        if (e.profile.shape == sh) about = Estimate(e);
      data.push_back({{"id", id},
                      {"object", "model"},
                      {"created", created},
                      {"owned_by", "amoeba"},
                      {"amoeba", std::move(about)}});
    };
    const ModelInfo& m = serving.info();
    for (const Shape& sh : m.grid) add(ModelId(sh), sh);
    add("full", m.full);
    add("smallest", m.smallest);
    for (const auto& [name, sh] : names.aliases) add(name, sh);
    return JsonReply(json{{"object", "list"}, {"data", data}}, cors);
  }

  void Generate(const HttpRequest& req, const std::shared_ptr<HttpExchange>& ex, bool chat,
                const HttpHeaders& cors) const {
    auto fail = [&](const absl::Status& st) { ex->Reply(WithHeaders(ErrorReply(st), cors)); };
    const RequestContext ctx = ContextOf(req);
    auto call = ParseOpenAiCall(serving, names, options.chat_format, req.body, chat);
    if (!call.ok()) return fail(call.status());
    call->req.request_id = req.Header("X-Request-Id").value_or("");
    auto g = serving.Prepare(call->req, ctx);
    if (!g.ok()) return fail(g.status());
    OpenAiResponseHead head;
    head.id = absl::StrCat(chat ? "chatcmpl-" : "cmpl-", (*g)->request_id());
    head.created = UnixSeconds();
    head.chat = chat;
    head.logprobs = call->req.logprobs.has_value();
    head.tool_calls = call->tool_calls;
    if (call->echo) {
      head.echo = true;
      head.first_prompt_token = (*g)->prompt().front();
      head.echo_text = call->echo_text;
      if (!call->req.text) {  // token ids: their text
        DetokenizeRequest d;
        d.ids = (*g)->prompt();
        auto text = serving.Detokenize(d, ctx);
        if (!text.ok()) return fail(text.status());
        head.echo_text = *text;
      }
    }
    head.shape = (*g)->shape();
    head.load_plan = (*g)->load_plan();
    head.model = call->model.empty() ? ModelId(head.shape) : call->model;
    HttpHeaders headers = cors;
    headers.emplace_back("X-Request-Id", (*g)->request_id());
    // n choices: n sequences of the same prompt (the prompt cache lets the first prefill it and
    // the others take its blocks), "<id>.<i>" in the log, choice i drawing with seed + i.
    std::vector<std::shared_ptr<Generation>> gens = {*g};
    for (int i = 1; i < call->n; ++i) {
      GenerationRequest ri = call->req;
      ri.request_id = absl::StrCat((*g)->request_id(), ".", i);
      ri.seed = call->req.seed.value_or(0) + static_cast<uint64_t>(i);
      auto gi = serving.Prepare(ri, ctx);
      if (!gi.ok()) return fail(gi.status());
      gens.push_back(*gi);
    }
    // Disconnect = cancel: the transport notices a client that leaves at once; the scheduler
    // stops the sequences at their next step.
    ex->OnClose([gens] {
      for (const auto& x : gens) x->Cancel();
    });
    if (call->stream)
      Stream(gens, head, ex, std::move(headers));
    else
      Whole(gens, head, ex, std::move(headers));
  }

  // The usage of n choices: the prompt once, the completions summed.
  static JobResult Combined(const std::vector<JobResult>& results) {
    JobResult r = results.front();
    for (size_t i = 1; i < results.size(); ++i) r.completion_tokens += results[i].completion_tokens;
    return r;
  }

  void Whole(const std::vector<std::shared_ptr<Generation>>& gens, const OpenAiResponseHead& head,
             const std::shared_ptr<HttpExchange>& ex, HttpHeaders headers) const {
    struct Choices {
      std::mutex mu;
      std::vector<std::string> texts;
      // Echo: the prompt's tokens first (the first one predicted by nothing), then the new ones.
      std::vector<std::vector<TokenLogprobs>> logprobs;
      std::vector<JobResult> results;
      size_t left = 0;
    };
    auto all = std::make_shared<Choices>();
    const size_t n = gens.size();
    all->texts.assign(n, head.echo ? head.echo_text : std::string());
    all->logprobs.resize(n);
    all->results.resize(n);
    all->left = n;
    if (head.echo && head.logprobs)
      for (auto& l : all->logprobs) l.push_back(FirstPromptToken(head));
    auto callbacks = [s = &serving, all, head, ex, headers](int i) {
      GenerationCallbacks cb;
      cb.on_token = [all, i](int32_t, std::string_view t) { all->texts[i].append(t); };
      if (head.logprobs) {
        cb.on_logprobs = [all, i](const TokenLogprobs& lp) { all->logprobs[i].push_back(lp); };
        if (head.echo)
          cb.on_prompt_logprobs = [all, i](const TokenLogprobs& lp) {
            all->logprobs[i].push_back(lp);
          };
      }
      cb.on_done = [s, all, i, head, ex, headers](const JobResult& r) {
        std::lock_guard<std::mutex> l(all->mu);
        all->results[i] = r;
        if (--all->left > 0) return;  // the last choice to finish replies
        json choices = json::array();
        for (size_t k = 0; k < all->results.size(); ++k) {
          if (absl::Status st = FinishError(all->results[k]); !st.ok())
            return ex->Reply(WithHeaders(ErrorReply(st), headers));
          int64_t offset = 0;
          const json lp =
              head.logprobs ? Logprobs(*s, head, all->logprobs[k], &offset) : json(nullptr);
          choices.push_back(
              CompletionChoice(head, static_cast<int>(k), all->texts[k], all->results[k], lp));
        }
        ex->Reply(
            JsonReply(CompletionBody(head, std::move(choices), Combined(all->results)), headers));
      };
      return cb;
    };
    // All or none (one request against the queue's bound): on an error no callback runs.
    if (absl::Status st = serving.StartAll(gens, callbacks); !st.ok())
      ex->Reply(WithHeaders(ErrorReply(st), headers));
  }

  // Echo's first prompt token: nothing predicts it (null logprob).
  static TokenLogprobs FirstPromptToken(const OpenAiResponseHead& head) {
    TokenLogprobs first;
    first.token = head.first_prompt_token;
    first.logprob = std::numeric_limits<float>::quiet_NaN();
    return first;
  }

  // The serving core outlives every generation's callbacks (its own wrap them); this front end
  // need not, so they reach the tokenizer through the core.
  static json Logprobs(const Serving& s, const OpenAiResponseHead& head,
                       const std::vector<TokenLogprobs>& tokens, int64_t* text_offset) {
    return LogprobsBody(
        head.chat, tokens, [&s](int32_t id) { return s.TokenPiece(id); },
        [&s](int32_t id) -> const std::string& { return s.TokenBytes(id); }, text_offset);
  }

  // Server-sent events: one chunk per text delta, the finish reason, [DONE]; with n choices each
  // chunk names its choice, each choice ends with its finish reason, and one last chunk carries
  // the usage. A client that stops reading is closed (and its generations cancelled) once the
  // transport's buffer bound is hit.
  void Stream(const std::vector<std::shared_ptr<Generation>>& gens, const OpenAiResponseHead& head,
              const std::shared_ptr<HttpExchange>& ex, HttpHeaders headers) const {
    auto order = std::make_shared<StreamOrder>();
    // A write the transport refuses (the client left, or is too far behind) closes the
    // connection, and the exchange's on_close cancels the generations.
    auto emit = [order, ex](std::string e, bool last) {
      std::lock_guard<std::mutex> l(order->mu);
      if (!order->begun) {
        order->early.push_back(std::move(e));
        order->ended = order->ended || last;
        return;
      }
      ex->Write(std::move(e));
      if (last) ex->End();
    };
    // Per choice: log-probabilities ride with the chunk of their token's text (the scheduler
    // thread calls these in order; tokens whose text is held back go with the next chunk, or the
    // last). Echo: the prompt's text is the choice's first chunk, with its tokens'
    // log-probabilities (they all arrive before the first new token).
    struct HeldReply {
      std::string text;
      bool released = false;
    };
    struct PendingLogprobs {
      std::vector<TokenLogprobs> tokens;
      int64_t text_offset = 0;
      bool echoed = false;
    };
    struct Choices {
      std::mutex mu;
      std::vector<JobResult> results;
      size_t left = 0;
      absl::Status error;
    };
    const int n = static_cast<int>(gens.size());
    auto all = std::make_shared<Choices>();
    all->results.resize(gens.size());
    all->left = gens.size();
    auto callbacks = [s = &serving, emit, head, all, n](int i) {
      auto pending = std::make_shared<PendingLogprobs>();
      if (head.echo && head.logprobs) pending->tokens.push_back(FirstPromptToken(head));
      auto take = [s, head, pending]() -> json {
        if (!head.logprobs) return nullptr;
        json lp = Logprobs(*s, head, pending->tokens, &pending->text_offset);
        pending->tokens.clear();
        return lp;
      };
      auto echo_first = [emit, head, pending, take, i] {
        if (!head.echo || pending->echoed) return;
        pending->echoed = true;
        emit(Event(ChunkBody(head, json(head.echo_text), nullptr, take(), i)), false);
      };
      GenerationCallbacks cb;
      if (head.logprobs) {
        // The first new token's log-probability comes before its text: the echo goes out first.
        cb.on_logprobs = [pending, echo_first](const TokenLogprobs& lp) {
          echo_first();
          pending->tokens.push_back(lp);
        };
        if (head.echo)
          cb.on_prompt_logprobs = [pending](const TokenLogprobs& lp) {
            pending->tokens.push_back(lp);
          };
      }
      // With tools, a reply that may still become calls is held back: calls go out whole, as one
      // tool_calls delta, when the reply is complete; text is released once it cannot be calls.
      auto held = std::make_shared<HeldReply>();
      auto content = [emit, head, take, i](const std::string& t) {
        const json d = head.chat ? json{{"content", t}} : json(t);
        emit(Event(ChunkBody(head, d, nullptr, take(), i)), false);
      };
      cb.on_token = [content, head, echo_first, held](int32_t, std::string_view t) {
        if (t.empty()) return;
        echo_first();
        if (head.tool_calls && !held->released) {
          held->text.append(t);
          if (MayBeToolCalls(held->text)) return;
          held->released = true;
          content(std::exchange(held->text, std::string()));
          return;
        }
        content(std::string(t));
      };
      cb.on_done = [emit, head, take, echo_first, all, i, n, held, content](const JobResult& r) {
        const absl::Status error = FinishError(r);
        if (error.ok()) echo_first();
        const char* finish = nullptr;
        if (error.ok() && !held->released && !held->text.empty()) {
          const json calls = ToolCallsJson(head, i, held->text, /*delta=*/true);
          if (calls.is_null()) {
            content(held->text);
          } else {
            emit(Event(ChunkBody(head, json{{"tool_calls", calls}}, nullptr, take(), i)), false);
            if (r.reason == FinishReason::kEos || r.reason == FinishReason::kStopSequence)
              finish = "tool_calls";
          }
        }
        if (n == 1) {
          emit((error.ok() ? Event(LastChunkBody(head, r, take(), finish))
                           : Event(ErrorBody(error))) +
                   "data: [DONE]\n\n",
               true);
          return;
        }
        std::lock_guard<std::mutex> l(all->mu);
        all->results[i] = r;
        if (!error.ok() && all->error.ok()) all->error = error;
        if (error.ok()) {
          const json reason = finish ? finish : OpenAiFinish(r.reason);
          emit(Event(ChunkBody(head, head.chat ? json::object() : json(""), reason, take(), i)),
               false);
        }
        if (--all->left > 0) return;
        emit((all->error.ok() ? Event(UsageChunkBody(head, Combined(all->results)))
                              : Event(ErrorBody(all->error))) +
                 "data: [DONE]\n\n",
             true);
      };
      return cb;
    };
    if (absl::Status st = serving.StartAll(gens, callbacks); !st.ok())
      return ex->Reply(WithHeaders(ErrorReply(st), headers));
    headers.emplace_back("Cache-Control", "no-cache");
    std::lock_guard<std::mutex> l(order->mu);
    ex->BeginStream(200, "text/event-stream", std::move(headers));
    if (head.chat)
      for (int i = 0; i < n; ++i)
        ex->Write(Event(ChunkBody(head, json{{"role", "assistant"}}, nullptr, nullptr, i)));
    for (std::string& e : order->early) ex->Write(std::move(e));
    order->early.clear();
    order->begun = true;
    if (order->ended) ex->End();
  }

  // POST /v1/amoeba/export {"shape": "depth=D,width=W" | {"depth", "width"}, "format", "dtype",
  // "uniform_width", "no_adapters"}: the export's files as a tar stream, then SHA256SUMS. The
  // export worker that staged it streams it, one chunk in flight at a time.
  void Export(const HttpRequest& req, const std::shared_ptr<HttpExchange>& ex,
              const HttpHeaders& cors) const {
    auto r = ParseExport(req.body);
    if (!r.ok()) return ex->Reply(WithHeaders(ErrorReply(r.status()), cors));
    // The id first: the export worker may call back before StartExport returns.
    auto id = serving.AssignRequestId(req.Header("X-Request-Id").value_or(""));
    if (!id.ok()) return ex->Reply(WithHeaders(ErrorReply(id.status()), cors));
    r->request_id = *id;
    auto cancelled = std::make_shared<std::atomic<bool>>(false);
    ex->OnClose([cancelled] { *cancelled = true; });
    auto started =
        serving.StartExport(*r, ContextOf(req), cancelled,
                            [ex, cors, id = *id](absl::StatusOr<std::unique_ptr<ExportStream>> s) {
                              if (!s.ok())
                                return ex->Reply(WithHeaders(ErrorReply(s.status()), cors));
                              HttpHeaders headers = cors;
                              headers.emplace_back("X-Request-Id", id);
                              ex->BeginStream(200, "application/x-tar", std::move(headers));
                              StreamExport(**s, *ex);
                            });
    if (!started.ok()) ex->Reply(WithHeaders(ErrorReply(started.status()), cors));
  }

  static void StreamExport(ExportStream& files, HttpExchange& ex) {
    std::string sums;
    const int64_t mtime = UnixSeconds();
    while (!ex.closed()) {
      ExportChunk c;
      auto more = files.Next(c);
      if (!more.ok()) return ex.Abort();  // the client sees a cut archive; the log says why
      std::string out;
      if (!*more) {
        out =
            TarHeader("SHA256SUMS", sums.size(), mtime) + sums + TarPadding(sums.size()) + TarEnd();
        ex.Write(std::move(out));
        return ex.End();
      }
      if (c.offset == 0) out = TarHeader(c.path, c.total_size, mtime);
      out += c.data;
      if (c.last_chunk) {
        out += TarPadding(c.total_size);
        absl::StrAppend(&sums, c.sha256, "  ", c.path, "\n");
      }
      auto sent = std::make_shared<std::promise<void>>();
      auto written = sent->get_future();
      if (!ex.Write(std::move(out), [sent] { sent->set_value(); })) return;
      while (written.wait_for(std::chrono::milliseconds(100)) != std::future_status::ready)
        if (ex.closed()) return;
    }
  }

  static absl::StatusOr<ExportRequest> ParseExport(const std::string& body) {
    ASSIGN_OR_RETURN(const json j, ParseJsonObject(body));
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

int HttpFrontend::port() const {
  return server_ ? server_->port() : 0;
}

void HttpFrontend::BeginShutdown() {
  if (server_) server_->BeginShutdown();
}

void HttpFrontend::Stop() {
  if (server_) server_->Stop();
}

absl::Status HttpFrontend::Start() {
  routes_ = std::make_shared<Routes>(Routes{serving_, options_});
  HttpServerOptions o;
  o.host = options_.host;
  o.port = options_.port;
  o.tls_cert = options_.tls_cert;
  o.tls_key = options_.tls_key;
  o.limits = options_.limits;
  o.name = "http";
  HttpHandlers h;
  h.admit = [routes = routes_](const HttpRequest& head) { return routes->Admit(head); };
  h.handle = [routes = routes_](HttpRequest&& req, std::shared_ptr<HttpExchange> ex) {
    routes->Handle(std::move(req), ex);
  };
  h.error = [](int status, std::string message) { return TransportErrorReply(status, message); };
  Metrics* metrics = serving_.metrics();
  h.on_response = [metrics](const HttpRequest& head, int status) {
    if (metrics) metrics->ObserveHttp(RouteLabel(head.path), status);
  };
  server_ = std::make_unique<HttpServer>(std::move(o), std::move(h));
  return server_->Start();
}

}  // namespace amoeba
