// Continuous batching over subnets. One worker thread owns every engine: each iteration it admits
// waiting requests into their shape's lane (a free KV slot), then runs one step per lane in which
// new sequences prefill a chunk and running ones decode one token, all in a single Forward call.
// Lanes are built on demand from supernet views (cheap: no weight copies; SMoL adapters attached
// unmerged as low-rank deltas), so a never-seen shape starts at once. A shape that keeps being
// asked for gets a merged copy built on a background thread (one build at a time, started once
// no sequence runs or after build_defer_ms), swapped in between steps; copies are kept under a
// memory cap, idle lanes evicted least-recently-used.
// Protocol-free: the service adapts it to gRPC.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "lora/smol.h"
#include "model/engine.h"
#include "model/generation.h"
#include "model/prefix_cache.h"
#include "model/weight_format.h"
#include "server/job_result.h"
#include "server/step_time_model.h"
#include "subnet/subnet_builder.h"

namespace amoeba {

struct Job {
  std::string request_id;
  Shape shape;
  std::vector<int32_t> prompt;
  GenerationOptions gen;
  // Speculative decoding: `draft`, a smaller shape of the same supernet, proposes up to
  // `draft_tokens` tokens a step and `shape` checks them in one pass (none: token by token).
  std::optional<Shape> draft;
  int64_t draft_tokens = 0;
  std::optional<Clock::time_point> deadline;  // gRPC deadline; time_limit_ms is in `gen`
  int64_t priority = 0;                       // admission class: higher first, FIFO within a class
  // Budget requests: the decode ms/token they were promised, and how the shape was planned.
  std::optional<double> decode_target_ms;
  std::optional<LoadPlan> load_plan;
  std::atomic<bool> cancelled{false};
  Clock::time_point enqueued;
  bool lane_lookup_counted = false;  // cache hit/miss counted once per request (worker thread)
  bool for_profiling = false;        // start-up latency profile: no statistics, no merge builds
  // Called on the scheduler thread: new tokens with their text, then the result exactly once.
  std::function<void(int32_t token, std::string_view text)> on_token;
  std::function<void(const JobResult&)> on_done;
  // With gen.logprobs >= 0: each new token's log-probabilities, before its on_token.
  std::function<void(const TokenLogprobs&)> on_logprobs;
  // With gen.prompt_logprobs: prompt tokens 1.. in order, before any new token.
  std::function<void(const TokenLogprobs&)> on_prompt_logprobs;
};

struct SchedulerOptions {
  int64_t slots_per_shape = 16;  // concurrent sequences per shape (batch size)
  int64_t max_context = 2048;    // KV cache length per slot
  int64_t max_queue = 64;        // waiting requests before RESOURCE_EXHAUSTED
  int64_t prefill_chunk = 64;    // prompt tokens per step, so long prompts don't stall decode
  // Memory cap for per-shape copies: merged subnet copies and lanes' packed deltas.
  int64_t cache_bytes = 1ll << 30;
  WeightFormat weights_format = WeightFormat::kF32;  // panels of merged copies (as the supernet's)
  // Drafts read their own copy of the draft shape in this format (adapters merged), made once per
  // shape in the background and counted under cache_bytes; until it is ready they draft on the
  // shape's lane. Unset: drafts always run on the shape's lane (views or its merged copy). A draft
  // only proposes: the output stays the target's whatever the draft reads.
  std::optional<WeightFormat> draft_format;
  at::ScalarType kv_dtype = at::kFloat;  // KV cache storage (kHalf: half the memory)
  bool bf16_prefill_attention = true;    // EngineOptions::bf16_prefill_attention
  // Prompt cache (model/prefix_cache.h): the KV of prompt prefixes and finished conversations,
  // per shape, in blocks of prompt_cache_block tokens; a request of that shape restores the
  // longest cached prefix of its prompt and prefills only the rest. A request whose prompt shares
  // a longer prefix with one still prefilling waits for its blocks rather than computing them
  // twice. The cap counts only finished blocks (running sequences' KV is never evicted); 0: off.
  int64_t prompt_cache_bytes = int64_t{256} << 20;
  int64_t prompt_cache_block = 16;
  // Persistence: the cache is saved here when the scheduler stops (a file per cache key, named
  // with prompt_cache_tag, which must identify the weights and their format: a file of another tag
  // is never read) and a key's file is read back when its lane or draft is made. Empty: not saved.
  std::string prompt_cache_dir;
  std::string prompt_cache_tag;
  const Smol* smol = nullptr;        // adapters: unmerged when cold, merged when hot
  int64_t merge_after_requests = 2;  // requests before a shape gets a merged copy; 0 = never
  // A step over more lanes than this runs the lanes that have a merged copy on their supernet
  // views instead (adapters as packed low-rank deltas), so the step streams the shared panels
  // once rather than once per copy. bench/serve_merged (100m q8_0, 2-core Zen 5, 16 streams):
  // copies 1.3x the views' rate on 1 and 2 shapes, even on 4, 0.8x on 8, before the views' deltas
  // ran per group on one thread each (bench/shared: 2 shapes 10-15% faster since, 4 and 8
  // shapes 15-27%); 3 shapes were not measured.
  int64_t merged_copies_up_to_lanes = 2;
  // A merged-copy or draft-copy build waits while sequences are running, until this long after it
  // was queued (then it runs through: under steady load a hot shape still gets its copy): before it
  // starts, and after each matrix it merges or packs once started, so a request that arrives during
  // a build has the cores back within one matrix's work. A build reads and writes the weights and
  // slows every step it overlaps: the demo supernet on a 2-core Zen 5 VM decoded the request that
  // asked for the build at 1.6-2.8x its profiled time per token while the build ran beside it;
  // 100m q8_0 requests arriving during a build that only waited to start ran at 1.16-1.20x their
  // time before it, 0.99-1.00x with the pauses (bench/README).
  int64_t build_defer_ms = 1000;
  // A build (build_defer_ms) goes on only once the worker has had nothing to run for this long: a
  // client that sends its next request as its last one ends leaves the worker idle for a moment
  // between them, and a build that went on in every such moment overlapped each of its requests
  // by a matrix's work or more (100m q8_0: requests during a build still 1.13-1.14x their time
  // per token before it, against 1.16-1.17x with no pauses at all).
  int64_t build_quiet_ms = 100;
  // Once nothing has run for this long, the worker hands idle memory back (step activations,
  // finished sequences' pooled KV arenas, malloc_trim). Not at the first idle moment: clients that
  // send their next request as the last one ends left the worker idle for a moment every request
  // round, and each new round faulted its KV pages and activations back in (bench/serve, 16
  // greedy streams of 32 tokens, 100m q8_0: page faults ~5% of the server's time). 0: at once.
  int64_t idle_trim_ms = 1000;
  // ... except this much of the finished sequences' KV arenas (the smallest ones: the largest go
  // first). Arenas freed at idle are faulted back in by the next request, doubling from 64
  // positions: on the demo supernet (2-core Zen 5) requests 1.5 s apart decoded at 1.12-1.46x
  // the time per token of requests 0.3 s apart when every arena went, 0.98x with 64 MB kept.
  // A sporadic client's requests need a few MB (100m preset: ~17 MB for a sequence that grew to
  // 128 positions).
  int64_t idle_kv_keep_bytes = int64_t{64} << 20;
  // Drafting pays while a step reads the weights for few rows: a lane decoding more sequences
  // than this checks no drafts that step (its sequences decode token by token).
  int64_t max_speculating_batch = 2;
  // Shared steps: one engine pass over the rows of every lane with work (Engine::ForwardShared),
  // so the supernet's panels are streamed once per step for all shapes in flight; false: each lane
  // steps on its own, one after another. Drafts still run per lane, before the pass.
  bool shared_steps = true;
  // Promises first: a request without a decode target waits in the queue while admitting it
  // would push the predicted step time past a running budget request's target, for at most this
  // long (then it is admitted anyway: no request starves). 0: never waits.
  int64_t hold_for_budgets_ms = 2000;
  // Budget planning and holds aim at this share of a decode target: steps vary around the
  // predicted time (arrivals' prompts, sampling), and a target is a promise for every token.
  double budget_headroom = 0.8;
  // Shared-step listener (metrics): the pass's rows and panel bytes, the lanes in it and its time
  // (engine pass only), on the worker thread after each pass of two or more lanes.
  std::function<void(const SharedPassStats&, int64_t lanes, double ms)> on_shared_step;
  // Lane statistics listener (metrics): called on the worker thread after each step.
  std::function<void(const Shape&, int64_t running)> on_lane_step;
  // Speculation listener (metrics): one call per checked draft, on the worker thread.
  std::function<void(const Shape& target, const Shape& draft, int64_t drafted, int64_t accepted)>
      on_draft_checked;
  // No worker thread: the caller runs RunLoop(). The decode loop's OpenMP team is then that
  // thread's; libgomp measured 1.2-1.5x slower fork/joins for a second thread's team while the
  // thread that loaded the weights owned one (more spinning threads than cores).
  bool run_on_caller = false;
  // Test-only fault injection: called with "step" on the worker thread before each step of a lane,
  // "draft" before a draft shape drafts for it, "build" on the builder thread before each
  // merged-copy build and "build_piece" after each matrix it merges or packs; whatever it throws
  // goes through the error boundary.
  std::function<void(const char* site, const Shape&)> fault_hook;
};

// What a new sequence of some shape would see if it joined the current load (shared steps).
struct LoadEstimate {
  double decode_ms = 0;   // its decode ms/token: the predicted step time with it added
  double current_ms = 0;  // the predicted step time of what is in flight now
  int64_t sequences = 0;  // running and waiting now
  // Slots of the shape's lane not taken by its running and waiting sequences (<= 0: a new
  // sequence of it would wait in the queue).
  int64_t free_slots = 0;
  // The tightest decode target among running and waiting budget requests (none: unset).
  std::optional<double> tightest_target_ms;
};

struct SchedulerStats {
  int64_t running = 0, waiting = 0, lanes = 0;
  int64_t cache_hits = 0, cache_misses = 0;  // once per request: its shape had a lane, or not
  int64_t cache_bytes = 0;  // merged copies and packed deltas (what --cache-mb caps)
  int64_t kv_bytes = 0;     // KV caches of running sequences, and freed slot memory kept for reuse
  int64_t merged_lanes = 0;
  // Lane steps a merged lane ran on its views (SchedulerOptions::merged_copies_up_to_lanes).
  int64_t merged_lane_steps_on_views = 0;
  int64_t draft_copies = 0;                 // drafts' own copies (SchedulerOptions::draft_format)
  int64_t merges_built = 0, evictions = 0;  // since start
  // Times a started build waited for running sequences (SchedulerOptions::build_defer_ms).
  int64_t build_pauses = 0;
  int64_t shared_draft_passes = 0;  // draft rounds that ran several drafts in one pass, since start
  int64_t lane_failures = 0, build_failures = 0;
  // Prompt cache: blocks held, requests that reused a prefix or not, and prompt tokens reused
  // and computed (prefilled) since start.
  int64_t prompt_cache_bytes = 0, prompt_cache_blocks = 0;
  int64_t prompt_cache_hits = 0, prompt_cache_misses = 0;
  int64_t prompt_tokens_cached = 0, prompt_tokens_prefilled = 0;
  // Tokens drawn on every thread at once (TokenStream::Choose) since start; the rest were drawn
  // one after another (alone in their step, or checking drafts).
  int64_t tokens_chosen_in_parallel = 0;
  // Times the worker handed idle memory back (SchedulerOptions::idle_trim_ms) since start.
  int64_t idle_trims = 0;
};

class Scheduler {
 public:
  Scheduler(const Supernet& supernet, SchedulerOptions options);
  ~Scheduler();

