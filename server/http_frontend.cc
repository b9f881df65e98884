#include "server/http_frontend.h"

#include <httplib.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <future>
#include <mutex>
#include <set>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "model/status_macros.h"
#include "server/request_checks.h"

namespace amoeba {

const char* PlaygroundHtml();  // playground_page.cc, generated from playground.html

namespace {

// The "amoeba" extension of a response: the shape, and what drafting did when a draft was used.
nlohmann::json WithSpeculation(nlohmann::json amoeba, const JobResult& r) {
  if (r.draft)
    amoeba["speculation"] = {{"draft", {{"depth", r.draft->depth}, {"width", r.draft->width}}},
                             {"drafted_tokens", r.drafted_tokens},
                             {"accepted_tokens", r.accepted_tokens},
                             {"checks", r.draft_rounds}};
  return amoeba;
}
using nlohmann::json;

int HttpStatusFor(absl::StatusCode c) {
  switch (c) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
      return 400;
    case absl::StatusCode::kUnauthenticated:
      return 401;
    case absl::StatusCode::kPermissionDenied:
      return 403;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kUnavailable:
      return 503;
    case absl::StatusCode::kDeadlineExceeded:
      return 504;
    case absl::StatusCode::kUnimplemented:
      return 501;
    default:
      return 500;
  }
}

// The OpenAI error shape: {"error": {"message", "type", "param", "code"}}.
json ErrorBody(const absl::Status& s) {
  const int status = HttpStatusFor(s.code());
  return {{"error",
           {{"message", BoundedMessage(std::string_view(s.message().data(), s.message().size()))},
            {"type", status >= 500 ? "server_error" : "invalid_request_error"},
            {"param", nullptr},
            {"code", absl::StatusCodeToString(s.code())}}}};
}

void SendError(httplib::Response& res, const absl::Status& s) {
  res.status = HttpStatusFor(s.code());
  res.set_content(ErrorBody(s).dump(), "application/json");
}

const char* OpenAiFinish(FinishReason r) {
  switch (r) {
    case FinishReason::kEos:
    case FinishReason::kStopSequence:
      return "stop";
    default:
      return "length";
  }
}

// Options a client may send: the OpenAI fields we implement, the ones accepted only at their
// neutral value, and our extensions. Anything else is a 400 naming it, never silently ignored.
const std::set<std::string>& KnownFields(bool chat) {
  static const std::set<std::string> completion = {"model",
                                                   "prompt",
                                                   "max_tokens",
                                                   "temperature",
                                                   "top_p",
                                                   "stop",
                                                   "seed",
                                                   "stream",
                                                   "n",
                                                   "echo",
                                                   "best_of",
                                                   "logprobs",
                                                   "presence_penalty",
                                                   "frequency_penalty",
                                                   "logit_bias",
                                                   "user",
                                                   "stream_options",
                                                   "top_k",
                                                   "repetition_penalty",
                                                   "amoeba"};
  static const std::set<std::string> chatc = {"model",
                                              "messages",
                                              "max_tokens",
                                              "max_completion_tokens",
                                              "temperature",
                                              "top_p",
                                              "stop",
                                              "seed",
                                              "stream",
                                              "n",
                                              "logprobs",
                                              "presence_penalty",
                                              "frequency_penalty",
                                              "logit_bias",
                                              "user",
                                              "stream_options",
                                              "top_k",
                                              "repetition_penalty",
                                              "amoeba"};
  return chat ? chatc : completion;
}

template <typename T>
absl::StatusOr<std::optional<T>> Optional(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::optional<T>();
  try {
    if constexpr (std::is_same_v<T, bool>) {
      if (!it->is_boolean()) return InvalidField(key, "must be true or false");
    } else if constexpr (std::is_arithmetic_v<T>) {
      if (!it->is_number()) return InvalidField(key, "must be a number");
      if constexpr (std::is_integral_v<T>) {
        if (!it->is_number_integer()) return InvalidField(key, "must be an integer");
      }
    } else {
      if (!it->is_string()) return InvalidField(key, "must be a string");
    }
    return std::optional<T>(it->get<T>());
  } catch (const json::exception&) {
    return InvalidField(key, "out of range");
  }
}

absl::StatusOr<PlanBudget> BudgetFromJson(const json& b) {
  if (!b.is_object()) return InvalidField("amoeba.budget", "must be an object");
  PlanBudget p;
  for (auto& [k, v] : b.items()) {
    if (k == "platform") continue;
    static const std::set<std::string> known = {
        "max_params",     "max_memory_bytes", "max_decode_ms_per_token",
        "max_prefill_ms", "prompt_tokens",    "max_context_tokens"};
    if (!known.count(k)) return InvalidField("amoeba.budget." + k, "unknown field");
    if (!v.is_number()) return InvalidField("amoeba.budget." + k, "must be a number");
  }
  try {
    if (b.contains("max_params")) p.max_params = b["max_params"].get<int64_t>();
    if (b.contains("max_memory_bytes")) p.max_memory_bytes = b["max_memory_bytes"].get<int64_t>();
    if (b.contains("max_decode_ms_per_token"))
      p.max_decode_ms_per_token = b["max_decode_ms_per_token"].get<double>();
    if (b.contains("max_prefill_ms")) p.max_prefill_ms = b["max_prefill_ms"].get<double>();
    if (b.contains("prompt_tokens")) p.prompt_tokens = b["prompt_tokens"].get<int32_t>();
    if (b.contains("max_context_tokens"))
      p.max_context_tokens = b["max_context_tokens"].get<int32_t>();
    if (b.contains("platform")) {
      const json& pl = b["platform"];
      if (!pl.is_object()) return InvalidField("amoeba.budget.platform", "must be an object");
      if (pl.contains("memory_bandwidth_gbs"))
        p.bandwidth_gbs = pl["memory_bandwidth_gbs"].get<double>();
      if (pl.contains("compute_gflops")) p.compute_gflops = pl["compute_gflops"].get<double>();
      if (pl.contains("memory_bytes")) p.platform_memory_bytes = pl["memory_bytes"].get<int64_t>();
    }
  } catch (const json::exception&) {
    return InvalidField("amoeba.budget", "a field has the wrong type or is out of range");
  }
  return p;
}

// What the handler needs besides the GenerationRequest.
struct HttpCall {
  GenerationRequest req;
  bool chat = false, stream = false;
  std::string model;  // as echoed in responses
};

absl::StatusOr<HttpCall> ParseCall(const Serving& serving, const HttpOptions& o,
                                   const std::string& body, bool chat) {
  json j = json::parse(body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return InvalidField("body", "not a JSON object");
  for (auto& [k, v] : j.items())
    if (!KnownFields(chat).count(k)) return InvalidField(k, "not supported by this server");
  HttpCall c;
  c.chat = chat;
  // Accepted only at their neutral values.
  ASSIGN_OR_RETURN(auto n, Optional<int64_t>(j, "n"));
  if (n && *n != 1) return InvalidField("n", "only 1 is supported");
  ASSIGN_OR_RETURN(auto best_of, Optional<int64_t>(j, "best_of"));
  if (best_of && *best_of != 1) return InvalidField("best_of", "only 1 is supported");
  for (const char* k : {"presence_penalty", "frequency_penalty"}) {
    ASSIGN_OR_RETURN(auto pen, Optional<double>(j, k));
    if (pen && *pen != 0) return InvalidField(k, "not supported (use repetition_penalty)");
  }
  if (j.contains("echo") && j["echo"] != false) return InvalidField("echo", "not supported");
  if (j.contains("logprobs") && !j["logprobs"].is_null() && j["logprobs"] != false)
    return InvalidField("logprobs", "not supported");
  if (j.contains("logit_bias") && !j["logit_bias"].is_null() &&
      !(j["logit_bias"].is_object() && j["logit_bias"].empty()))
    return InvalidField("logit_bias", "not supported");

  GenerationRequest& r = c.req;
  // The target: a model name, or a budget for the planner.
  if (j.contains("amoeba")) {
    const json& a = j["amoeba"];
    if (!a.is_object()) return InvalidField("amoeba", "must be an object");
    for (auto& [k, v] : a.items())
      if (k != "budget" && k != "speculate" && k != "draft_tokens")
        return InvalidField("amoeba." + k, "unknown field");
    if (a.contains("budget")) {
      ASSIGN_OR_RETURN(auto b, BudgetFromJson(a["budget"]));
      r.budget = b;
    }
    if (a.contains("speculate")) {
      if (!a["speculate"].is_string())
        return InvalidField("amoeba.speculate", "must be \"auto\", \"off\" or a draft shape");
      r.speculate = a["speculate"].get<std::string>();
    }
    if (a.contains("draft_tokens")) {
      if (!a["draft_tokens"].is_number_integer())
        return InvalidField("amoeba.draft_tokens", "must be an integer");
      r.draft_tokens = a["draft_tokens"].get<int64_t>();
    }
  }
  ASSIGN_OR_RETURN(auto model, Optional<std::string>(j, "model"));
  c.model = model.value_or("");
  if (!r.budget) {
    if (c.model.empty()) return InvalidField("model", "required (or amoeba.budget)");
    ASSIGN_OR_RETURN(auto shape, ShapeForModel(serving.supernet(), o.aliases, c.model));
    r.shape = shape;
  }
  // The prompt.
  if (chat) {
    if (!j.contains("messages") || !j["messages"].is_array())
      return InvalidField("messages", "required: a list of {role, content}");
    std::vector<ChatMessage> msgs;
    for (size_t i = 0; i < j["messages"].size(); ++i) {
      const json& m = j["messages"][i];
      const std::string where = absl::StrCat("messages[", i, "]");
      if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
        return InvalidField(where, "needs a string role");
      if (!m.contains("content") || !m["content"].is_string())
        return InvalidField(where + ".content",
                            "must be a string (content parts are not supported)");
      msgs.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
    }
    ASSIGN_OR_RETURN(auto text, RenderChat(o.chat_template, msgs));
    r.text = text;
  } else {
    if (!j.contains("prompt")) return InvalidField("prompt", "required");
    const json& p = j["prompt"];
    if (p.is_string()) {
      r.text = p.get<std::string>();
    } else if (p.is_array() && p.size() == 1 && p[0].is_string()) {
      r.text = p[0].get<std::string>();
    } else if (p.is_array() && !p.empty() && p[0].is_number_integer()) {
      std::vector<int32_t> ids;
      for (const auto& t : p) {
        if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX)
          return InvalidField("prompt", "token ids must be non-negative integers");
        ids.push_back(static_cast<int32_t>(t.get<int64_t>()));
      }
      r.tokens = std::move(ids);
    } else {
      return InvalidField("prompt", "a string, a list of one string, or a list of token ids");
    }
  }
  // Sampling: OpenAI's defaults (temperature 1).
  ASSIGN_OR_RETURN(auto temperature, Optional<double>(j, "temperature"));
  r.temperature = static_cast<float>(temperature.value_or(1.0));
  ASSIGN_OR_RETURN(auto top_p, Optional<double>(j, "top_p"));
  if (top_p) r.top_p = static_cast<float>(*top_p);
  ASSIGN_OR_RETURN(auto top_k, Optional<int64_t>(j, "top_k"));
  if (top_k) r.top_k = *top_k;
  ASSIGN_OR_RETURN(auto rep, Optional<double>(j, "repetition_penalty"));
  if (rep) r.repetition_penalty = static_cast<float>(*rep);
  ASSIGN_OR_RETURN(auto seed, Optional<int64_t>(j, "seed"));
  if (seed) r.seed = static_cast<uint64_t>(*seed);
  ASSIGN_OR_RETURN(auto max_tokens, Optional<int64_t>(j, chat && j.contains("max_completion_tokens")
                                                             ? "max_completion_tokens"
                                                             : "max_tokens"));
  // OpenAI: 16 for completions; chat runs to the server's limit.
  r.max_new_tokens = max_tokens.value_or(chat ? serving.options().limits.max_new_tokens : 16);
  if (j.contains("stop") && !j["stop"].is_null()) {
    const json& s = j["stop"];
    if (s.is_string()) {
      r.stop.push_back(s.get<std::string>());
    } else if (s.is_array()) {
      for (const auto& x : s) {
        if (!x.is_string()) return InvalidField("stop", "must be a string or a list of strings");
        r.stop.push_back(x.get<std::string>());
      }
    } else {
      return InvalidField("stop", "must be a string or a list of strings");
    }
  }
  ASSIGN_OR_RETURN(auto stream, Optional<bool>(j, "stream"));
  c.stream = stream.value_or(false);
  return c;
}

// Chunks of one streamed response, filled on the scheduler thread and drained by the HTTP
// thread; shared so that either side may go first.
struct StreamState {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::string> events;
  bool done = false;
};

}  // namespace

