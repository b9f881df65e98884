// The serving core both front ends (gRPC and HTTP) call. It knows no protocol: a front end turns
// its wire format into the request types of server/request.h, calls one method here, and turns
// the answer back. Everything a request needs checked (ids, auth, limits, shapes), counted
// (metrics), logged or run (generation, tokenising, planning, exports) happens here, once.
//
// This header is free of ATen and of every protocol library: front ends include only it (and
// metrics.h, request.h, job_result.h, chat_template.h, export_job.h).
//
// Errors: every method returns absl::Status; none throws. Exceptions from the engine or the
// allocator are caught where the work runs (scheduler worker and builder threads, export workers,
// and each method here) and mapped by model/errors.h's StatusFromException.
#pragma once
#include <atomic>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "model/grammar.h"
#include "model/token_logprobs.h"
#include "model/weight_format.h"
#include "server/export_job.h"
#include "server/job_result.h"
#include "server/planner.h"
#include "server/request.h"

namespace amoeba {

class Supernet;
class Smol;
class Scheduler;
class Metrics;
struct Job;
struct ExportOptions;

struct ServiceOptions {
  ServiceLimits limits;
  std::string auth_token;      // when set, exports need "authorization: Bearer <token>"
  bool token_for_all = false;  // ... and so does every call but the health check
  // Without a token exports are refused unless the operator allows them explicitly.
  bool allow_unauthenticated_export = false;
  std::string export_tmp_dir;  // where exports are staged before streaming ("" = system temp)
  int export_workers = 1;      // exports at once; more are RESOURCE_EXHAUSTED
  WeightFormat weights_format = WeightFormat::kF32;  // the served panels (as the scheduler's)
  std::string speculate = "auto";      // requests that do not say: auto | off | a draft shape
  double speculate_min_speedup = 1.3;  // auto drafts only where the profile expects this much
  // Budget requests with a decode target are planned against the load in flight (shared steps):
  // smaller shapes under load, RESOURCE_EXHAUSTED when none can keep the target; false: the idle
  // profile alone.
  bool plan_under_load = true;
  // Drafts read their own copy in this format (SchedulerOptions::draft_format); unset = the
  // serving format. Their cost: this host's decode time of the shape scaled by the profile's
  // ratio for that format (eval --draft-weights-dtype), else by bytes per weight.
  std::optional<WeightFormat> draft_format;
  // Test-only fault injection: called with "prepare", "tokenize", "export" (on the export worker,
  // before writing) and "export-stream" (before each chunk is read); whatever it throws goes
  // through the error boundary of that work.
  std::function<void(const char* site)> fault_hook;
};

// What GetModelInfo and /v1/models say; fixed for the server's life.
struct ModelInfo {
  std::string model_type = "llama";
  int64_t num_layers = 0, hidden_size = 0, vocab_size = 0, bos_token_id = 0;
  std::vector<int64_t> depths;
  std::vector<double> widths;
  std::vector<Shape> grid;  // every (depth, width) of the grid
  Shape full, smallest;
  bool has_adapters = false;
  std::string tokenizer;  // "sentencepiece", "bpe", ...
  int64_t max_context_tokens = 0;
  std::string weights_dtype;
};

// A prepared generation: validated, its target resolved and its prompt tokenised. Serving::Start
// runs it; Cancel() may be called from any thread at any time (also before Start).
class Generation {
 public:
  explicit Generation(std::shared_ptr<Job> job);
  const std::string& request_id() const;
  const Shape& shape() const;
  int64_t prompt_tokens() const;
  const std::vector<int32_t>& prompt() const;  // the prompt's token ids (BOS included)
  int64_t max_new_tokens() const;
  int64_t draft_tokens() const;  // 0: no speculative decoding
  // Budget requests planned against the load in flight: how (else none).
  const std::optional<LoadPlan>& load_plan() const;
  void Cancel();

