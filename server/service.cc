#include "server/service.h"

#include <spdlog/spdlog.h>

#include <cmath>
#include <deque>
#include <filesystem>
#include <fstream>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "model/tokenizer.h"
#include "subnet/export.h"

namespace amoeba {
namespace fs = std::filesystem;

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(static_cast<int>(s.code())),
                      std::string(s.message()));
}

PlanBudget BudgetFromProto(const v1::Budget& b) {
  PlanBudget p;
  if (b.has_max_params()) p.max_params = b.max_params();
  if (b.has_max_memory_bytes()) p.max_memory_bytes = b.max_memory_bytes();
  if (b.has_max_decode_ms_per_token()) p.max_decode_ms_per_token = b.max_decode_ms_per_token();
  if (b.has_max_prefill_ms()) p.max_prefill_ms = b.max_prefill_ms();
  if (b.has_prompt_tokens()) p.prompt_tokens = b.prompt_tokens();
  if (b.has_max_context_tokens()) p.max_context_tokens = b.max_context_tokens();
  if (b.has_platform()) {
    const auto& pl = b.platform();
    if (pl.has_memory_bandwidth_gbs()) p.bandwidth_gbs = pl.memory_bandwidth_gbs();
    if (pl.has_compute_gflops()) p.compute_gflops = pl.compute_gflops();
    if (pl.has_memory_bytes()) p.platform_memory_bytes = pl.memory_bytes();
  }
  return p;
}

namespace {

absl::Status Bad(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", why));
}

absl::Status ValidateBudget(const v1::Budget& b) {
  if (b.has_max_params() && b.max_params() <= 0) return Bad("budget.max_params", "must be > 0");
  if (b.has_max_memory_bytes() && b.max_memory_bytes() <= 0)
    return Bad("budget.max_memory_bytes", "must be > 0");
  if (b.has_max_decode_ms_per_token() && !(b.max_decode_ms_per_token() > 0))
    return Bad("budget.max_decode_ms_per_token", "must be > 0");
  if (b.has_max_prefill_ms() && !(b.max_prefill_ms() > 0))
    return Bad("budget.max_prefill_ms", "must be > 0");
  if (b.has_prompt_tokens() && b.prompt_tokens() <= 0)
    return Bad("budget.prompt_tokens", "must be > 0");
  if (b.has_max_context_tokens() && b.max_context_tokens() <= 0)
    return Bad("budget.max_context_tokens", "must be > 0");
  if (b.has_platform()) {
    const auto& p = b.platform();
    if (p.has_memory_bandwidth_gbs() && !(p.memory_bandwidth_gbs() > 0))
      return Bad("budget.platform.memory_bandwidth_gbs", "must be > 0");
    if (p.has_compute_gflops() && !(p.compute_gflops() > 0))
      return Bad("budget.platform.compute_gflops", "must be > 0");
    if (p.has_memory_bytes() && p.memory_bytes() <= 0)
      return Bad("budget.platform.memory_bytes", "must be > 0");
  }
  return absl::OkStatus();
}

v1::ShapeEstimate ToProto(const ShapeEstimateResult& e) {
  v1::ShapeEstimate p;
  p.mutable_shape()->set_depth(static_cast<int32_t>(e.profile.shape.depth));
  p.mutable_shape()->set_width(e.profile.shape.width);
  p.set_params(e.profile.params);
  p.set_weight_bytes(e.profile.weight_bytes);
  p.set_kv_bytes_per_token(e.profile.kv_bytes_per_token);
  p.set_decode_ms_per_token(e.decode_ms);
  p.set_prefill_ms(e.prefill_ms);
  p.set_memory_bytes(e.memory_bytes);
  p.set_quality(e.quality);
  p.set_quality_source(e.quality_source);
  p.set_latency_source(e.latency_source);
  return p;
}

v1::FinishReason ToProto(FinishReason r) {
  switch (r) {
    case FinishReason::kLength:
      return v1::LENGTH;
    case FinishReason::kEos:
      return v1::EOS;
    case FinishReason::kStopSequence:
      return v1::STOP_SEQUENCE;
    case FinishReason::kCancelled:
      return v1::CANCELLED;
    case FinishReason::kTimeLimit:
      return v1::TIME_LIMIT;
    case FinishReason::kError:
      return v1::ERROR;
    default:
      return v1::FINISH_REASON_UNSPECIFIED;
  }
}

grpc::ServerUnaryReactor* Reply(grpc::CallbackServerContext* ctx, const grpc::Status& s) {
  auto* r = ctx->DefaultReactor();
  r->Finish(s);
  return r;
}

// Streams scheduler output to one client. Writes are serialised (one in flight); Finish is called
// only after the scheduler's final callback, so the reactor outlives every callback into it.
class GenerateReactor : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  GenerateReactor(AmoebaService* svc, grpc::CallbackServerContext* ctx,
                  const v1::GenerateRequest* req)
      : svc_(svc), ctx_(ctx) {
    Start(req);
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> l(mu_);
    writing_ = false;
    if (!ok) {
      broken_ = true;
      if (job_) job_->cancelled = true;
      pending_.clear();
    } else {
      pending_.pop_front();
    }
    Pump(l);
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> l(mu_);
    if (job_) job_->cancelled = true;
  }