std::string ModelId(const Shape& s) {
  return "amoeba:" + s.ToString();
}

absl::StatusOr<Shape> ShapeForModel(const Supernet& s, const std::map<std::string, Shape>& aliases,
                                    const std::string& model) {
  if (model == "full") return s.FullShape();
  if (model == "smallest") return s.SmallestShape();
  if (auto it = aliases.find(model); it != aliases.end()) return it->second;
  std::string spec = model;
  if (spec.rfind("amoeba:", 0) == 0) spec = spec.substr(7);
  auto shape = Shape::Parse(spec, s.base().config.num_hidden_layers);
  if (!shape.ok() || !s.Validate(*shape).ok() || spec.empty()) {
    return absl::NotFoundError(absl::StrCat("model '", LogSafe(model, 80),
                                            "' does not exist (GET /v1/models lists them)"));
  }
  return *shape;
}

HttpFrontend::HttpFrontend(Serving& serving, HttpOptions options)
    : serving_(serving), options_(std::move(options)) {}

HttpFrontend::~HttpFrontend() {
  Stop();
}

void HttpFrontend::SetDraining() {
  draining_ = true;
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
  server_->set_payload_max_length(options_.max_body_bytes);
  Routes();
  port_ = options_.port == 0
              ? server_->bind_to_any_port(options_.host)
              : (server_->bind_to_port(options_.host, options_.port) ? options_.port : -1);
  if (port_ <= 0)
    return absl::UnavailableError(
        absl::StrCat("http: cannot listen on ", options_.host, ":", options_.port));
  thread_ = std::thread([this] { server_->listen_after_bind(); });
  return absl::OkStatus();
}