  // Queues a job; RESOURCE_EXHAUSTED when the queue is full, UNAVAILABLE when draining.
  absl::Status Submit(std::shared_ptr<Job> job);
  // Queues jobs together, all or none; they count as one waiting request against max_queue (the
  // n choices of one client request).
  absl::Status Submit(const std::vector<std::shared_ptr<Job>>& jobs);
  // Stops accepting work, finishes running and queued jobs until `deadline`, cancels the rest.
  void Drain(Clock::time_point deadline);
  // With run_on_caller: runs the scheduling loop on this thread until Stop() (or destruction).
  void RunLoop();
  // Cancels what is queued and running and ends the loop.
  void Stop();
  SchedulerStats stats() const;
  // Any thread: the step-time estimate for `shape` joining what runs and waits now.
  LoadEstimate EstimateLoad(const Shape& shape) const;
  const SchedulerOptions& options() const { return opt_; }

 private:
  // Weight MB of a shape: per supernet layer (the layers it keeps) and in all (with the LM head):
  // what a pass streams for it and what one of its rows multiplies.
  struct ShapeCost {
    std::vector<std::pair<int64_t, double>> layer_mb;
    double head_mb = 0, row_mb = 0;
  };
  const ShapeCost& CostOf(const Shape& s) const;  // under load_mu_
  // The worker publishes what runs after each step; EstimateLoad adds what waits.
  struct RunningLoad {
    std::vector<std::pair<Shape, int64_t>> shapes;  // running sequences per shape
    std::vector<double> targets;                    // running budget requests' targets
  };
  void PublishLoad();
  // Admit's gate for a job without a decode target (SchedulerOptions::hold_for_budgets_ms).
  bool HoldForBudgets(const Job& job, Clock::time_point now);
  // Union and row MB of a batch: sequences per shape.
  std::pair<double, double> BatchMb(const std::vector<std::pair<Shape, int64_t>>& shapes) const;
  // A smaller shape drafting for a lane's sequences: the draft shape's model (its lane's, so a
  // merged copy is picked up when that lane gets one) with its own KV cache, whose slot i drafts
  // for the lane's slot i.
  struct Draft {
    Shape shape;
    std::string key;
    std::shared_ptr<const Model> model;
    std::unique_ptr<Engine> engine;
    std::vector<int64_t> layer_keys;  // the supernet layers its shape keeps (shared passes)
    KVCache cache;
    int64_t users = 0;
  };
  struct Seq {
    std::shared_ptr<Job> job;
    Draft* draft = nullptr;          // speculating with this draft (owned by the lane)
    std::vector<int32_t> context;    // prompt + generated tokens: what the draft catches up from
    std::vector<int32_t> check;      // next + drafted tokens, checked by the lane in one pass
    std::vector<float> draft_probs;  // [draft_tokens, vocab]: the drafted tokens' distributions
    int64_t checking = 0;            // tokens drafted this step (0: decoding token by token)
    int64_t drafted = 0, accepted = 0, rounds = 0;
    int64_t slot = 0;
    std::unique_ptr<TokenStream> stream;
    size_t fed = 0;  // prompt tokens already in the cache
    int32_t next = 0;
    Clock::time_point started, first_token;
    std::optional<Clock::time_point> time_limit;  // started + time_limit_ms
    int64_t sent_tokens = 0;                      // tokens streamed to the client
    bool has_first = false;
    bool counted_out = false;  // no longer in `running_`
    // Prompt cache: the prefix is looked up when no other sequence of the lane is still computing
    // a longer shared prefix; until then the sequence waits. `cache_key` is the lane's key then.
    bool awaiting_prefix = true;
    int64_t cached_tokens = 0;
    std::string cache_key;
  };
  struct Lane {
    Shape shape;
    std::shared_ptr<const Model> model;
    std::unique_ptr<Engine> engine;
    // Once merged: the engine over the supernet views it ran on before (same KV layout), for
    // steps over many lanes (SchedulerOptions::merged_copies_up_to_lanes).
    std::unique_ptr<Engine> view_engine;
    std::vector<int64_t> layer_keys;  // the supernet layers the shape keeps (shared passes)
    KVCache cache;
    std::vector<Seq> seqs;
    // This step's inputs (reused: no allocation per step); input_of[i]: seqs[i]'s, or -1.
    std::vector<SeqInput> inputs;
    std::vector<int64_t> input_of;
    std::vector<bool> slot_used;
    Clock::time_point last_used;
    int64_t bytes = 0;        // merged copy (0 while the lane runs on views)
    int64_t delta_bytes = 0;  // its views' packed deltas (0: none, or left unpacked by the cap)
    int64_t requests = 0;     // admitted so far
    bool merged = false, building = false;
    bool merge_failed = false;  // a build threw: stay unmerged rather than retry forever
    std::map<std::string, std::unique_ptr<Draft>> drafts;  // for this lane's sequences
    int64_t drafting_for_others = 0;  // running sequences of other lanes drafting with this shape
  };
  struct Build {  // a merged copy being made on the builder thread
    std::string key;
    Shape shape;
    bool for_draft = false;               // a draft copy in SchedulerOptions::draft_format
    int64_t reserved = 0;                 // bytes reserved under the cap (draft copies)
    Clock::time_point queued;             // when it was queued (SchedulerOptions::build_defer_ms)
    std::shared_ptr<const Model> result;  // null when the build failed
  };