 private:
  friend class Serving;
  std::shared_ptr<Job> job_;
};

struct GenerationCallbacks {
  // On the scheduler thread: each new token with its text (token -1: text held back until now).
  std::function<void(int32_t token, std::string_view text)> on_token;
  // With GenerationRequest::logprobs: every new token's log-probabilities, before its on_token
  // (also for a last token whose text is empty, which has no on_token).
  std::function<void(const TokenLogprobs&)> on_logprobs;
  // With GenerationRequest::prompt_logprobs: prompt tokens 1.. in order, before any new token.
  std::function<void(const TokenLogprobs&)> on_prompt_logprobs;
  // Then the result, exactly once, on the scheduler thread (kError carries the status).
  std::function<void(const JobResult&)> on_done;
};

// Called once on an export worker: the staged export, ready to stream, or why it failed.
using ExportReady = std::function<void(absl::StatusOr<std::unique_ptr<ExportStream>>)>;

class Serving {
 public:
  // `smol` (may be null) are the adapters the scheduler serves with; exports merge them.
  // `metrics` (may be null) gets every request's figures and, every 500 ms, the scheduler's.
  Serving(const Supernet& supernet, const Smol* smol, Scheduler& scheduler, Metrics* metrics,
          ServiceOptions options, HostSpeed host, std::vector<ShapeProfile> profiles);
  ~Serving();

  const ModelInfo& info() const { return info_; }
  const ServiceOptions& options() const { return options_; }
  Metrics* metrics() { return metrics_; }

  // The client's id when valid ([A-Za-z0-9._:-], at most 128 bytes), a new "req-N" when empty;
  // INVALID_ARGUMENT otherwise.
  absl::StatusOr<std::string> AssignRequestId(std::string_view client_id);
  // UNAUTHENTICATED when a token is needed and missing, PERMISSION_DENIED when wrong (or exports
  // are disabled). `export_call`: the call downloads the model.
  absl::Status CheckAuth(const RequestContext& ctx, bool export_call) const;
  // A shape as a client named it (depth 0 = full depth, width 0 = full width), validated
  // against the grid; "depth=D,width=W" text form for ParseShape.
  absl::StatusOr<Shape> ValidShape(Shape s) const;
  absl::StatusOr<Shape> ParseShape(std::string_view text) const;

  // From now on generations are refused with UNAVAILABLE (the health check says NOT_SERVING).
  void SetDraining();
  bool draining() const { return draining_; }

  // Checks (id, auth, limits, target) and tokenises: a generation ready to Start. Rejections
  // are logged and counted here.
  absl::StatusOr<std::shared_ptr<Generation>> Prepare(const GenerationRequest& r,
                                                      const RequestContext& ctx);
  // Queues it; RESOURCE_EXHAUSTED when the queue is full, UNAVAILABLE when draining. The
  // callbacks are wrapped: inter-token latency, the request's figures and its log line are
  // recorded here before the front end's callbacks run.
  absl::Status Start(const std::shared_ptr<Generation>& g, GenerationCallbacks callbacks);
  // Several generations queued together as one request (an OpenAI request's n choices): all or
  // none; `callbacks(i)` gives generation i's.
  absl::Status StartAll(const std::vector<std::shared_ptr<Generation>>& gens,
                        const std::function<GenerationCallbacks(int)>& callbacks);

  absl::StatusOr<TokenizeResult> Tokenize(const TokenizeRequest& r, const RequestContext& ctx);
  // The ids' text (invalid UTF-8, as from a byte token cut off mid-character, becomes U+FFFD).
  absl::StatusOr<std::string> Detokenize(const DetokenizeRequest& r, const RequestContext& ctx);
  // One token's raw bytes, and as UTF-8 text (a byte token inside a character is U+FFFD). `id`
  // must be in the vocabulary (the ids a generation reports are).
  const std::string& TokenBytes(int32_t id) const;
  std::string TokenPiece(int32_t id) const;
  absl::StatusOr<PlanResult> Plan(const PlanBudget& b, const RequestContext& ctx) const;
  absl::StatusOr<ExportPlanResult> PlanExport(const PlanBudget& b, const RequestContext& ctx) const;
  absl::StatusOr<std::vector<ShapeEstimateResult>> Shapes(const RequestContext& ctx) const;