  void OnDone() override {
    spdlog::info("[{}] generate: done", id_);
    delete this;
  }

 private:
  void Start(const v1::GenerateRequest* req) {
    id_ = req->request_id().empty() ? svc_->NewRequestId() : req->request_id();
    grpc::Status auth = svc_->CheckAuth(ctx_, false);
    if (!auth.ok()) return FinishNow(auth);
    const Supernet& s = svc_->supernet();
    absl::Status v =
        ValidateGenerateRequest(*req, svc_->options().limits, s.base().config.vocab_size);
    if (!v.ok()) return FinishNow(ToGrpc(v));
    auto shape = svc_->ResolveTarget(*req);
    if (!shape.ok()) return FinishNow(ToGrpc(shape.status()));
    auto job = std::make_shared<Job>();
    job->request_id = id_;
    job->shape = *shape;
    if (req->has_tokens()) {
      job->prompt.assign(req->tokens().ids().begin(), req->tokens().ids().end());
    } else {
      if (!req->has_add_bos() || req->add_bos())
        job->prompt.push_back(static_cast<int32_t>(s.base().config.bos_token_id));
      for (int32_t t : s.tokenizer()->Encode(req->text())) job->prompt.push_back(t);
    }
    if (static_cast<int64_t>(job->prompt.size()) > svc_->options().limits.max_prompt_tokens) {
      return FinishNow(
          ToGrpc(Bad("prompt", absl::StrCat(job->prompt.size(), " tokens exceed the limit of ",
                                            svc_->options().limits.max_prompt_tokens))));
    }
    const auto& sp = req->sampling();
    job->gen.sampling.temperature = sp.has_temperature() ? sp.temperature() : 0.f;
    job->gen.sampling.top_k = sp.has_top_k() ? sp.top_k() : 0;
    job->gen.sampling.top_p = sp.has_top_p() ? sp.top_p() : 1.f;
    job->gen.sampling.repetition_penalty =
        sp.has_repetition_penalty() ? sp.repetition_penalty() : 1.f;
    job->gen.sampling.seed = sp.has_seed() ? sp.seed() : 0;
    job->gen.max_new_tokens = req->has_max_new_tokens() ? req->max_new_tokens() : 128;
    job->gen.stop.assign(req->stop().begin(), req->stop().end());
    job->gen.time_limit_ms = req->has_time_limit_ms() ? req->time_limit_ms() : 0;
    if (ctx_->deadline() != std::chrono::system_clock::time_point::max()) {
      job->deadline = Clock::now() + (ctx_->deadline() - std::chrono::system_clock::now());
    }
    shape_ = *shape;
    const std::string shape_name = shape->ToString();
    job->on_token = [this, shape_name](int32_t token, std::string_view text) {
      const auto now = Clock::now();
      if (have_last_ && svc_->metrics()) {
        svc_->metrics()->ObserveInterToken(
            shape_name, std::chrono::duration<double>(now - last_token_).count());
      }
      have_last_ = true;
      last_token_ = now;
      v1::GenerateResponse r;
      r.set_request_id(id_);
      if (token >= 0) r.add_token_ids(token);
      r.set_text(std::string(text));
      if (!sent_shape_) {
        sent_shape_ = true;
        SetShape(&r);
      }
      Enqueue(std::move(r), false);
    };
    job->on_done = [this, shape_name](const JobResult& res) {
      v1::GenerateResponse r;
      r.set_request_id(id_);
      r.set_finish_reason(ToProto(res.reason));
      r.mutable_usage()->set_prompt_tokens(static_cast<int32_t>(res.prompt_tokens));
      r.mutable_usage()->set_completion_tokens(static_cast<int32_t>(res.completion_tokens));
      auto* t = r.mutable_timings();
      t->set_queue_ms(res.queue_ms);
      t->set_time_to_first_token_ms(res.ttft_ms);
      t->set_total_ms(res.total_ms);
      const double decode_ms = res.total_ms - res.ttft_ms;
      t->set_decode_tokens_per_s(res.completion_tokens > 1 && decode_ms > 0
                                     ? (res.completion_tokens - 1) * 1000.0 / decode_ms
                                     : 0);
      SetShape(&r);
      if (svc_->metrics()) {
        svc_->metrics()->ObserveRequest(shape_name, FinishReasonName(res.reason),
                                        res.queue_ms / 1e3, res.ttft_ms / 1e3, res.total_ms / 1e3,
                                        res.prompt_tokens, res.completion_tokens);
      }
      spdlog::info(
          "[{}] generate: {} finish={} prompt={} completion={} ttft={:.1f}ms total={:.1f}ms", id_,
          shape_name, FinishReasonName(res.reason), res.prompt_tokens, res.completion_tokens,
          res.ttft_ms, res.total_ms);
      grpc::Status final = grpc::Status::OK;
      if (res.reason == FinishReason::kError)
        final = ToGrpc(res.error.ok() ? absl::InternalError("generation failed") : res.error);
      if (res.reason == FinishReason::kCancelled && ctx_->IsCancelled())
        final = grpc::Status::CANCELLED;
      if (res.reason == FinishReason::kTimeLimit &&
          ctx_->deadline() <= std::chrono::system_clock::now()) {
        final = grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                             "deadline exceeded during generation");
      }
      {
        std::lock_guard<std::mutex> l(mu_);
        final_status_ = final;
      }
      Enqueue(std::move(r), true);
    };
    {
      std::lock_guard<std::mutex> l(mu_);
      job_ = job;
    }
    spdlog::info("[{}] generate: shape {} prompt {} tokens max_new {}", id_, shape_name,
                 job->prompt.size(), job->gen.max_new_tokens);
    absl::Status st = svc_->scheduler().Submit(job);
    if (!st.ok()) {
      {
        std::lock_guard<std::mutex> l(mu_);
        job_.reset();
      }
      FinishNow(ToGrpc(st));
    }
  }

  void SetShape(v1::GenerateResponse* r) const {
    r->mutable_shape()->set_depth(static_cast<int32_t>(shape_.depth));
    r->mutable_shape()->set_width(shape_.width);
  }

  void Enqueue(v1::GenerateResponse r, bool last) {
    std::unique_lock<std::mutex> l(mu_);
    if (last) done_ = true;
    if (!broken_) pending_.push_back(std::move(r));
    Pump(l);
  }

  // Starts the next write or finishes. Releases the lock before calling into gRPC, whose
  // reactions may run inline; members are not touched afterwards (OnDone may delete this).
  void Pump(std::unique_lock<std::mutex>& l) {
    if (writing_ || finished_) return;
    if (!pending_.empty()) {
      writing_ = true;
      const v1::GenerateResponse* msg =
          &pending_.front();  // deque: stable while others are appended
      l.unlock();
      StartWrite(msg);
      return;
    }
    if (done_) {
      finished_ = true;
      const grpc::Status s = final_status_;
      l.unlock();
      Finish(s);
    }
  }

  void FinishNow(const grpc::Status& s) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (finished_) return;
      finished_ = true;
    }
    if (!s.ok())
      spdlog::warn("[{}] generate: {} {}", id_, static_cast<int>(s.error_code()),
                   s.error_message());
    Finish(s);
  }

  AmoebaService* svc_;
  grpc::CallbackServerContext* ctx_;
  std::string id_;
  Shape shape_;
  std::mutex mu_;
  std::shared_ptr<Job> job_;
  std::deque<v1::GenerateResponse> pending_;
  bool writing_ = false, done_ = false, finished_ = false, broken_ = false, sent_shape_ = false;
  grpc::Status final_status_;
  bool have_last_ = false;
  Clock::time_point last_token_;
};

