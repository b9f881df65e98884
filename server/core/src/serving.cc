#include "server/serving.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/errors.h"
#include "model/json_schema_grammar.h"
#include "model/status_macros.h"
#include "model/tokenizer.h"
#include "model/weight_format.h"
#include "server/metrics.h"
#include "server/request_checks.h"
#include "server/scheduler.h"
#include "subnet/export.h"
#include "subnet/speculation.h"
#include "subnet/subnet_builder.h"
#include "subnet/supernet.h"

namespace amoeba {
namespace fs = std::filesystem;

namespace {

// Runs `fn`; an exception becomes a status (the one mapping, model/errors.h) and is logged with
// the request id. Every public method that does work goes through it.
template <typename Fn>
auto Guarded(const char* what, std::string_view id, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (...) {
    absl::Status st = StatusFromException(std::current_exception(), what);
    spdlog::error("[{}] {}", id, LogSafe(std::string(st.message()), 300));
    if (st.code() == absl::StatusCode::kInternal)  // the detail stays in the log
      st = absl::InternalError(absl::StrCat(what, " failed (request ", std::string(id), ")"));
    return st;
  }
}

ModelInfo MakeInfo(const Supernet& s, const Smol* smol, const ServiceOptions& o) {
  ModelInfo m;
  const ModelConfig& c = s.base().config;
  m.num_layers = c.num_hidden_layers;
  m.hidden_size = c.hidden_size;
  m.vocab_size = c.vocab_size;
  m.bos_token_id = c.bos_token_id;
  m.depths = s.spec().depths;
  m.widths = s.spec().widths;
  m.grid = s.GridShapes();
  m.full = s.FullShape();
  m.smallest = s.SmallestShape();
  m.has_adapters = smol != nullptr;
  m.tokenizer = s.tokenizer() ? s.tokenizer()->kind() : "";
  m.max_context_tokens = o.limits.max_prompt_tokens;
  m.weights_dtype = WeightFormatName(o.weights_format);
  return m;
}

}  // namespace

Generation::Generation(std::shared_ptr<Job> job) : job_(std::move(job)) {}
const std::string& Generation::request_id() const {
  return job_->request_id;
}
const Shape& Generation::shape() const {
  return job_->shape;
}
int64_t Generation::prompt_tokens() const {
  return static_cast<int64_t>(job_->prompt.size());
}
const std::vector<int32_t>& Generation::prompt() const {
  return job_->prompt;
}
int64_t Generation::max_new_tokens() const {
  return job_->gen.max_new_tokens;
}
const std::optional<LoadPlan>& Generation::load_plan() const {
  return job_->load_plan;
}
int64_t Generation::draft_tokens() const {
  return job_->draft ? job_->draft_tokens : 0;
}
void Generation::Cancel() {
  job_->cancelled = true;
}

Serving::Serving(const Supernet& supernet, const Smol* smol, Scheduler& scheduler, Metrics* metrics,
                 ServiceOptions options, HostSpeed host, std::vector<ShapeProfile> profiles)
    : supernet_(supernet),
      smol_(smol),
      scheduler_(scheduler),
      metrics_(metrics),
      options_(std::move(options)),
      host_(host),
      profiles_(std::move(profiles)),
      info_(MakeInfo(supernet_, smol_, options_)),
      export_dir_(options_.export_tmp_dir.empty() ? fs::temp_directory_path().string()
                                                  : options_.export_tmp_dir),
      export_workers_(options_.export_workers) {
  RemoveStaleStagingDirs(export_dir_);
  if (metrics_) gauges_ = std::thread([this] { PublishGauges(); });
}

Serving::~Serving() {
  {
    std::lock_guard<std::mutex> l(gauges_mu_);
    stop_gauges_ = true;
  }
  gauges_cv_.notify_all();
  if (gauges_.joinable()) gauges_.join();
}

void Serving::PublishGauges() {
  std::unique_lock<std::mutex> l(gauges_mu_);
  while (!stop_gauges_) {
    const SchedulerStats s = scheduler_.stats();
    metrics_->SetGlobal(s.waiting, s.cache_bytes, s.kv_bytes, s.cache_hits, s.cache_misses,
                        s.lanes);
    metrics_->SetPromptCache(s.prompt_cache_bytes, s.prompt_cache_blocks,
                             s.prompt_tokens_prefilled);
    metrics_->SetLanes({.merged_lanes = s.merged_lanes,
                        .merges_built = s.merges_built,
                        .evictions = s.evictions,
                        .merged_lane_steps_on_views = s.merged_lane_steps_on_views,
                        .build_failures = s.build_failures,
                        .lane_failures = s.lane_failures});
    gauges_cv_.wait_for(l, std::chrono::milliseconds(500), [&] { return stop_gauges_; });
  }
}

absl::StatusOr<std::string> Serving::AssignRequestId(std::string_view client_id) {
  RETURN_IF_ERROR(ValidateRequestId(client_id));
  if (!client_id.empty()) return std::string(client_id);
  return absl::StrCat("req-", next_id_++);
}

absl::Status Serving::CheckAuth(const RequestContext& ctx, bool export_call) const {
  if (options_.auth_token.empty()) {
    if (export_call && !options_.allow_unauthenticated_export) {
      return absl::PermissionDeniedError(
          "exports are disabled: the server has no --auth-token (an operator may pass "
          "--allow-unauthenticated-export)");
    }
    return absl::OkStatus();
  }
  if (!export_call && !options_.token_for_all) return absl::OkStatus();
  return CheckBearerToken(ctx.authorization, options_.auth_token);
}

absl::StatusOr<Shape> Serving::ValidShape(Shape s) const {
  if (s.width == 0) s.width = 1.0;  // unset width: full
  if (s.depth == 0) s.depth = info_.num_layers;
  RETURN_IF_ERROR(supernet_.Validate(s));
  return s;
}

absl::StatusOr<Shape> Serving::ParseShape(std::string_view text) const {
  if (text.empty()) return absl::InvalidArgumentError("shape: empty");
  ASSIGN_OR_RETURN(Shape s, Shape::Parse(std::string(text), info_.num_layers));
  return ValidShape(s);
}

void Serving::SetDraining() {
  draining_ = true;
}

absl::StatusOr<std::shared_ptr<Generation>> Serving::Prepare(const GenerationRequest& r,
                                                             const RequestContext& ctx) {
  auto id = AssignRequestId(r.request_id);
  if (!id.ok()) {
    spdlog::warn("[-] generate: rejected: {}", LogSafe(std::string(id.status().message()), 200));
    return id.status();
  }
  absl::StatusOr<std::shared_ptr<Generation>> out =
      Guarded("generate", *id, [&]() -> absl::StatusOr<std::shared_ptr<Generation>> {
        if (options_.fault_hook) options_.fault_hook("prepare");
        RETURN_IF_ERROR(CheckAuth(ctx, false));
        if (draining_) return absl::UnavailableError("server is draining");
        ASSIGN_OR_RETURN(std::shared_ptr<Job> job, PrepareJob(r, *id));
        if (ctx.deadline && *ctx.deadline != std::chrono::system_clock::time_point::max()) {
          const auto left = std::clamp<std::chrono::system_clock::duration>(
              *ctx.deadline - std::chrono::system_clock::now(),
              std::chrono::system_clock::duration::zero(), std::chrono::hours(24));
          job->deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(left);
        }
        return std::make_shared<Generation>(std::move(job));
      });
  if (!out.ok())
    spdlog::warn("[{}] generate: rejected: {} {}", *id,
                 absl::StatusCodeToString(out.status().code()),
                 LogSafe(std::string(out.status().message()), 200));
  return out;
}

absl::Status Serving::Start(const std::shared_ptr<Generation>& g, GenerationCallbacks cb) {
  return StartAll({g}, [&cb](int) { return std::move(cb); });
}

absl::Status Serving::StartAll(const std::vector<std::shared_ptr<Generation>>& gens,
                               const std::function<GenerationCallbacks(int)>& callbacks) {
  std::vector<std::shared_ptr<Job>> jobs;
  for (size_t i = 0; i < gens.size(); ++i) {
    Attach(*gens[i]->job_, callbacks(static_cast<int>(i)));
    jobs.push_back(gens[i]->job_);
  }
  absl::Status st =
      Guarded("generate", jobs.front()->request_id, [&] { return scheduler_.Submit(jobs); });
  if (!st.ok()) {
    for (const auto& job : jobs) {
      spdlog::warn("[{}] generate: not queued: {}", job->request_id,
                   LogSafe(std::string(st.message()), 200));
      job->on_token = nullptr;  // never called: the front end's state may go with this error
      job->on_logprobs = nullptr;
      job->on_prompt_logprobs = nullptr;
      job->on_done = nullptr;
    }
  }
  return st;
}

void Serving::Attach(Job& job, GenerationCallbacks cb) {
  const std::string shape_name = job.shape.ToString();
  // Inter-token latency: the time between a request's tokens as the scheduler hands them out.
  struct TokenClock {
    bool have_last = false;
    Clock::time_point last;
  };
  auto clock = std::make_shared<TokenClock>();
  job.on_logprobs = std::move(cb.on_logprobs);
  job.on_prompt_logprobs = std::move(cb.on_prompt_logprobs);
  job.on_token = [this, clock, shape_name, on_token = std::move(cb.on_token)](
                     int32_t token, std::string_view text) {
    const auto now = Clock::now();
    if (clock->have_last && metrics_)
      metrics_->ObserveInterToken(shape_name,
                                  std::chrono::duration<double>(now - clock->last).count());
    clock->have_last = true;
    clock->last = now;
    if (on_token) on_token(token, text);
  };
  const int64_t draft_tokens = job.draft_tokens;
  job.on_done = [this, shape_name, id = job.request_id, draft_tokens,
                 on_done = std::move(cb.on_done)](const JobResult& res) {
    if (metrics_) {
      metrics_->ObserveRequest(shape_name, FinishReasonName(res.reason), res.queue_ms / 1e3,
                               res.ttft_ms / 1e3, res.total_ms / 1e3, res.prompt_tokens,
                               res.completion_tokens, res.cached_tokens);
    }
    spdlog::info(
        "[{}] generate: {} finish={} prompt={} cached={} completion={} ttft={:.1f}ms "
        "total={:.1f}ms{}{}",
        id, shape_name, FinishReasonName(res.reason), res.prompt_tokens, res.cached_tokens,
        res.completion_tokens, res.ttft_ms, res.total_ms,
        res.draft ? absl::StrCat(" draft=", res.draft->ToString(), "x", draft_tokens,
                                 " accepted=", res.accepted_tokens, "/", res.drafted_tokens)
                  : std::string(),
        res.reason == FinishReason::kError
            ? absl::StrCat(" error=", LogSafe(std::string(res.error.message()), 200))
            : std::string());
    if (on_done) on_done(res);
  };
  spdlog::info("[{}] generate: shape {} prompt {} tokens max_new {}", job.request_id, shape_name,
               job.prompt.size(), job.gen.max_new_tokens);
}

absl::StatusOr<TokenizeResult> Serving::Tokenize(const TokenizeRequest& r,
                                                 const RequestContext& ctx) {
  ASSIGN_OR_RETURN(const std::string id, AssignRequestId(r.request_id));
  return Guarded("tokenize", id, [&]() -> absl::StatusOr<TokenizeResult> {
    if (options_.fault_hook) options_.fault_hook("tokenize");
    RETURN_IF_ERROR(CheckAuth(ctx, false));
    // Bounded before any work: the text's size decides the memory tokenising takes.
    if (static_cast<int64_t>(r.text.size()) > options_.limits.max_prompt_bytes) {
      return InvalidField("text", absl::StrCat(r.text.size(), " bytes exceed the limit of ",
                                               options_.limits.max_prompt_bytes));
    }
    if (!IsValidUtf8(r.text)) return InvalidField("text", "not valid UTF-8");
    const Tokenizer& tok = *supernet_.tokenizer();
    TokenizeResult out;
    if (r.add_bos) out.ids.push_back(static_cast<int32_t>(info_.bos_token_id));
    for (int32_t t : tok.Encode(r.text)) out.ids.push_back(t);
    for (int32_t t : out.ids) out.pieces.push_back(TokenPiece(t));
    return out;
  });
}

const std::string& Serving::TokenBytes(int32_t id) const {
  return supernet_.tokenizer()->TokenBytes(id);
}

std::string Serving::TokenPiece(int32_t id) const {
  // A byte token that is part of a character becomes U+FFFD (the pieces are UTF-8).
  const std::string& b = TokenBytes(id);
  return IsValidUtf8(b) ? b : std::string("\xEF\xBF\xBD");
}

absl::StatusOr<std::string> Serving::Detokenize(const DetokenizeRequest& r,
                                                const RequestContext& ctx) {
  ASSIGN_OR_RETURN(const std::string id, AssignRequestId(r.request_id));
  return Guarded("detokenize", id, [&]() -> absl::StatusOr<std::string> {
    RETURN_IF_ERROR(CheckAuth(ctx, false));
    if (static_cast<int64_t>(r.ids.size()) > options_.limits.max_prompt_tokens)
      return InvalidField("tokens", absl::StrCat(r.ids.size(), " ids exceed the limit of ",
                                                 options_.limits.max_prompt_tokens));
    for (size_t i = 0; i < r.ids.size(); ++i)
      if (r.ids[i] < 0 || r.ids[i] >= info_.vocab_size)
        return InvalidField(absl::StrCat("tokens[", i, "]"),
                            absl::StrCat("not in the vocabulary [0, ", info_.vocab_size, ")"));
    return supernet_.tokenizer()->Decode(r.ids);
  });
}

absl::StatusOr<PlanResult> Serving::Plan(const PlanBudget& b, const RequestContext& ctx) const {
  RETURN_IF_ERROR(CheckAuth(ctx, false));
  RETURN_IF_ERROR(ValidateBudget(b));
  const std::string& id = ctx.request_id.empty() ? std::string("-") : ctx.request_id;
  auto p = Guarded("plan", id, [&]() -> absl::StatusOr<PlanResult> {
    ASSIGN_OR_RETURN(PlanResult r, PlanShape(profiles_, b, host_));
    // A decode target here is planned as a generate request with it would be: against the load
    // and within the headroom, so that plan and generate name the same shape.
    ASSIGN_OR_RETURN(std::optional<LoadChoice> choice, ChooseUnderLoad(b));
    if (!choice) return r;
    const double headroom = scheduler_.options().budget_headroom;
    if (choice->estimate.profile.shape == r.chosen.profile.shape) {
      absl::StrAppendFormat(&r.explanation,
                            "; predicted %.2f ms/token at the current load (%d sequences in "
                            "flight), within the %.0f%% of the target the server plans for",
                            choice->plan.predicted_decode_ms, choice->plan.sequences_in_flight,
                            100 * headroom);
      return r;
    }
    r.explanation = absl::StrFormat(
        "%s: the best shape within the budget predicted to decode within %.0f%% of the %.2f "
        "ms/token target (the margin the server plans for) at the current load: %.2f ms/token "
        "with %d sequences in flight; idle, %s would be chosen (%.2f ms/token)",
        choice->estimate.profile.shape.ToString(), 100 * headroom, *b.max_decode_ms_per_token,
        choice->plan.predicted_decode_ms, choice->plan.sequences_in_flight,
        r.chosen.profile.shape.ToString(), r.chosen.decode_ms);
    r.chosen = choice->estimate;
    return r;
  });
  if (p.ok()) spdlog::info("[{}] plan: {}", id, p->explanation);
  return p;
}

absl::StatusOr<ExportPlanResult> Serving::PlanExport(const PlanBudget& b,
                                                     const RequestContext& ctx) const {
  RETURN_IF_ERROR(CheckAuth(ctx, false));
  RETURN_IF_ERROR(ValidateBudget(b));
  const std::string& id = ctx.request_id.empty() ? std::string("-") : ctx.request_id;
  auto p = Guarded("plan", id, [&] { return amoeba::PlanExport(profiles_, b, host_); });
  if (p.ok()) spdlog::info("[{}] plan export: {}", id, p->explanation);
  return p;
}

absl::StatusOr<std::vector<ShapeEstimateResult>> Serving::Shapes(const RequestContext& ctx) const {
  RETURN_IF_ERROR(CheckAuth(ctx, false));
  return Guarded("shapes", "-", [&]() -> absl::StatusOr<std::vector<ShapeEstimateResult>> {
    return EstimateAll(profiles_, PlanBudget{}, host_);
  });
}

absl::StatusOr<std::string> Serving::StartExport(const ExportRequest& r, const RequestContext& ctx,
                                                 std::shared_ptr<std::atomic<bool>> cancelled,
                                                 ExportReady ready) {
  ASSIGN_OR_RETURN(std::string id, AssignRequestId(r.request_id));
  absl::Status st = Guarded("export", id, [&]() -> absl::Status {
    RETURN_IF_ERROR(CheckAuth(ctx, true));
    ExportOptions o;
    o.uniform_width = r.uniform_width;
    o.adapters = r.adapters;
    RETURN_IF_ERROR(ParseExportFormat(r.format, r.dtype, o));
    ASSIGN_OR_RETURN(const Shape shape, ValidShape(r.shape));
    // Cheap checks here, so a bad shape never takes a worker.
    RETURN_IF_ERROR(ValidateSubnetShape(supernet_, smol_, shape, SubnetOptionsForExport(o)));
    return export_workers_.TrySubmit(
        [this, o, shape, id, cancelled, ready = std::move(ready)]() -> ExportWorkers::Delivery {
          // Shared: a std::function must be copyable, the stream is not.
          auto result = std::make_shared<absl::StatusOr<std::unique_ptr<ExportStream>>>(
              Guarded("export", id, [&] { return WriteExport(o, shape, id, *cancelled); }));
          return [ready, result] { ready(std::move(*result)); };
        });
  });
  if (!st.ok()) {
    spdlog::warn("[{}] export: {} {}", id, absl::StatusCodeToString(st.code()),
                 LogSafe(std::string(st.message()), 200));
    return st;
  }
  return id;
}

absl::StatusOr<std::unique_ptr<ExportStream>> Serving::WriteExport(
    const ExportOptions& o, const Shape& shape, const std::string& id,
    const std::atomic<bool>& cancelled) {
  const absl::Status kCancelled = absl::CancelledError("export cancelled");
  if (cancelled) return kCancelled;
  if (options_.fault_hook) options_.fault_hook("export");
  const auto t0 = Clock::now();
  ASSIGN_OR_RETURN(Model sub, SubnetForExport(supernet_, smol_, shape, o));
  auto dir = MakeStagingDir(export_dir_);
  if (!dir.ok()) {
    spdlog::error("[{}] export: {} in {}", id, std::string(dir.status().message()), export_dir_);
    return absl::InternalError("export failed: no staging directory");
  }
  // Every return but the last removes the staging directory; the stream owns it after that.
  struct RemoveOnExit {
    std::string dir;
    ~RemoveOnExit() {
      std::error_code ec;
      if (!dir.empty()) fs::remove_all(dir, ec);
    }
  } staging{*dir};
  if (cancelled) return kCancelled;
  const fs::path out = fs::path(*dir) / "model";
  std::error_code ec;
  fs::create_directories(out, ec);
  absl::Status w =
      ec ? absl::InternalError(
               absl::StrCat("cannot create ", out.string(), ": ", std::string(ec.message())))
      : o.format == ExportOptions::Format::kGguf
          ? WriteGgufExport(supernet_, sub, shape, (out / "model.gguf").string(), o.gguf_dtype)
          : amoeba::WriteExport(supernet_, sub, out.string(), o);
  if (!w.ok()) {
    // The detail names server paths: it goes to the log, the client gets the request id.
    spdlog::error("[{}] export: {}", id, w.ToString());
    return absl::InternalError(
        absl::StrCat("export failed (request ", id, "; see the server log)"));
  }
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(out)) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  staging.dir.clear();
  spdlog::info("[{}] export: {}{} written in {:.0f} ms ({} files)", id, shape.ToString(),
               smol_ && o.adapters ? " with adapters merged" : "",
               std::chrono::duration<double, std::milli>(Clock::now() - t0).count(), files.size());
  auto stream = std::make_unique<ExportStream>(id, *dir, std::move(files));
  if (options_.fault_hook)
    stream->set_fault_hook([hook = options_.fault_hook] { hook("export-stream"); });
  return stream;
}

