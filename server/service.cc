#include "server/service.h"

#include <spdlog/spdlog.h>

#include <cmath>
#include <deque>
#include <filesystem>
#include <fstream>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "file_digest.h"
#include "model/status_macros.h"
#include "model/tokenizer.h"
#include "model/weight_format.h"
#include "subnet/export.h"

namespace amoeba {
namespace fs = std::filesystem;

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

// Runs `fn` (a handler's work); an exception becomes a status instead of ending the process.
template <typename Fn>
grpc::Status Guarded(const char* rpc, const std::string& id, Fn&& fn) {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    spdlog::error("[{}] {}: out of memory", id, rpc);
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "out of memory");
  } catch (const std::exception& e) {
    spdlog::error("[{}] {}: {}", id, rpc, LogSafe(e.what(), 300));
    return grpc::Status(grpc::StatusCode::INTERNAL,
                        absl::StrCat(rpc, " failed (request ", id, ")"));
  }
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
    // Everything before the job reaches the scheduler; nothing after Submit can throw.
    const grpc::Status st = Guarded("generate", id_, [&] {
      Start(req);
      return grpc::Status::OK;
    });
    if (!st.ok()) FinishNow(st);
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
    const absl::Status id_ok = ValidateRequestId(req->request_id());
    id_ = req->request_id().empty() || !id_ok.ok() ? svc_->serving().NewRequestId()
                                                   : req->request_id();
    if (!id_ok.ok()) return FinishNow(ToGrpc(id_ok));
    grpc::Status auth = svc_->CheckAuth(ctx_, false);
    if (!auth.ok()) return FinishNow(auth);
    auto prepared = svc_->serving().PrepareJob(GenerationRequestFromProto(*req), id_);
    if (!prepared.ok()) return FinishNow(ToGrpc(prepared.status()));
    std::shared_ptr<Job> job = std::move(*prepared);
    const Shape* shape = &job->shape;
    if (ctx_->deadline() != std::chrono::system_clock::time_point::max()) {
      // Deadlines beyond a day are treated as a day: no later arithmetic can overflow.
      const auto left = std::clamp<std::chrono::system_clock::duration>(
          ctx_->deadline() - std::chrono::system_clock::now(),
          std::chrono::system_clock::duration::zero(), std::chrono::hours(24));
      job->deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(left);
    }
    shape_ = *shape;
    draft_tokens_ = job->draft_tokens;
    const std::string shape_name = shape->ToString();
    job->on_token = [this, shape_name](int32_t token, std::string_view text) {
      const auto now = Clock::now();
      if (have_last_ && svc_->serving().metrics()) {
        svc_->serving().metrics()->ObserveInterToken(
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
      if (res.draft) {
        auto* sp = r.mutable_speculation();
        sp->mutable_draft()->set_depth(res.draft->depth);
        sp->mutable_draft()->set_width(res.draft->width);
        sp->set_draft_tokens(static_cast<int32_t>(draft_tokens_));
        sp->set_drafted_tokens(static_cast<int32_t>(res.drafted_tokens));
        sp->set_accepted_tokens(static_cast<int32_t>(res.accepted_tokens));
        sp->set_checks(static_cast<int32_t>(res.draft_rounds));
        sp->set_mean_accepted(res.draft_rounds > 0 ? static_cast<double>(res.accepted_tokens) /
                                                         static_cast<double>(res.draft_rounds)
                                                   : 0.0);
      }
      if (svc_->serving().metrics()) {
        svc_->serving().metrics()->ObserveRequest(
            shape_name, FinishReasonName(res.reason), res.queue_ms / 1e3, res.ttft_ms / 1e3,
            res.total_ms / 1e3, res.prompt_tokens, res.completion_tokens);
      }
      spdlog::info(
          "[{}] generate: {} finish={} prompt={} completion={} ttft={:.1f}ms total={:.1f}ms{}", id_,
          shape_name, FinishReasonName(res.reason), res.prompt_tokens, res.completion_tokens,
          res.ttft_ms, res.total_ms,
          res.draft ? absl::StrCat(" draft=", res.draft->ToString(),
                                   " accepted=", res.accepted_tokens, "/", res.drafted_tokens)
                    : std::string());
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
    absl::Status st = svc_->serving().scheduler().Submit(job);
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
                   LogSafe(s.error_message(), 200));
    Finish(s);
  }

  AmoebaService* svc_;
  grpc::CallbackServerContext* ctx_;
  std::string id_;
  Shape shape_;
  int64_t draft_tokens_ = 0;
  std::mutex mu_;
  std::shared_ptr<Job> job_;
  std::deque<v1::GenerateResponse> pending_;
  bool writing_ = false, done_ = false, finished_ = false, broken_ = false, sent_shape_ = false;
  grpc::Status final_status_;
  bool have_last_ = false;
  Clock::time_point last_token_;
};