// Streams the files of an export directory in chunks, then removes it.
class ExportReactor : public grpc::ServerWriteReactor<v1::FileChunk> {
 public:
  ExportReactor(AmoebaService* svc, grpc::CallbackServerContext* ctx,
                const v1::ExportSubnetRequest* req) {
    const std::string id = req->request_id().empty() ? svc->NewRequestId() : req->request_id();
    grpc::Status auth = svc->CheckAuth(ctx, true);
    if (!auth.ok()) {
      Finish(auth);
      return;
    }
    const Shape shape{req->shape().depth(), req->shape().width()};
    ExportOptions eo;
    eo.uniform_width = req->uniform_width();
    absl::Status st = eo.uniform_width ? absl::OkStatus() : svc->supernet().Validate(shape);
    if (!st.ok()) {
      Finish(ToGrpc(st));
      return;
    }
    auto sub = SubnetForExport(svc->supernet(), shape, eo);
    if (!sub.ok()) {
      Finish(ToGrpc(sub.status()));
      return;
    }
    const fs::path base = svc->options().export_tmp_dir.empty()
                              ? fs::temp_directory_path()
                              : fs::path(svc->options().export_tmp_dir);
    dir_ = (base / absl::StrCat("amoeba-export-", id, "-", getpid(), "-",
                                reinterpret_cast<uintptr_t>(this)))
               .string();
    st = WriteExport(svc->supernet(), *sub, dir_, eo);
    if (!st.ok()) {
      Finish(ToGrpc(st));
      return;
    }
    for (const auto& e : fs::directory_iterator(dir_)) files_.push_back(e.path());
    std::sort(files_.begin(), files_.end());
    spdlog::info("[{}] export: {} ({} files)", id, shape.ToString(), files_.size());
    Next();
  }
  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "client went away"));
      return;
    }
    Next();
  }
  void OnDone() override {
    std::error_code ec;
    if (!dir_.empty()) fs::remove_all(dir_, ec);
    delete this;
  }

 private:
  void Next() {
    constexpr size_t kChunk = 1 << 20;
    while (file_ < files_.size()) {
      if (!in_.is_open()) {
        in_.open(files_[file_], std::ios::binary);
        size_ = fs::file_size(files_[file_]);
        offset_ = 0;
      }
      std::string buf(std::min<uint64_t>(kChunk, size_ - offset_), '\0');
      in_.read(buf.data(), static_cast<std::streamsize>(buf.size()));
      chunk_.Clear();
      chunk_.set_path(files_[file_].filename().string());
      chunk_.set_offset(offset_);
      chunk_.set_total_size(size_);
      offset_ += buf.size();
      chunk_.set_data(std::move(buf));
      const bool last = offset_ >= size_;
      chunk_.set_last_chunk(last);
      if (last) {
        in_.close();
        ++file_;
      }
      StartWrite(&chunk_);
      return;
    }
    Finish(grpc::Status::OK);
  }

  std::string dir_;
  std::vector<fs::path> files_;
  size_t file_ = 0;
  std::ifstream in_;
  uint64_t size_ = 0, offset_ = 0;
  v1::FileChunk chunk_;
};

}  // namespace