  void Loop();
  void BuilderLoop();
  // Builder thread, under mu_: whether a build must wait now (sequences running, or the worker idle
  // for less than build_quiet_ms) rather than go on, `until` being when it goes on regardless.
  bool BuildMustWait(Clock::time_point until) const;
  // Builder thread, `l` on mu_: waits while BuildMustWait(until).
  void WaitForQuietWorker(std::unique_lock<std::mutex>& l, Clock::time_point until);
  std::unique_ptr<Engine> NewEngine(std::shared_ptr<const Model> model) const;
  void MaybeStartBuild(Lane& lane);
  // Hands `b` to the builder thread (stamped with the time; it waits for the worker to go idle,
  // and the worker is about to step the sequence being admitted).
  void QueueBuild(Build b);
  // Queues the background build of a draft copy of `shape` (whose lane's model is `model`) in
  // draft_format, once per shape.
  void StartDraftCopy(const Shape& shape, const Model& model);
  void SwapInFinishedBuilds();
  // The shape's lane, made on first use; `existed` says whether it was there already.
  Lane* GetLane(const Shape& s, bool* existed);
  // Evicts least-recently-used idle merged lanes until `extra` more bytes fit under the cap;
  // never `keep`. False when they cannot be made to fit.
  bool EvictIdleLanes(const Lane* keep = nullptr, int64_t extra = 0);
  bool Admit();  // moves waiting jobs into lanes; true if any moved
  // The lane's draft of shape `s`, made on first use, and (in `source`) the shape's own lane;
  // null when the shape cannot be built.
  Draft* GetDraft(Lane& lane, const Shape& s, Lane** source);
  // Drafts for every sequence of `lane` that speculates this step (Seq::checking, Seq::check).
  // A draft that fails is detached: its sequences go on token by token (a draft only proposes).
  void DraftStep(Lane& lane);
  // One draft's work in a step: the sequences speculating with it and what each feeds it.
  struct DraftPlan {
    Lane* lane = nullptr;
    Draft* draft = nullptr;
    std::vector<SeqInput> inputs = {};
    std::vector<Seq*> who = {};
    int64_t rounds = 0;
    bool failed = false;
  };
  // Plans this step's drafting with each of `lane`'s drafts (none when the lane decodes more
  // sequences than drafting pays for), detaching a draft whose planning fails.
  void PlanDrafts(Lane& lane, std::vector<DraftPlan>& plans);
  absl::Status PlanDraft(Lane& lane, const std::string& key, DraftPlan& plan);
  // Runs the plans round by round, every draft with rows in a round in one pass (several: a
  // shared pass); a draft whose pass fails is detached.
  void RunDrafts(std::vector<DraftPlan>& plans);
  // One engine pass over `groups` (at least one), setting each group's logits: a group alone
  // runs its engine's own Forward (the same kernels without the shared walk), several run
  // Engine::ForwardShared (`stats` filled then).
  absl::Status RunPass(std::span<SharedForwardGroup> groups, SharedPassStats* stats);
  void DetachDraft(Lane& lane, Draft& d, const absl::Status& why);
  void Step(Lane& lane);
  // A step in two halves around the engine pass: PrepareStep ends early sequences, drafts and
  // gathers the lane's inputs (false: nothing to run); FinishStep samples from the pass's logits
  // (or ends every sequence with its error).
  bool PrepareStep(Lane& lane);
  // PrepareStep's halves around drafting: ends early sequences and restores cached prefixes
  // (false: nobody left), then gathers the inputs (false: nothing to run).
  bool BeginStep(Lane& lane);
  bool CollectInputs(Lane& lane);
  void FinishStep(Lane& lane, const absl::StatusOr<at::Tensor>& logits);
  // Before FinishStep: the lanes' sequences that draw a token this step (no draft to check, no
  // prompt left to feed) choose it on every thread at once (TokenStream::Choose); FinishStep's
  // sequential pass then takes the chosen tokens. AddChoices collects one lane's, ChooseTokens
  // runs them.
  void AddChoices(const Lane& lane, const at::Tensor& logits);
  void ChooseTokens();
  // The row of a lane's step logits (its rows start at `first_row`) that `s` takes its next token
  // from: its first check when checking drafts, its last prompt position when the prompt ends
  // in this step; -1 when it takes none (prompt left to feed, or scoring only). Read before the
  // step's prompt tokens are counted as fed.
  static int64_t DrawRow(const Seq& s, const SeqInput& in, int64_t first_row);
  // One shared pass over every lane with work; lanes whose step threw go to `failed`. True when
  // any lane had sequences.
  bool SharedStep(std::vector<std::pair<std::string, absl::Status>>& failed);
  // Prompt cache keys: a lane's (its shape; merged copies apart, their KV differs in rounding)
  // and a draft's (drafts only propose: their KV never serves a lane).
  static std::string CacheKey(const Lane& lane);
  static std::string DraftCacheKey(const Draft& d) { return d.key + "#draft"; }
  // Whether another sequence of the lane is still prefilling a longer prefix `s` shares than
  // what is cached: then `s` waits for its blocks.
  bool PrefixComingUp(const Lane& lane, const Seq& s) const;
  // Whether a job's prefill is published to the prompt cache (not for the latency profile, nor
  // with the cache off), and whether it also takes its prefix from it (not when scoring its
  // prompt, which needs logits at every position).
  bool CachesPrompt(const Job& j) const;
  bool ReusesPrompt(const Job& j) const;
  // Prompt scoring (gen.prompt_logprobs): rows [first_row, first_row + rows) of `logits` are the
  // prompt positions just fed; each predicts the prompt token after it.
  void ScorePrompt(Seq& s, const at::Tensor& logits, int64_t first_row, int64_t rows);
  // Restores `s`'s cached prefix into its slot (and its draft's) and counts the lookup.
  void RestorePrefix(Lane& lane, Seq& s);
  // Publishes the whole blocks of `s`'s KV (prompt, and at the end what it generated).
  void PublishPrefix(Lane& lane, Seq& s, bool finished);
  // Persistence (prompt_cache_dir): a key's file, read back once per key; all keys saved at stop.
  std::string PromptCacheFile(const std::string& key) const;
  void LoadSavedPrefixes(const std::string& key, const KVCache& layout_of);
  void SavePromptCache();
  // Time limit (first) or cancellation, if the sequence should end now.
  static std::optional<FinishReason> EndedEarly(const Seq& s, Clock::time_point now);
  // The error boundary: every sequence of a lane whose step threw ends with `error`, and the lane
  // (whose engine state is unknown now) is dropped; other lanes go on.
  void FailLane(const std::string& key, const absl::Status& error);
  void Finish(Lane& lane, size_t index, FinishReason reason, absl::Status error = absl::OkStatus());

