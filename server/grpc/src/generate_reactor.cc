#include <deque>
#include <mutex>

#include "grpc_status.h"
#include "proto_convert.h"
#include "reactors.h"

namespace amoeba {
namespace {

class GenerateReactor : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  GenerateReactor(Serving& serving, grpc::CallbackServerContext* ctx,
                  const v1::GenerateRequest* req)
      : ctx_(ctx) {
    auto g = serving.Prepare(GenerationRequestFromProto(*req), ContextOf(ctx));
    if (!g.ok()) {
      FinishNow(ToGrpc(g.status()));
      return;
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      generation_ = *g;
    }
    id_ = (*g)->request_id();
    shape_ = (*g)->shape();
    load_plan_ = (*g)->load_plan();
    draft_tokens_ = (*g)->draft_tokens();
    GenerationCallbacks cb;
    // Log-probabilities wait for the message of their token (the scheduler thread calls both).
    cb.on_logprobs = [this](const TokenLogprobs& lp) { AddLogprobs(lp, logprobs_); };
    cb.on_prompt_logprobs = [this](const TokenLogprobs& lp) { AddLogprobs(lp, prompt_logprobs_); };
    cb.on_token = [this](int32_t token, std::string_view text) {
      v1::GenerateResponse r;
      r.set_request_id(id_);
      r.mutable_logprobs()->Swap(&logprobs_);
      r.mutable_prompt_logprobs()->Swap(&prompt_logprobs_);
      if (token >= 0) r.add_token_ids(token);
      r.set_text(std::string(text));
      if (!sent_shape_) {
        sent_shape_ = true;
        SetShape(shape_, r.mutable_shape());
        SetLoadPlan(r);
      }
      Enqueue(std::move(r), false);
    };
    cb.on_done = [this](const JobResult& res) { Done(res); };
    const absl::Status st = serving.Start(*g, std::move(cb));
    if (!st.ok()) FinishNow(ToGrpc(st));
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> l(mu_);
    writing_ = false;
    if (!ok) {
      broken_ = true;
      if (generation_) generation_->Cancel();
      pending_.clear();
    } else {
      pending_.pop_front();
    }
    Pump(l);
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> l(mu_);
    if (generation_) generation_->Cancel();
  }

  void OnDone() override { delete this; }

 private:
  static void AddLogprobs(const TokenLogprobs& lp,
                          google::protobuf::RepeatedPtrField<v1::TokenLogprob>& to) {
    v1::TokenLogprob* p = to.Add();
    p->set_token_id(lp.token);
    p->set_logprob(lp.logprob);
    for (const auto& [id, v] : lp.top) {
      v1::TopLogprob* t = p->add_top();
      t->set_token_id(id);
      t->set_logprob(v);
    }
  }

  void SetLoadPlan(v1::GenerateResponse& r) const {
    if (!load_plan_) return;
    v1::LoadPlan* p = r.mutable_load_plan();
    SetShape(load_plan_->idle_choice, p->mutable_idle_choice());
    p->set_idle_decode_ms(load_plan_->idle_decode_ms);
    p->set_predicted_decode_ms(load_plan_->predicted_decode_ms);
    p->set_sequences_in_flight(load_plan_->sequences_in_flight);
    p->set_load_changed_choice(load_plan_->load_changed_choice);
  }

  void Done(const JobResult& res) {
    v1::GenerateResponse r;
    r.set_request_id(id_);
    r.mutable_logprobs()->Swap(&logprobs_);
    r.mutable_prompt_logprobs()->Swap(&prompt_logprobs_);
    r.set_finish_reason(ToProto(res.reason));
    r.mutable_usage()->set_prompt_tokens(static_cast<int32_t>(res.prompt_tokens));
    r.mutable_usage()->set_completion_tokens(static_cast<int32_t>(res.completion_tokens));
    r.mutable_usage()->set_cached_prompt_tokens(static_cast<int32_t>(res.cached_tokens));
    auto* t = r.mutable_timings();
    t->set_queue_ms(res.queue_ms);
    t->set_time_to_first_token_ms(res.ttft_ms);
    t->set_total_ms(res.total_ms);
    const double decode_ms = res.total_ms - res.ttft_ms;
    t->set_decode_tokens_per_s(res.completion_tokens > 1 && decode_ms > 0
                                   ? (res.completion_tokens - 1) * 1000.0 / decode_ms
                                   : 0);
    SetShape(shape_, r.mutable_shape());
    SetLoadPlan(r);
    if (res.draft) {
      auto* sp = r.mutable_speculation();
      SetShape(*res.draft, sp->mutable_draft());
      sp->set_draft_tokens(static_cast<int32_t>(draft_tokens_));
      sp->set_drafted_tokens(static_cast<int32_t>(res.drafted_tokens));
      sp->set_accepted_tokens(static_cast<int32_t>(res.accepted_tokens));
      sp->set_checks(static_cast<int32_t>(res.draft_rounds));
      sp->set_mean_accepted(res.draft_rounds > 0 ? static_cast<double>(res.accepted_tokens) /
                                                       static_cast<double>(res.draft_rounds)
                                                 : 0.0);
    }
    grpc::Status final = grpc::Status::OK;
    if (res.reason == FinishReason::kError)
      final = ToGrpc(res.error.ok() ? absl::InternalError("generation failed") : res.error);
    if (res.reason == FinishReason::kCancelled && ctx_->IsCancelled())
      final = grpc::Status::CANCELLED;
    if (res.reason == FinishReason::kTimeLimit &&
        ctx_->deadline() <= std::chrono::system_clock::now()) {
      final =
          grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline exceeded during generation");
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      final_status_ = final;
    }
    Enqueue(std::move(r), true);
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
      const v1::GenerateResponse* msg = &pending_.front();  // deque: stable while others append
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

  // Before the core took the request: nothing else will call into this reactor.
  void FinishNow(const grpc::Status& s) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (finished_) return;
      finished_ = true;
    }
    Finish(s);
  }

  grpc::CallbackServerContext* ctx_;
  std::string id_;
  Shape shape_;
  std::optional<LoadPlan> load_plan_;
  int64_t draft_tokens_ = 0;
  // Scheduler thread only: log-probabilities of tokens whose message is not made yet.
  google::protobuf::RepeatedPtrField<v1::TokenLogprob> logprobs_, prompt_logprobs_;
  std::mutex mu_;
  std::shared_ptr<Generation> generation_;
  std::deque<v1::GenerateResponse> pending_;
  bool writing_ = false, done_ = false, finished_ = false, broken_ = false, sent_shape_ = false;
  grpc::Status final_status_;
};

}  // namespace

grpc::ServerWriteReactor<v1::GenerateResponse>* NewGenerateReactor(Serving& serving,
                                                                   grpc::CallbackServerContext* ctx,
                                                                   const v1::GenerateRequest* req) {
  return new GenerateReactor(serving, ctx, req);
}

}  // namespace amoeba