absl::Status ValidateGenerateRequest(const v1::GenerateRequest& r, const ServiceLimits& l,
                                     int64_t vocab) {
  if (static_cast<int64_t>(r.request_id().size()) > l.max_request_id_length)
    return Bad("request_id", absl::StrCat("longer than ", l.max_request_id_length, " bytes"));
  if (r.prompt_case() == v1::GenerateRequest::PROMPT_NOT_SET)
    return Bad("prompt", "empty (set text or tokens)");
  if (r.has_tokens()) {
    if (r.tokens().ids().empty()) return Bad("prompt.tokens", "empty");
    for (int32_t id : r.tokens().ids())
      if (id < 0 || id >= vocab)
        return Bad("prompt.tokens", absl::StrCat("id ", id, " outside [0, ", vocab, ")"));
    if (r.tokens().ids_size() > l.max_prompt_tokens)
      return Bad(
          "prompt.tokens",
          absl::StrCat(r.tokens().ids_size(), " tokens exceed the limit of ", l.max_prompt_tokens));
  } else {
    if (r.text().empty()) return Bad("prompt.text", "empty");
    if (!IsValidUtf8(r.text())) return Bad("prompt.text", "not valid UTF-8");
  }
  const auto& s = r.sampling();
  if (s.has_temperature() && !(s.temperature() >= 0 && std::isfinite(s.temperature())))
    return Bad("sampling.temperature", "must be >= 0");
  if (s.has_top_k() && s.top_k() < 0) return Bad("sampling.top_k", "must be >= 0");
  if (s.has_top_p() && !(s.top_p() > 0 && s.top_p() <= 1))
    return Bad("sampling.top_p", "must be in (0, 1]");
  if (s.has_repetition_penalty() &&
      !(s.repetition_penalty() > 0 && std::isfinite(s.repetition_penalty())))
    return Bad("sampling.repetition_penalty", "must be > 0");
  if (r.has_max_new_tokens() && (r.max_new_tokens() < 1 || r.max_new_tokens() > l.max_new_tokens))
    return Bad("max_new_tokens", absl::StrCat("must be in [1, ", l.max_new_tokens, "]"));
  if (r.stop_size() > l.max_stop_strings)
    return Bad("stop", absl::StrCat("more than ", l.max_stop_strings, " strings"));
  for (const auto& st : r.stop()) {
    if (st.empty()) return Bad("stop", "empty string");
    if (static_cast<int64_t>(st.size()) > l.max_stop_length)
      return Bad("stop", absl::StrCat("longer than ", l.max_stop_length, " bytes"));
    if (!IsValidUtf8(st)) return Bad("stop", "not valid UTF-8");
  }
  if (r.has_time_limit_ms() && r.time_limit_ms() <= 0) return Bad("time_limit_ms", "must be > 0");
  if (r.has_budget()) return ValidateBudget(r.budget());
  return absl::OkStatus();
}