// ExportSubnet as a job: checks on the callback thread, the subnet built and written on an export
// worker into a mkdtemp staging directory, then the files streamed in chunks with their SHA-256.
// The staging directory is removed in OnDone, which gRPC calls on every exit path (done, error,
// client cancel, shutdown); Finish is called exactly once, by whichever step ends the call.
class ExportReactor : public grpc::ServerWriteReactor<v1::FileChunk> {
 public:
  ExportReactor(AmoebaService* svc, grpc::CallbackServerContext* ctx,
                const v1::ExportSubnetRequest* req)
      : svc_(svc) {
    const absl::Status id_ok = ValidateRequestId(req->request_id());
    id_ = req->request_id().empty() || !id_ok.ok() ? svc->serving().NewRequestId()
                                                   : req->request_id();
    if (!id_ok.ok()) {
      End(ToGrpc(id_ok));
      return;
    }
    grpc::Status auth = svc->CheckAuth(ctx, true);
    if (!auth.ok()) {
      End(auth);
      return;
    }
    shape_ = Shape{req->shape().depth(), req->shape().width()};
    if (shape_.depth == 0) shape_.depth = svc->serving().supernet().base().config.num_hidden_layers;
    if (shape_.width == 0) shape_.width = 1.0;
    options_.uniform_width = req->uniform_width();
    options_.adapters = !req->no_adapters();
    if (absl::Status f = ParseExportFormat(req->format(), req->dtype(), options_); !f.ok()) {
      End(ToGrpc(f));
      return;
    }
    // Cheap checks here, so a bad shape never takes a worker.
    absl::Status st = ValidateSubnetShape(svc->serving().supernet(), svc->serving().smol(), shape_,
                                          SubnetOptionsForExport(options_));
    if (!st.ok()) {
      End(ToGrpc(st));
      return;
    }
    st = svc->serving().export_workers().TrySubmit([this] { Prepare(); });
    if (!st.ok()) {
      End(ToGrpc(st));
      return;
    }
  }

  void OnCancel() override { cancelled_ = true; }

  void OnWriteDone(bool ok) override {
    if (!ok || cancelled_)
      return End(grpc::Status(grpc::StatusCode::CANCELLED, "export cancelled"));
    Next();
  }

  void OnDone() override {
    std::error_code ec;
    if (!staging_.empty()) std::filesystem::remove_all(staging_, ec);
    if (ec) spdlog::warn("[{}] export: cannot remove {}: {}", id_, staging_, ec.message());
    delete this;
  }

 private:
  // On an export worker.
  void Prepare() {
    const grpc::Status st = Guarded("export", id_, [&] { return Write(); });
    if (!st.ok()) return End(st);
    if (cancelled_) return End(grpc::Status(grpc::StatusCode::CANCELLED, "export cancelled"));
    Next();
  }