  // Checks the request (id, auth, format, shape) at once, then builds and writes the export on
  // an export worker and calls `ready` there. `cancelled` is polled between stages; an export
  // whose client went away stops early. Returns the request id.
  absl::StatusOr<std::string> StartExport(const ExportRequest& r, const RequestContext& ctx,
                                          std::shared_ptr<std::atomic<bool>> cancelled,
                                          ExportReady ready);

  // The draft (and tokens per check) for a request on `target`: what `speculate` asks, or the
  // profile's best under "auto" (none when none pays, or the profile has no runs).
  struct DraftPlan {
    Shape draft;
    int64_t tokens = 0;
  };
  absl::StatusOr<std::optional<DraftPlan>> ResolveDraft(const Shape& target,
                                                        const std::string& speculate,
                                                        std::optional<int64_t> tokens) const;

 private:
  // Wraps the front end's callbacks: inter-token latency, the request's figures, its log lines.
  void Attach(Job& job, GenerationCallbacks cb);
  // A decode target on this host with shared steps: the best-quality shape that fits the budget
  // and whose predicted decode ms/token at the current load stays within budget_headroom of the
  // target (and of every running budget request's), and how it was planned. Nullopt where load
  // does not apply (no decode target, another platform's budget, planning under load off).
  // RESOURCE_EXHAUSTED when no shape can; PlanShape's error when none fits even idle.
  struct LoadChoice {
    ShapeEstimateResult estimate;
    LoadPlan plan;
  };
  absl::StatusOr<std::optional<LoadChoice>> ChooseUnderLoad(const PlanBudget& budget) const;
  // The shape a request runs on: the named shape, else ChooseUnderLoad's for a budget it applies
  // to (`plan` says how), else PlanShape's from the idle profile, else the full shape.
  absl::StatusOr<Shape> ResolveTarget(const std::optional<Shape>& shape,
                                      const std::optional<PlanBudget>& budget,
                                      std::optional<LoadPlan>* plan = nullptr) const;
  absl::StatusOr<std::shared_ptr<Job>> PrepareJob(const GenerationRequest& r,
                                                  const std::string& id) const;
  // The request's grammar (null without one), compiled or from the cache.
  absl::StatusOr<std::shared_ptr<Grammar>> GrammarFor(const GenerationRequest& r) const;
  // On an export worker: `o` and `shape` as StartExport checked them.
  absl::StatusOr<std::unique_ptr<ExportStream>> WriteExport(const ExportOptions& o,
                                                            const Shape& shape,
                                                            const std::string& id,
                                                            const std::atomic<bool>& cancelled);
  void PublishGauges();

  const Supernet& supernet_;
  const Smol* smol_;
  Scheduler& scheduler_;
  Metrics* metrics_;
  ServiceOptions options_;
  HostSpeed host_;
  std::vector<ShapeProfile> profiles_;
  ModelInfo info_;
  std::atomic<uint64_t> next_id_{1};
  std::atomic<bool> draining_{false};
  std::string export_dir_;
  ExportWorkers export_workers_;
  std::mutex gauges_mu_;
  std::condition_variable gauges_cv_;
  bool stop_gauges_ = false;
  std::thread gauges_;
  // Structured output: the vocabulary's byte trie, and compiled grammars by their GBNF text
  // (a grammar keeps its token masks, so a schema's second request is mostly cache hits).
  mutable std::mutex grammars_mu_;  // guards the three below
  mutable std::shared_ptr<const TokenTrie> token_trie_;
  mutable std::map<std::string, std::shared_ptr<Grammar>> grammars_;
  mutable std::vector<std::string> grammar_order_;  // oldest first, for eviction
};

}  // namespace amoeba