  const Supernet& supernet_;
  SchedulerOptions opt_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool draining_ = false, stop_ = false;
  // Sequences are running or being admitted (queued builds wait for it to clear), and when the
  // worker last went idle (builds wait out build_quiet_ms from it, idle trims idle_trim_ms).
  // Under mu_; the worker, their only writer, reads them without it.
  bool stepping_ = false;
  Clock::time_point idle_since_{};
  std::map<std::string, std::unique_ptr<Lane>> lanes_;  // worker thread only
  // Drafts' own copies by shape (draft_format), shared by every lane drafting with that shape;
  // a key maps to null while its build runs or after it failed. Worker thread only.
  std::map<std::string, std::shared_ptr<const Model>> draft_copies_;
  std::shared_ptr<EngineWorkspace> workspace_ = std::make_shared<EngineWorkspace>();
  SharedWorkspace shared_workspace_;                              // worker thread only
  std::vector<std::pair<const std::string*, Lane*>> step_lanes_;  // reused by SharedStep
  std::vector<std::pair<const std::string*, Lane*>> step_begun_;
  std::vector<DraftPlan> draft_plans_;
  std::vector<DraftPlan*> draft_round_;
  std::vector<SharedForwardGroup> step_groups_;
  std::vector<std::pair<TokenStream*, float*>> choices_;  // worker thread: AddChoices' work
  std::atomic<int64_t> running_{0}, lane_count_{0}, cache_bytes_{0}, hits_{0}, misses_{0};
  std::atomic<int64_t> kv_bytes_{0}, merged_lanes_{0}, merges_built_{0}, evictions_{0};
  std::atomic<int64_t> merged_lane_steps_on_views_{0};
  std::atomic<int64_t> draft_copy_count_{0}, shared_draft_passes_{0};
  std::atomic<int64_t> lane_failures_{0}, build_failures_{0}, chosen_in_parallel_{0};
  std::atomic<int64_t> idle_trims_{0}, build_pauses_{0};
  mutable std::mutex load_mu_;  // guards the five below
  RunningLoad running_load_;
  StepTimeModel step_model_;
  double prompt_mb_per_step_ = 0;  // prompt and check rows' MB per step, averaged
  mutable std::map<std::pair<int64_t, double>, ShapeCost> shape_costs_;
  mutable std::vector<double> widest_scratch_;          // BatchMb's
  std::vector<std::pair<Shape, int64_t>> step_batch_;   // worker thread: SharedStep's
  std::vector<std::pair<Shape, int64_t>> admit_batch_;  // worker thread: HoldForBudgets'
  PrefixCache prefix_cache_;                            // worker thread only (its stats() from any)
  LogprobRow prompt_scorer_;                            // worker thread only
  std::set<std::string> prompt_cache_loaded_;           // keys whose saved file was looked for
  std::atomic<int64_t> prompt_hits_{0}, prompt_misses_{0}, prompt_cached_{0}, prompt_prefilled_{0};
  // Builder thread: `builds_` waiting, `built_` finished (both under mu_).
  std::deque<Build> builds_, built_;
  std::condition_variable build_cv_;
  std::thread worker_, builder_;
};

}  // namespace amoeba