absl::StatusOr<std::optional<Serving::LoadChoice>> Serving::ChooseUnderLoad(
    const PlanBudget& budget) const {
  // Load matters for a decode target on this host, where every running sequence shares a step.
  const bool on_this_host = !budget.bandwidth_gbs && !budget.compute_gflops;
  if (!budget.max_decode_ms_per_token || !on_this_host || !options_.plan_under_load ||
      !scheduler_.options().shared_steps)
    return std::nullopt;
  const double target = *budget.max_decode_ms_per_token;
  const double headroom = scheduler_.options().budget_headroom;
  const std::vector<ShapeEstimateResult> fitting = FittingShapes(profiles_, budget, host_);
  // Nothing fits even idle: PlanShape's error names the smallest shape's cost.
  if (fitting.empty()) return PlanShape(profiles_, budget, host_).status();
  const ShapeEstimateResult& idle = fitting.front();  // what PlanShape picks
  LoadEstimate last;
  double predicted = 0, limit = 0;
  for (const ShapeEstimateResult& e : fitting) {
    last = scheduler_.EstimateLoad(e.profile.shape);
    // Nothing in flight: the idle profile is the measure (the model has little to go on).
    predicted = last.sequences == 0 ? e.decode_ms : last.decode_ms;
    limit = headroom * std::min(target, last.tightest_target_ms.value_or(target));
    // A full lane means waiting in the queue first: the target would be missed there.
    if (predicted > limit || last.free_slots <= 0) continue;
    LoadChoice c{.estimate = e, .plan = {}};
    c.plan.idle_choice = idle.profile.shape;
    c.plan.idle_decode_ms = idle.decode_ms;
    c.plan.predicted_decode_ms = predicted;
    c.plan.sequences_in_flight = last.sequences;
    c.plan.load_changed_choice = !(e.profile.shape == idle.profile.shape);
    return c;
  }
  // The numbers the last (smallest) shape was refused on: its prediction and the limit.
  const ShapeEstimateResult& smallest = fitting.back();
  return absl::ResourceExhaustedError(absl::StrFormat(
      "budget.max_decode_ms_per_token: no shape is predicted to decode within %.2f ms/token at "
      "the current load (%d sequences running or waiting): the server plans for %.0f%% of a "
      "target%s, since steps vary around their predicted time; the smallest shape that fits the "
      "budget, %s, is predicted at %.2f ms/token%s; retry later or raise the target",
      limit, last.sequences, 100 * headroom,
      last.tightest_target_ms && *last.tightest_target_ms < target
          ? absl::StrFormat(" (here of %.2f ms/token, promised to a running request, not of your "
                            "%.2f)",
                            *last.tightest_target_ms, target)
          : absl::StrFormat(" (of %.2f ms/token)", target),
      smallest.profile.shape.ToString(), predicted,
      last.free_slots <= 0 ? ", and its slots are all taken" : ""));
}