void HttpFrontend::Routes() {
  httplib::Server& s = *server_;
  s.set_exception_handler(
      [](const httplib::Request& req, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "unknown";
        try {
          std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        spdlog::error("http: {} {}: {}", req.method, LogSafe(req.path, 80), LogSafe(what, 200));
        SendError(res, absl::InternalError("internal error"));
      });
  s.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
    if (serving_.metrics()) serving_.metrics()->ObserveHttp(req.path, res.status);
  });
  auto auth = [this](const httplib::Request& req, httplib::Response& res) {
    std::optional<std::string_view> header;
    const std::string& h = req.get_header_value("Authorization");
    if (req.has_header("Authorization")) header = h;
    const absl::Status st = serving_.CheckAuth(header, false);
    if (!st.ok()) SendError(res, st);
    return st.ok();
  };
  s.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    res.status = draining_ ? 503 : 200;
    res.set_content(draining_ ? R"({"status":"NOT_SERVING"})" : R"({"status":"SERVING"})",
                    "application/json");
  });
  s.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(serving_.metrics() ? serving_.metrics()->Render() : "",
                    "text/plain; version=0.0.4; charset=utf-8");
  });
  s.Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(PlaygroundHtml(), "text/html; charset=utf-8");
  });
  // Every shape with the planner's estimates (the playground's grid and frontier).
  s.Get("/v1/amoeba/shapes", [this, auth](const httplib::Request& req, httplib::Response& res) {
    if (!auth(req, res)) return;
    json shapes = json::array();
    for (const auto& e : serving_.Shapes()) {
      shapes.push_back(
          {{"shape", {{"depth", e.profile.shape.depth}, {"width", e.profile.shape.width}}},
           {"params", e.profile.params},
           {"weight_bytes", e.profile.weight_bytes},
           {"decode_ms_per_token", e.decode_ms},
           {"quality", e.quality},
           {"quality_source", e.quality_source},
           {"latency_source", e.latency_source}});
    }
    res.set_content(json{{"shapes", shapes}}.dump(), "application/json");
  });
  s.Get("/v1/models", [this, auth](const httplib::Request& req, httplib::Response& res) {
    if (!auth(req, res)) return;
    json data = json::array();
    const auto created = std::chrono::duration_cast<std::chrono::seconds>(
                             std::chrono::system_clock::now().time_since_epoch())
                             .count();
    auto add = [&](const std::string& id, const Shape& sh) {
      data.push_back({{"id", id},
                      {"object", "model"},
                      {"created", created},
                      {"owned_by", "amoeba"},
                      {"amoeba", {{"shape", {{"depth", sh.depth}, {"width", sh.width}}}}}});
    };
    for (const Shape& sh : serving_.supernet().GridShapes()) add(ModelId(sh), sh);
    add("full", serving_.supernet().FullShape());
    add("smallest", serving_.supernet().SmallestShape());
    for (const auto& [name, sh] : options_.aliases) add(name, sh);
    res.set_content(json{{"object", "list"}, {"data", data}}.dump(), "application/json");
  });
  for (bool chat : {false, true}) {
    s.Post(chat ? "/v1/chat/completions" : "/v1/completions", [this, auth, chat](
                                                                  const httplib::Request& req,
                                                                  httplib::Response& res) {
      if (!auth(req, res)) return;
      if (draining_) return SendError(res, absl::UnavailableError("server is draining"));
      auto call = ParseCall(serving_, options_, req.body, chat);
      if (!call.ok()) return SendError(res, call.status());
      std::string id = req.get_header_value("X-Request-Id");
      if (!ValidateRequestId(id).ok() || id.empty()) id = absl::StrCat("http-", next_id_++);
      auto job = serving_.PrepareJob(call->req, id);
      if (!job.ok()) return SendError(res, job.status());
      const std::string oid = absl::StrCat(chat ? "chatcmpl-" : "cmpl-", id);
      const auto created = std::chrono::duration_cast<std::chrono::seconds>(
                               std::chrono::system_clock::now().time_since_epoch())
                               .count();
      const Shape shape = (*job)->shape;
      const std::string model = call->model.empty() ? ModelId(shape) : call->model;
      const json shape_json = {{"shape", {{"depth", shape.depth}, {"width", shape.width}}}};
      Metrics* metrics = serving_.metrics();
      auto usage = [](const JobResult& r) {
        return json{{"prompt_tokens", r.prompt_tokens},
                    {"completion_tokens", r.completion_tokens},
                    {"total_tokens", r.prompt_tokens + r.completion_tokens}};
      };
      auto observe = [metrics, shape](const JobResult& r) {
        if (metrics)
          metrics->ObserveRequest(shape.ToString(), FinishReasonName(r.reason), r.queue_ms / 1e3,
                                  r.ttft_ms / 1e3, r.total_ms / 1e3, r.prompt_tokens,
                                  r.completion_tokens);
      };
      spdlog::info("[{}] http {}: shape {} prompt {} tokens", id, chat ? "chat" : "completion",
                   shape.ToString(), (*job)->prompt.size());
      if (!call->stream) {
        auto text = std::make_shared<std::string>();
        auto done = std::make_shared<std::promise<JobResult>>();
        (*job)->on_token = [text](int32_t, std::string_view t) { text->append(t); };
        (*job)->on_done = [done](const JobResult& r) { done->set_value(r); };
        auto fut = done->get_future();
        const absl::Status st = serving_.scheduler().Submit(*job);
        if (!st.ok()) return SendError(res, st);
        const JobResult r = fut.get();
        observe(r);
        if (r.reason == FinishReason::kError)
          return SendError(res, r.error.ok() ? absl::InternalError("generation failed") : r.error);
        json choice = {{"index", 0}, {"finish_reason", OpenAiFinish(r.reason)}};
        if (chat)
          choice["message"] = {{"role", "assistant"}, {"content", *text}};
        else
          choice["text"] = *text, choice["logprobs"] = nullptr;
        const json body = {{"id", oid},
                           {"object", chat ? "chat.completion" : "text_completion"},
                           {"created", created},
                           {"model", model},
                           {"choices", json::array({choice})},
                           {"usage", usage(r)},
                           {"amoeba", WithSpeculation(shape_json, r)}};
        res.set_content(body.dump(), "application/json");
        return;
      }
      // Server-sent events: one chunk per text delta, the finish reason, [DONE].
      auto state = std::make_shared<StreamState>();
      auto chunk = [=](const json& delta_or_text, const json& finish) {
        json choice = {{"index", 0}, {"finish_reason", finish}};
        if (chat)
          choice["delta"] = delta_or_text;
        else
          choice["text"] = delta_or_text, choice["logprobs"] = nullptr;
        return json{{"id", oid},
                    {"object", chat ? "chat.completion.chunk" : "text_completion"},
                    {"created", created},
                    {"model", model},
                    {"choices", json::array({choice})}};
      };
      auto push = [state](std::string event) {
        std::lock_guard<std::mutex> l(state->mu);
        state->events.push_back(std::move(event));
        state->cv.notify_all();
      };
      if (chat) push("data: " + chunk(json{{"role", "assistant"}}, nullptr).dump() + "\n\n");
      (*job)->on_token = [=](int32_t, std::string_view t) {
        if (t.empty()) return;
        const json d = chat ? json{{"content", std::string(t)}} : json(std::string(t));
        push("data: " + chunk(d, nullptr).dump() + "\n\n");
      };
      (*job)->on_done = [=](const JobResult& r) {
        observe(r);
        if (r.reason == FinishReason::kError) {
          push("data: " +
               ErrorBody(r.error.ok() ? absl::InternalError("generation failed") : r.error).dump() +
               "\n\n");
        } else {
          json last = chunk(chat ? json::object() : json(""), OpenAiFinish(r.reason));
          last["usage"] = usage(r);
          last["amoeba"] = WithSpeculation(shape_json, r);
          push("data: " + last.dump() + "\n\n");
        }
        push("data: [DONE]\n\n");
        std::lock_guard<std::mutex> l(state->mu);
        state->done = true;
        state->cv.notify_all();
      };
      std::shared_ptr<Job> running = *job;
      const absl::Status st = serving_.scheduler().Submit(running);
      if (!st.ok()) return SendError(res, st);
      res.set_header("Cache-Control", "no-cache");
      res.set_chunked_content_provider(
          "text/event-stream",
          [state, running](size_t, httplib::DataSink& sink) {
            std::unique_lock<std::mutex> l(state->mu);
            // Wake at least every 100 ms to notice a client that went away.
            state->cv.wait_for(l, std::chrono::milliseconds(100),
                               [&] { return !state->events.empty() || state->done; });
            while (!state->events.empty()) {
              std::string e = std::move(state->events.front());
              state->events.pop_front();
              l.unlock();
              if (!sink.write(e.data(), e.size())) {
                running->cancelled = true;  // the client went away
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
              running->cancelled = true;
              return false;
            }
            return true;
          },
          [running](bool) { running->cancelled = true; });  // no-op once finished
    });
  }
}

}  // namespace amoeba