AmoebaService::AmoebaService(const Supernet& supernet, Scheduler& scheduler, Metrics* metrics,
                             ServiceOptions options, HostSpeed host,
                             std::vector<ShapeProfile> profiles)
    : supernet_(supernet),
      scheduler_(scheduler),
      metrics_(metrics),
      options_(std::move(options)),
      host_(host),
      profiles_(std::move(profiles)) {}

std::string AmoebaService::NewRequestId() {
  return absl::StrCat("req-", next_id_++);
}

grpc::Status AmoebaService::CheckAuth(grpc::CallbackServerContext* ctx, bool export_call) const {
  if (options_.auth_token.empty() || (!export_call && !options_.token_for_all))
    return grpc::Status::OK;
  const auto& md = ctx->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end())
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "missing authorization: Bearer <token>");
  if (std::string(it->second.data(), it->second.size()) != "Bearer " + options_.auth_token)
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "invalid token");
  return grpc::Status::OK;
}

absl::StatusOr<Shape> AmoebaService::ResolveTarget(const v1::GenerateRequest& r) const {
  if (r.has_shape()) {
    Shape s{r.shape().depth(), r.shape().width()};
    if (s.width == 0) s.width = 1.0;  // unset width: full
    if (s.depth == 0) s.depth = supernet_.base().config.num_hidden_layers;
    auto st = supernet_.Validate(s);
    if (!st.ok()) return st;
    return s;
  }
  if (r.has_budget()) {
    auto p = PlanShape(profiles_, BudgetFromProto(r.budget()), host_);
    if (!p.ok()) return p.status();
    return p->chosen.profile.shape;
  }
  return supernet_.FullShape();
}