absl::StatusOr<Shape> Serving::ResolveTarget(const std::optional<Shape>& shape,
                                             const std::optional<PlanBudget>& budget,
                                             std::optional<LoadPlan>* plan) const {
  if (shape) {
    Shape s = *shape;
    if (s.width == 0) s.width = 1.0;  // unset width: full
    if (s.depth == 0) s.depth = supernet_.base().config.num_hidden_layers;
    RETURN_IF_ERROR(supernet_.Validate(s));
    return s;
  }
  if (!budget) return supernet_.FullShape();
  ASSIGN_OR_RETURN(std::optional<LoadChoice> choice, ChooseUnderLoad(*budget));
  if (!choice) {
    ASSIGN_OR_RETURN(PlanResult p, PlanShape(profiles_, *budget, host_));
    return p.chosen.profile.shape;
  }
  if (plan) *plan = choice->plan;
  return choice->estimate.profile.shape;
}

absl::StatusOr<std::shared_ptr<Grammar>> Serving::GrammarFor(const GenerationRequest& r) const {
  constexpr size_t kCachedGrammars = 64;
  std::string gbnf;
  if (r.grammar) {
    gbnf = *r.grammar;
  } else if (r.json_schema) {
    ASSIGN_OR_RETURN(gbnf, JsonSchemaToGbnf(*r.json_schema));
  } else if (r.json_object) {
    gbnf = JsonObjectGbnf();
  } else {
    return std::shared_ptr<Grammar>();
  }
  std::shared_ptr<const TokenTrie> trie;
  {
    std::lock_guard<std::mutex> lock(grammars_mu_);
    auto it = grammars_.find(gbnf);
    if (it != grammars_.end()) return it->second;
    // The vocabulary's trie is made by the first request with a grammar, not at start-up.
    if (!token_trie_) {
      const auto& eos = supernet_.base().config.eos_token_ids;
      token_trie_ = std::make_shared<TokenTrie>(*supernet_.tokenizer(),
                                                std::vector<int64_t>(eos.begin(), eos.end()));
    }
    trie = token_trie_;
  }
  const auto t0 = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(std::shared_ptr<Grammar> g, Grammar::Compile(gbnf, trie));
  spdlog::debug(
      "grammar compiled: {} rules, {} bytes of GBNF, {:.2f} ms", g->stats().rules, gbnf.size(),
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  std::lock_guard<std::mutex> lock(grammars_mu_);
  if (grammars_.emplace(gbnf, g).second) grammar_order_.push_back(gbnf);
  if (grammar_order_.size() > kCachedGrammars) {
    grammars_.erase(grammar_order_.front());
    grammar_order_.erase(grammar_order_.begin());
  }
  return g;
}

absl::StatusOr<std::shared_ptr<Job>> Serving::PrepareJob(const GenerationRequest& r,
                                                         const std::string& id) const {
  RETURN_IF_ERROR(
      ValidateGenerationRequest(r, options_.limits, supernet_.base().config.vocab_size));
  std::optional<LoadPlan> load_plan;
  ASSIGN_OR_RETURN(Shape shape, ResolveTarget(r.shape, r.budget, &load_plan));
  auto job = std::make_shared<Job>();
  job->request_id = id;
  job->shape = shape;
  job->load_plan = load_plan;
  if (r.budget && r.budget->max_decode_ms_per_token)
    job->decode_target_ms = *r.budget->max_decode_ms_per_token;
  if (r.tokens) {
    job->prompt = *r.tokens;
  } else {
    if (r.add_bos)
      job->prompt.push_back(static_cast<int32_t>(supernet_.base().config.bos_token_id));
    for (int32_t t : supernet_.tokenizer()->Encode(*r.text)) job->prompt.push_back(t);
  }
  if (static_cast<int64_t>(job->prompt.size()) > options_.limits.max_prompt_tokens) {
    return InvalidField("prompt", absl::StrCat(job->prompt.size(), " tokens exceed the limit of ",
                                               options_.limits.max_prompt_tokens));
  }
  job->gen.sampling.temperature = r.temperature.value_or(0.f);
  job->gen.sampling.top_k = r.top_k.value_or(0);
  job->gen.sampling.top_p = r.top_p.value_or(1.f);
  job->gen.sampling.repetition_penalty = r.repetition_penalty.value_or(1.f);
  job->gen.sampling.min_p = r.min_p.value_or(0.f);
  job->gen.sampling.presence_penalty = r.presence_penalty.value_or(0.f);
  job->gen.sampling.frequency_penalty = r.frequency_penalty.value_or(0.f);
  job->gen.sampling.logit_bias = r.logit_bias;
  job->gen.sampling.seed = r.seed.value_or(0);
  job->gen.max_new_tokens = r.max_new_tokens.value_or(128);
  job->gen.stop = r.stop;
  job->gen.time_limit_ms = r.time_limit_ms.value_or(0);
  job->priority = r.priority.value_or(0);
  job->gen.logprobs = r.logprobs.value_or(-1);
  job->gen.prompt_logprobs = r.prompt_logprobs;
  ASSIGN_OR_RETURN(job->gen.grammar, GrammarFor(r));
  std::string speculate = r.speculate.value_or(options_.speculate);
  if (!r.speculate && speculate != "auto" && speculate != "off") {
    // The server's default draft does not draft for itself.
    auto d = Shape::Parse(speculate, supernet_.base().config.num_hidden_layers);
    if (d.ok() && *d == shape) speculate = "off";
  }
  ASSIGN_OR_RETURN(auto draft, ResolveDraft(shape, speculate, r.draft_tokens));
  if (draft) {
    job->draft = draft->draft;
    job->draft_tokens = draft->tokens;
  }
  return job;
}

absl::StatusOr<std::optional<Serving::DraftPlan>> Serving::ResolveDraft(
    const Shape& target, const std::string& speculate, std::optional<int64_t> tokens) const {
  if (tokens && (*tokens < 1 || *tokens > kMaxDraftTokens))
    return InvalidField("draft_tokens", absl::StrCat("must be in [1, ", kMaxDraftTokens, "]"));
  // Decode costs on this host (the start-up profile), check costs scaled from eval's host.
  auto decode_ms = [&](const Shape& s) -> std::optional<double> {
    for (const ShapeProfile& p : profiles_)
      if (p.shape == s && p.measured_decode_ms) return *p.measured_decode_ms;
    const ShapeRecord* r = supernet_.spec().FindRecord(s);
    return r ? r->decode_ms_per_token : std::nullopt;
  };
  auto draft_ms = [&](const Shape& s) -> std::optional<double> {
    auto ms = decode_ms(s);
    if (!ms || !options_.draft_format || *options_.draft_format == options_.weights_format)
      return ms;
    const ShapeRecord* r = supernet_.spec().FindRecord(s);
    if (r && r->decode_ms_per_token) {
      auto it = r->decode_ms_by_dtype.find(WeightFormatName(*options_.draft_format));
      if (it != r->decode_ms_by_dtype.end()) return *ms * it->second / *r->decode_ms_per_token;
    }
    return *ms * BytesPerWeight(*options_.draft_format) / BytesPerWeight(options_.weights_format);
  };
  auto costs = [&](const Shape& t, const Shape& d) -> std::optional<DraftCosts> {
    const auto tm = decode_ms(t), dm = draft_ms(d);
    if (!tm || !dm) return std::nullopt;
    DraftCosts c{*tm, *dm, 0};
    const ShapeRecord* r = supernet_.spec().FindRecord(t);
    if (r && r->check_ms_per_extra_token && r->decode_ms_per_token)
      c.check_extra_ms = *r->check_ms_per_extra_token / *r->decode_ms_per_token * *tm;
    return c;
  };
  if (speculate == "off") return std::nullopt;
  if (speculate == "auto" || speculate.empty()) {
    auto c = ChooseDraft(supernet_.spec(), target, costs, options_.speculate_min_speedup);
    if (!c) return std::nullopt;
    return DraftPlan{c->draft, tokens.value_or(c->tokens)};
  }
  auto draft = Shape::Parse(speculate, supernet_.base().config.num_hidden_layers);
  if (!draft.ok())
    return InvalidField(
        "speculate", absl::StrCat("\"", speculate.substr(0, 64), "\" is not auto, off or a shape: ",
                                  std::string(draft.status().message())));
  if (absl::Status st = supernet_.Validate(*draft); !st.ok())
    return InvalidField("speculate", std::string(st.message()));
  if (*draft == target)
    return InvalidField("speculate", "the draft must be another shape than the target");
  return DraftPlan{*draft, tokens.value_or(ChooseDraftTokens(supernet_.spec(), target, *draft,
                                                             costs(target, *draft)))};
}

}  // namespace amoeba