  grpc::Status Write() {
    if (cancelled_) return grpc::Status(grpc::StatusCode::CANCELLED, "export cancelled");
    const auto t0 = Clock::now();
    auto sub =
        SubnetForExport(svc_->serving().supernet(), svc_->serving().smol(), shape_, options_);
    if (!sub.ok()) return ToGrpc(sub.status());
    auto dir = MakeStagingDir(svc_->serving().export_dir());
    if (!dir.ok()) {
      spdlog::error("[{}] export: {} in {}", id_, std::string(dir.status().message()),
                    svc_->serving().export_dir());
      return grpc::Status(grpc::StatusCode::INTERNAL, "export failed: no staging directory");
    }
    staging_ = *dir;
    if (cancelled_) return grpc::Status(grpc::StatusCode::CANCELLED, "export cancelled");
    const std::string out = (std::filesystem::path(staging_) / "model").string();
    absl::Status w;
    if (options_.format == ExportOptions::Format::kGguf) {
      std::error_code ec;
      std::filesystem::create_directories(out, ec);
      w = ec ? absl::InternalError(absl::StrCat("cannot create ", out, ": ", ec.message()))
             : WriteGgufExport(svc_->serving().supernet(), *sub, shape_,
                               (std::filesystem::path(out) / "model.gguf").string(),
                               options_.gguf_dtype);
    } else {
      w = WriteExport(svc_->serving().supernet(), *sub, out, options_);
    }
    if (!w.ok()) {
      // The detail names server paths: it goes to the log, the client gets the request id.
      spdlog::error("[{}] export: {}", id_, w.ToString());
      return grpc::Status(grpc::StatusCode::INTERNAL,
                          absl::StrCat("export failed (request ", id_, "; see the server log)"));
    }
    for (const auto& e : std::filesystem::directory_iterator(out)) files_.push_back(e.path());
    std::sort(files_.begin(), files_.end());
    spdlog::info("[{}] export: {}{} written in {:.0f} ms ({} files)", id_, shape_.ToString(),
                 svc_->serving().smol() && options_.adapters ? " with adapters merged" : "",
                 std::chrono::duration<double, std::milli>(Clock::now() - t0).count(),
                 files_.size());
    return grpc::Status::OK;
  }

  // Reads the next chunk and starts its write, or finishes after the last file.
  void Next() {
    constexpr size_t kChunk = 1 << 20;
    if (file_ >= files_.size()) return End(grpc::Status::OK);
    if (!in_.is_open()) {
      in_.open(files_[file_], std::ios::binary);
      size_ = std::filesystem::file_size(files_[file_]);
      offset_ = 0;
    }
    std::string buf(std::min<uint64_t>(kChunk, size_ - offset_), '\0');
    in_.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (!in_) {
      spdlog::error("[{}] export: reading {} failed", id_, files_[file_].string());
      return End(grpc::Status(grpc::StatusCode::INTERNAL, "export failed while streaming"));
    }
    digest_.Update(buf);
    chunk_.Clear();
    chunk_.set_path(files_[file_].filename().string());
    chunk_.set_offset(offset_);
    chunk_.set_total_size(size_);
    offset_ += buf.size();
    chunk_.set_data(std::move(buf));
    const bool last = offset_ >= size_;
    chunk_.set_last_chunk(last);
    if (last) {
      chunk_.set_sha256(digest_.HexDigest());
      in_.close();
      ++file_;
    }
    StartWrite(&chunk_);
  }

  void End(const grpc::Status& s) {
    if (!s.ok())
      spdlog::warn("[{}] export: {} {}", id_, static_cast<int>(s.error_code()),
                   LogSafe(s.error_message(), 200));
    Finish(s);
  }

  AmoebaService* svc_;
  std::string id_;
  Shape shape_;
  ExportOptions options_;
  std::atomic<bool> cancelled_{false};
  std::string staging_;  // made by mkdtemp; removed in OnDone
  std::vector<std::filesystem::path> files_;
  size_t file_ = 0;
  std::ifstream in_;
  uint64_t size_ = 0, offset_ = 0;
  Sha256 digest_;
  v1::FileChunk chunk_;
};

}  // namespace