grpc::ServerWriteReactor<v1::GenerateResponse>* AmoebaService::Generate(
    grpc::CallbackServerContext* ctx, const v1::GenerateRequest* req) {
  return new GenerateReactor(this, ctx, req);
}

grpc::ServerUnaryReactor* AmoebaService::Plan(grpc::CallbackServerContext* ctx,
                                              const v1::PlanRequest* req, v1::PlanResponse* resp) {
  grpc::Status auth = CheckAuth(ctx, false);
  if (!auth.ok()) return Reply(ctx, auth);
  absl::Status v = ValidateBudget(req->budget());
  if (!v.ok()) return Reply(ctx, ToGrpc(v));
  auto p = PlanShape(profiles_, BudgetFromProto(req->budget()), host_);
  if (!p.ok()) return Reply(ctx, ToGrpc(p.status()));
  resp->set_request_id(req->request_id());
  *resp->mutable_chosen() = ToProto(p->chosen);
  for (const auto& f : p->frontier) *resp->add_frontier() = ToProto(f);
  resp->set_explanation(p->explanation);
  spdlog::info("[{}] plan: {}", req->request_id(), p->explanation);
  return Reply(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* AmoebaService::ListShapes(grpc::CallbackServerContext* ctx,
                                                    const v1::ListShapesRequest*,
                                                    v1::ListShapesResponse* resp) {
  grpc::Status auth = CheckAuth(ctx, false);
  if (!auth.ok()) return Reply(ctx, auth);
  for (const auto& e : EstimateAll(profiles_, PlanBudget{}, host_))
    *resp->add_shapes() = ToProto(e);
  return Reply(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* AmoebaService::GetModelInfo(grpc::CallbackServerContext* ctx,
                                                      const v1::GetModelInfoRequest*,
                                                      v1::ModelInfo* resp) {
  grpc::Status auth = CheckAuth(ctx, false);
  if (!auth.ok()) return Reply(ctx, auth);
  const ModelConfig& c = supernet_.base().config;
  resp->set_model_type("llama");
  resp->set_num_layers(static_cast<int32_t>(c.num_hidden_layers));
  resp->set_hidden_size(static_cast<int32_t>(c.hidden_size));
  resp->set_vocab_size(static_cast<int32_t>(c.vocab_size));
  for (int64_t d : supernet_.spec().depths) resp->add_depths(static_cast<int32_t>(d));
  for (double w : supernet_.spec().widths) resp->add_widths(w);
  resp->set_has_adapters(!supernet_.spec().smol.is_null() &&
                         supernet_.spec().smol.contains("experts"));
  resp->set_tokenizer(supernet_.tokenizer() ? supernet_.tokenizer()->kind() : "");
  resp->set_max_context_tokens(static_cast<int32_t>(options_.limits.max_prompt_tokens));
  return Reply(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* AmoebaService::Tokenize(grpc::CallbackServerContext* ctx,
                                                  const v1::TokenizeRequest* req,
                                                  v1::TokenizeResponse* resp) {
  grpc::Status auth = CheckAuth(ctx, false);
  if (!auth.ok()) return Reply(ctx, auth);
  if (!IsValidUtf8(req->text())) return Reply(ctx, ToGrpc(Bad("text", "not valid UTF-8")));
  const Tokenizer& tok = *supernet_.tokenizer();
  if (req->has_add_bos() && req->add_bos())
    resp->add_ids(static_cast<int32_t>(supernet_.base().config.bos_token_id));
  for (int32_t id : tok.Encode(req->text())) resp->add_ids(id);
  for (int32_t id : resp->ids()) {
    // Pieces as text: a byte token that is part of a character becomes U+FFFD (proto strings are
    // UTF-8).
    const std::string& b = tok.TokenBytes(id);
    resp->add_pieces(IsValidUtf8(b) ? b : std::string("\xEF\xBF\xBD"));
  }
  return Reply(ctx, grpc::Status::OK);
}

grpc::ServerWriteReactor<v1::FileChunk>* AmoebaService::ExportSubnet(
    grpc::CallbackServerContext* ctx, const v1::ExportSubnetRequest* req) {
  return new ExportReactor(this, ctx, req);
}

}  // namespace amoeba