GenerationRequest GenerationRequestFromProto(const v1::GenerateRequest& r) {
  GenerationRequest g;
  g.request_id = r.request_id();
  if (r.has_tokens())
    g.tokens = std::vector<int32_t>(r.tokens().ids().begin(), r.tokens().ids().end());
  else if (r.prompt_case() == v1::GenerateRequest::kText)
    g.text = r.text();
  g.add_bos = !r.has_add_bos() || r.add_bos();
  if (r.has_shape()) g.shape = Shape{r.shape().depth(), r.shape().width()};
  if (r.has_budget()) g.budget = BudgetFromProto(r.budget());
  const auto& sp = r.sampling();
  if (sp.has_temperature()) g.temperature = sp.temperature();
  if (sp.has_top_k()) g.top_k = sp.top_k();
  if (sp.has_top_p()) g.top_p = sp.top_p();
  if (sp.has_repetition_penalty()) g.repetition_penalty = sp.repetition_penalty();
  if (sp.has_seed()) g.seed = sp.seed();
  if (r.has_max_new_tokens()) g.max_new_tokens = r.max_new_tokens();
  g.stop.assign(r.stop().begin(), r.stop().end());
  if (r.has_time_limit_ms()) g.time_limit_ms = r.time_limit_ms();
  if (r.has_speculate()) g.speculate = r.speculate();
  if (r.has_draft_tokens()) g.draft_tokens = r.draft_tokens();
  return g;
}

absl::Status ValidateGenerateRequest(const v1::GenerateRequest& r, const ServiceLimits& l,
                                     int64_t vocab) {
  return ValidateGenerationRequest(GenerationRequestFromProto(r), l, vocab);
}

grpc::Status AmoebaService::CheckAuth(grpc::CallbackServerContext* ctx, bool export_call) const {
  const auto& md = ctx->client_metadata();
  auto it = md.find("authorization");
  std::optional<std::string_view> header;
  if (it != md.end()) header = std::string_view(it->second.data(), it->second.size());
  return ToGrpc(serving_.CheckAuth(header, export_call));
}

grpc::ServerWriteReactor<v1::GenerateResponse>* AmoebaService::Generate(
    grpc::CallbackServerContext* ctx, const v1::GenerateRequest* req) {
  return new GenerateReactor(this, ctx, req);
}

grpc::ServerUnaryReactor* AmoebaService::Plan(grpc::CallbackServerContext* ctx,
                                              const v1::PlanRequest* req, v1::PlanResponse* resp) {
  const absl::Status id_ok = ValidateRequestId(req->request_id());
  if (!id_ok.ok()) return Reply(ctx, ToGrpc(id_ok));
  const std::string id = req->request_id().empty() ? serving_.NewRequestId() : req->request_id();
  return Reply(ctx, Guarded("plan", id, [&] {
                 grpc::Status auth = CheckAuth(ctx, false);
                 if (!auth.ok()) return auth;
                 resp->set_request_id(id);
                 if (req->for_export()) {
                   auto e = serving_.PlanExport(BudgetFromProto(req->budget()));
                   if (!e.ok()) return ToGrpc(e.status());
                   *resp->mutable_chosen() = ToProto(e->chosen);
                   resp->set_export_dtype(WeightFormatName(e->format));
                   resp->set_export_file_bytes(e->file_bytes);
                   resp->set_explanation(e->explanation);
                   spdlog::info("[{}] plan export: {}", id, e->explanation);
                   return grpc::Status::OK;
                 }
                 auto p = serving_.Plan(BudgetFromProto(req->budget()));
                 if (!p.ok()) return ToGrpc(p.status());
                 *resp->mutable_chosen() = ToProto(p->chosen);
                 for (const auto& f : p->frontier) *resp->add_frontier() = ToProto(f);
                 resp->set_explanation(p->explanation);
                 spdlog::info("[{}] plan: {}", id, p->explanation);
                 return grpc::Status::OK;
               }));
}

grpc::ServerUnaryReactor* AmoebaService::ListShapes(grpc::CallbackServerContext* ctx,
                                                    const v1::ListShapesRequest*,
                                                    v1::ListShapesResponse* resp) {
  return Reply(ctx, Guarded("list-shapes", "-", [&] {
                 grpc::Status auth = CheckAuth(ctx, false);
                 if (!auth.ok()) return auth;
                 for (const auto& e : serving_.Shapes()) *resp->add_shapes() = ToProto(e);
                 return grpc::Status::OK;
               }));
}

grpc::ServerUnaryReactor* AmoebaService::GetModelInfo(grpc::CallbackServerContext* ctx,
                                                      const v1::GetModelInfoRequest*,
                                                      v1::ModelInfo* resp) {
  return Reply(ctx, Guarded("model-info", "-", [&] {
                 grpc::Status auth = CheckAuth(ctx, false);
                 if (!auth.ok()) return auth;
                 const ModelConfig& c = serving_.supernet().base().config;
                 resp->set_model_type("llama");
                 resp->set_num_layers(static_cast<int32_t>(c.num_hidden_layers));
                 resp->set_hidden_size(static_cast<int32_t>(c.hidden_size));
                 resp->set_vocab_size(static_cast<int32_t>(c.vocab_size));
                 for (int64_t d : serving_.supernet().spec().depths)
                   resp->add_depths(static_cast<int32_t>(d));
                 for (double w : serving_.supernet().spec().widths) resp->add_widths(w);
                 resp->set_has_adapters(serving_.smol() != nullptr);
                 resp->set_tokenizer(serving_.supernet().tokenizer()
                                         ? serving_.supernet().tokenizer()->kind()
                                         : "");
                 resp->set_max_context_tokens(
                     static_cast<int32_t>(serving_.options().limits.max_prompt_tokens));
                 resp->set_weights_dtype(serving_.options().weights_dtype);
                 return grpc::Status::OK;
               }));
}

grpc::ServerUnaryReactor* AmoebaService::Tokenize(grpc::CallbackServerContext* ctx,
                                                  const v1::TokenizeRequest* req,
                                                  v1::TokenizeResponse* resp) {
  return Reply(
      ctx, Guarded("tokenize", "-", [&] {
        grpc::Status auth = CheckAuth(ctx, false);
        if (!auth.ok()) return auth;
        // Bounded before any work: the text's size decides the memory tokenising takes.
        if (static_cast<int64_t>(req->text().size()) > serving_.options().limits.max_prompt_bytes) {
          return ToGrpc(
              InvalidField("text", absl::StrCat(req->text().size(), " bytes exceed the limit of ",
                                                serving_.options().limits.max_prompt_bytes)));
        }
        if (!IsValidUtf8(req->text())) return ToGrpc(InvalidField("text", "not valid UTF-8"));
        const Tokenizer& tok = *serving_.supernet().tokenizer();
        if (req->has_add_bos() && req->add_bos())
          resp->add_ids(static_cast<int32_t>(serving_.supernet().base().config.bos_token_id));
        for (int32_t id : tok.Encode(req->text())) resp->add_ids(id);
        for (int32_t id : resp->ids()) {
          // Pieces as text: a byte token that is part of a character becomes U+FFFD (proto strings
          // are UTF-8).
          const std::string& b = tok.TokenBytes(id);
          resp->add_pieces(IsValidUtf8(b) ? b : std::string("\xEF\xBF\xBD"));
        }
        return grpc::Status::OK;
      }));
}

grpc::ServerWriteReactor<v1::FileChunk>* AmoebaService::ExportSubnet(
    grpc::CallbackServerContext* ctx, const v1::ExportSubnetRequest* req) {
  return new ExportReactor(this, ctx, req);
}

}  // namespace amoeba
