#include "server/scheduler.h"

#include <malloc.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>

#include "absl/strings/str_cat.h"
#include "background_thread.h"
#include "model/errors.h"
#include "model/packed_linear.h"
#include "model/team.h"
#include "model/thread_pinning.h"

namespace amoeba {

namespace {
double Ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// The logits rows a sequence gets from its step: its drafted tokens' checks and one more, every
// prompt position fed (scoring), or one.
int64_t LogitsRows(int64_t checking, const SeqInput& in) {
  return checking > 0 ? checking + 1 : in.all_logits ? static_cast<int64_t>(in.tokens.size()) : 1;
}

}  // namespace

Scheduler::Scheduler(const Supernet& supernet, SchedulerOptions options)
    : supernet_(supernet),
      opt_(std::move(options)),
      prefix_cache_(
          {.block_tokens = opt_.prompt_cache_block, .max_bytes = opt_.prompt_cache_bytes}) {
  if (!opt_.run_on_caller)
    worker_ = std::thread([this] {
      KeepTeamStarterPinned();  // makes no threads: spares two system calls per step
      Loop();
    });
  if ((opt_.smol && opt_.merge_after_requests > 0) || opt_.draft_format)
    builder_ = std::thread([this] { BuilderLoop(); });
}

Scheduler::~Scheduler() {
  Stop();
  if (worker_.joinable()) worker_.join();
  if (builder_.joinable()) builder_.join();
}

void Scheduler::Stop() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
    draining_ = true;
  }
  cv_.notify_all();
  build_cv_.notify_all();
}

void Scheduler::RunLoop() {
  Loop();
}

absl::Status Scheduler::Submit(std::shared_ptr<Job> job) {
  return Submit(std::vector<std::shared_ptr<Job>>{std::move(job)});
}

absl::Status Scheduler::Submit(const std::vector<std::shared_ptr<Job>>& jobs) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (draining_) return absl::UnavailableError("server is draining");
    if (static_cast<int64_t>(queue_.size()) >= opt_.max_queue) {
      return absl::ResourceExhaustedError(
          absl::StrCat("queue full (", opt_.max_queue, " waiting requests)"));
    }
    const auto now = Clock::now();
    for (const auto& job : jobs) {
      job->enqueued = now;
      queue_.push_back(job);
    }
  }
  cv_.notify_all();
  return absl::OkStatus();
}

void Scheduler::Drain(Clock::time_point deadline) {
  {
    std::lock_guard<std::mutex> l(mu_);
    draining_ = true;
  }
  cv_.notify_all();
  while (Clock::now() < deadline) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (queue_.empty() && running_ == 0) return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  // Out of time: cancel what is left (the worker finishes them as CANCELLED).
  std::lock_guard<std::mutex> l(mu_);
  for (auto& j : queue_) j->cancelled = true;
  stop_ = true;
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats s;
  {
    std::lock_guard<std::mutex> l(mu_);
    s.waiting = static_cast<int64_t>(queue_.size());
  }
  s.running = running_;
  s.lanes = lane_count_;
  s.cache_bytes = cache_bytes_;
  s.cache_hits = hits_;
  s.cache_misses = misses_;
  s.kv_bytes = kv_bytes_;
  s.merged_lanes = merged_lanes_;
  s.merged_lane_steps_on_views = merged_lane_steps_on_views_;
  s.draft_copies = draft_copy_count_;
  s.shared_draft_passes = shared_draft_passes_;
  s.merges_built = merges_built_;
  s.evictions = evictions_;
  s.lane_failures = lane_failures_;
  s.build_failures = build_failures_;
  s.build_pauses = build_pauses_;
  const PrefixCacheStats pc = prefix_cache_.stats();
  s.prompt_cache_bytes = pc.bytes;
  s.prompt_cache_blocks = pc.blocks;
  s.prompt_cache_hits = prompt_hits_;
  s.prompt_cache_misses = prompt_misses_;
  s.prompt_tokens_cached = prompt_cached_;
  s.prompt_tokens_prefilled = prompt_prefilled_;
  s.tokens_chosen_in_parallel = chosen_in_parallel_;
  s.idle_trims = idle_trims_;
  return s;
}

std::unique_ptr<Engine> Scheduler::NewEngine(std::shared_ptr<const Model> model) const {
  EngineOptions eo;
  eo.max_len = opt_.max_context;
  eo.workspace = workspace_;  // one worker thread: all lanes share the activations
  eo.kv_dtype = opt_.kv_dtype;
  eo.bf16_prefill_attention = opt_.bf16_prefill_attention;
  return std::make_unique<Engine>(std::move(model), eo);
}

Scheduler::Lane* Scheduler::GetLane(const Shape& s, bool* existed) {
  const std::string key = s.ToString();
  auto it = lanes_.find(key);
  *existed = it != lanes_.end();
  if (*existed) return it->second.get();
  // Views of the supernet (already in the serving dtype); adapters ride along unmerged, so the
  // first request of a shape pays no copy of the weights. Hot shapes get a merged copy later
  // (MaybeStartBuild).
  auto m = BuildSubnet(
      supernet_, opt_.smol, s,
      {.adapters = AdapterMode::kUnmerged, .uniform_width = false, .pack_deltas = false});
  if (!m.ok()) return nullptr;
  // The deltas packed as panels (the shape's steps then run as one team) when their copy fits
  // under the cap beside the merged copies; else they stay views of the adapters (slower).
  const int64_t delta_bytes = PackDeltasBytes(*m);
  const bool pack = delta_bytes > 0 && EvictIdleLanes(nullptr, delta_bytes);
  if (pack) PackDeltas(*m);
  auto lane = std::make_unique<Lane>();
  lane->delta_bytes = pack ? delta_bytes : 0;
  cache_bytes_ += lane->delta_bytes;
  lane->shape = s;
  lane->model = std::make_shared<const Model>(std::move(*m));
  lane->engine = NewEngine(lane->model);
  for (int layer : supernet_.spec().FindDepth(s.depth)->layers) lane->layer_keys.push_back(layer);
  lane->cache = lane->engine->NewCache(opt_.slots_per_shape);
  lane->slot_used.assign(opt_.slots_per_shape, false);
  spdlog::info("scheduler: new lane {} (supernet views{})", key,
               !opt_.smol ? ""
               : pack     ? fmt::format(", adapters unmerged, packed: {} MB", delta_bytes >> 20)
                          : ", adapters unmerged");
  LoadSavedPrefixes(CacheKey(*lane), lane->cache);
  lane->last_used = Clock::now();
  Lane* raw = lane.get();
  lanes_[key] = std::move(lane);
  lane_count_ = static_cast<int64_t>(lanes_.size());
  return raw;
}

namespace {
// What a copy of `m`'s projections costs as panels of format `f` alone (PackWeights +
// DropPackedRowMajor): the sliced projections' element count in that format.
int64_t PanelBytes(const Model& m, WeightFormat f) {
  int64_t bytes = 0;
  for (const LayerWeights& l : m.layers)
    for (int p = 0; p < kNumProj; ++p)
      bytes += static_cast<int64_t>(static_cast<double>(l.proj(static_cast<Proj>(p)).numel()) *
                                    BytesPerWeight(f));
  return bytes;
}
}  // namespace

void Scheduler::MaybeStartBuild(Lane& lane) {
  if (!opt_.smol || opt_.merge_after_requests <= 0 || lane.merged || lane.building ||
      lane.merge_failed)
    return;
  if (lane.requests < opt_.merge_after_requests) return;
  const int64_t need = PanelBytes(*lane.model, opt_.weights_format);
  if (!EvictIdleLanes(&lane, need)) return;  // no room under the cap: stay unmerged
  Build b;
  b.key = lane.shape.ToString();
  b.shape = lane.shape;
  lane.building = true;
  lane.bytes = need;  // reserved now, so queued builds cannot overshoot the cap together
  cache_bytes_ += need;
  spdlog::info("scheduler: building merged copy of {} in the background", b.key);
  QueueBuild(std::move(b));
}

void Scheduler::QueueBuild(Build b) {
  b.queued = Clock::now();
  {
    std::lock_guard<std::mutex> l(mu_);
    builds_.push_back(std::move(b));
    stepping_ = true;  // called while admitting a sequence: the worker steps it next
  }
  build_cv_.notify_all();
}

void Scheduler::StartDraftCopy(const Shape& shape, const Model& model) {
  const std::string key = shape.ToString();
  draft_copies_[key] = nullptr;  // building (or failed): never started twice
  const int64_t need = PanelBytes(model, *opt_.draft_format);
  if (!EvictIdleLanes(nullptr, need)) {
    spdlog::warn("scheduler: no room under the cache cap for a {} draft copy of {}",
                 WeightFormatName(*opt_.draft_format), key);
    return;
  }
  cache_bytes_ += need;
  Build b;
  b.key = key;
  b.shape = shape;
  b.for_draft = true;
  b.reserved = need;
  spdlog::info("scheduler: building a {} draft copy of {} in the background",
               WeightFormatName(*opt_.draft_format), key);
  QueueBuild(std::move(b));
}

void Scheduler::BuilderLoop() {
  at::InferenceMode guard;
  RunBelowTheDecodeLoop(Yield::kNice);  // builds are background work
  for (;;) {
    Build b;
    {
      std::unique_lock<std::mutex> l(mu_);
      build_cv_.wait(l, [&] { return stop_ || !builds_.empty(); });
      if (stop_) return;
      WaitForQuietWorker(l,
                         builds_.front().queued + std::chrono::milliseconds(opt_.build_defer_ms));
      if (stop_) return;
      b = std::move(builds_.front());
      builds_.pop_front();
    }
    const auto t0 = Clock::now();
    const auto run_through = b.queued + std::chrono::milliseconds(opt_.build_defer_ms);
    double paused_ms = 0;
    // After each matrix merged or packed: wait while sequences run (a request that arrived after
    // the build started), until run_through.
    auto between_pieces = [&] {
      if (opt_.fault_hook) opt_.fault_hook("build_piece", b.shape);
      std::unique_lock<std::mutex> l(mu_);
      if (!BuildMustWait(run_through)) return;
      const auto t = Clock::now();
      ++build_pauses_;
      WaitForQuietWorker(l, run_through);
      paused_ms += Ms(t, Clock::now());
    };
    absl::Status build_error;
    try {
      if (opt_.fault_hook) opt_.fault_hook("build", b.shape);
      auto merged = BuildSubnet(supernet_, opt_.smol, b.shape,
                                {.adapters = AdapterMode::kMerged,
                                 .uniform_width = false,
                                 .between_matrices = between_pieces});
      if (!merged.ok()) {
        build_error = merged.status();
      } else {
        // The merged projections get panels; the rest share the base's. A draft copy packs every
        // projection in its own format (views of the base's panels are in the serving format).
        if (b.for_draft) {
          RepackWeights(*merged, *opt_.draft_format, between_pieces);
        } else {
          PackWeights(*merged, opt_.weights_format, between_pieces);
        }
        DropPackedRowMajor(*merged);
        b.result = std::make_shared<const Model>(std::move(*merged));
        spdlog::info(
            "scheduler: {} of {} built in {:.0f} ms (started {:.0f} ms after it was "
            "queued; paused {:.0f} ms of it for running sequences)",
            b.for_draft ? "draft copy" : "merged copy", b.key, Ms(t0, Clock::now()),
            Ms(b.queued, t0), paused_ms);
      }
    } catch (...) {
      build_error = StatusFromException(std::current_exception(), "build");
    }
    if (!build_error.ok()) {
      b.result.reset();
      spdlog::error("scheduler: {} of {} failed: {}; {}",
                    b.for_draft ? "draft copy" : "merged copy", b.key,
                    std::string(build_error.message()),
                    b.for_draft ? "it drafts on the shape's lane" : "the shape stays unmerged");
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      built_.push_back(std::move(b));
    }
    cv_.notify_all();  // wakes an idle worker to swap it in
  }
}

bool Scheduler::BuildMustWait(Clock::time_point until) const {
  const auto now = Clock::now();
  return !stop_ && now < until &&
         (stepping_ || now < idle_since_ + std::chrono::milliseconds(opt_.build_quiet_ms));
}

void Scheduler::WaitForQuietWorker(std::unique_lock<std::mutex>& l, Clock::time_point until) {
  // The worker notifies build_cv_ when it goes idle; from then on, wait out the quiet time.
  while (BuildMustWait(until))
    build_cv_.wait_until(
        l, stepping_
               ? until
               : std::min(until, idle_since_ + std::chrono::milliseconds(opt_.build_quiet_ms)));
}

void Scheduler::SwapInFinishedBuilds() {
  std::deque<Build> done;
  {
    std::lock_guard<std::mutex> l(mu_);
    done.swap(built_);
  }
  for (Build& b : done) {
    if (b.for_draft) {
      cache_bytes_ -= b.reserved;
      if (!b.result) {
        ++build_failures_;  // stays null: drafts keep running on the shape's lane
        continue;
      }
      cache_bytes_ += b.result->ProjectionBytes();
      draft_copies_[b.key] = std::move(b.result);
      ++draft_copy_count_;
      continue;
    }
    auto it = lanes_.find(b.key);
    if (it == lanes_.end() || it->second->merged || !it->second->building) {
      continue;  // the lane went away meanwhile (its reservation with it): drop the copy
    }
    Lane& lane = *it->second;
    cache_bytes_ -= lane.bytes;  // the reservation, replaced by the real size below
    lane.building = false;
    if (!b.result) {
      lane.bytes = 0;
      lane.merge_failed = true;
      ++build_failures_;
      continue;
    }
    // Same shape, same KV layout: running sequences continue on the merged copy next step.
    lane.model = std::move(b.result);
    lane.view_engine = std::move(lane.engine);
    lane.engine = NewEngine(lane.model);
    lane.merged = true;
    LoadSavedPrefixes(CacheKey(lane), lane.cache);
    lane.bytes = lane.model->ProjectionBytes();
    cache_bytes_ += lane.bytes;
    ++merged_lanes_;
    ++merges_built_;
  }
}

bool Scheduler::EvictIdleLanes(const Lane* keep, int64_t extra) {
  while (cache_bytes_ + extra > opt_.cache_bytes) {
    Lane* victim = nullptr;
    std::string key;
    for (auto& [k, l] : lanes_) {
      // Only merged copies and packed deltas cost memory; lanes without either are free to keep.
      // A lane with a slot taken is in use (a sequence being admitted into it).
      if (!l->seqs.empty() || l.get() == keep || l->bytes + l->delta_bytes == 0 || l->building ||
          l->drafting_for_others > 0 ||
          std::find(l->slot_used.begin(), l->slot_used.end(), true) != l->slot_used.end())
        continue;
      if (!victim || l->last_used < victim->last_used) {
        victim = l.get();
        key = k;
      }
    }
    if (!victim) return false;
    cache_bytes_ -= victim->bytes + victim->delta_bytes;
    if (victim->merged) --merged_lanes_;
    spdlog::info("scheduler: evict idle lane {} ({} MB: merged copy {}, packed deltas {})", key,
                 (victim->bytes + victim->delta_bytes) >> 20, victim->bytes >> 20,
                 victim->delta_bytes >> 20);
    ++evictions_;
    lanes_.erase(key);
    lane_count_ = static_cast<int64_t>(lanes_.size());
  }
  return true;
}

bool Scheduler::Admit() {
  std::deque<std::shared_ptr<Job>> pending;
  {
    std::lock_guard<std::mutex> l(mu_);
    pending.swap(queue_);
  }
  // Higher classes first; arrival order within a class (the queue holds arrival order: what was
  // kept back last time went back to its front).
  std::stable_sort(pending.begin(), pending.end(),
                   [](const auto& a, const auto& b) { return a->priority > b->priority; });
  bool moved = false;
  std::deque<std::shared_ptr<Job>> keep;
  for (auto& job : pending) {
    if (job->cancelled) {
      JobResult r;
      r.reason = FinishReason::kCancelled;
      r.shape = job->shape;
      r.queue_ms = Ms(job->enqueued, Clock::now());
      job->on_done(r);
      continue;
    }
    bool existed = false;
    Lane* lane = nullptr;
    absl::Status error;
    try {
      lane = GetLane(job->shape, &existed);
      if (!lane)
        error = absl::InvalidArgumentError(
            absl::StrCat("shape ", job->shape.ToString(), " cannot be built"));
    } catch (...) {
      error = StatusFromException(std::current_exception(), "engine");
      spdlog::error("[{}] scheduler: lane {} failed: {}", job->request_id, job->shape.ToString(),
                    std::string(error.message()));
    }
    if (!lane) {
      JobResult r;
      r.reason = FinishReason::kError;
      r.error = error;
      r.shape = job->shape;
      r.queue_ms = Ms(job->enqueued, Clock::now());
      job->on_done(r);
      continue;
    }
    if (!job->lane_lookup_counted && !job->for_profiling) {
      job->lane_lookup_counted = true;
      ++(existed ? hits_ : misses_);
    }
    int64_t slot = -1;
    for (int64_t i = 0; i < static_cast<int64_t>(lane->slot_used.size()); ++i)
      if (!lane->slot_used[i]) {
        slot = i;
        break;
      }
    if (slot < 0 || HoldForBudgets(*job, Clock::now())) {
      keep.push_back(std::move(job));  // lane full, or held for budgets: stays queued, in order
      continue;
    }
    Seq s;
    s.job = job;
    s.slot = slot;
    s.stream = std::make_unique<TokenStream>(*supernet_.tokenizer(), lane->model->config, job->gen,
                                             job->prompt);
    s.started = Clock::now();
    if (job->gen.time_limit_ms > 0) {
      // Validated by the service; clamped here too so the sum cannot overflow.
      s.time_limit = s.started + std::chrono::milliseconds(
                                     std::min<int64_t>(job->gen.time_limit_ms, 365ll * 86400000));
    }
    lane->slot_used[slot] = true;
    lane->cache.Reset(slot);
    if (!job->for_profiling) {
      ++lane->requests;
      MaybeStartBuild(*lane);
    }
    if (job->draft && job->draft_tokens > 0 && !(*job->draft == job->shape)) {
      Lane* source = nullptr;
      try {
        s.draft = GetDraft(*lane, *job->draft, &source);
      } catch (...) {
        s.draft = nullptr;
      }
      if (!s.draft) {
        spdlog::warn("[{}] scheduler: draft {} cannot be built; decoding token by token",
                     job->request_id, job->draft->ToString());
      } else {
        ++s.draft->users;
        s.draft->cache.Reset(slot);
        // The draft's shape counts as asked for: it gets a merged copy when hot, and is kept.
        ++source->drafting_for_others;
        if (!job->for_profiling) {
          ++source->requests;
          MaybeStartBuild(*source);
        }
        const int64_t k = std::min(job->draft_tokens, kTokenByTokenAttentionMax - 1);
        s.context.reserve(job->prompt.size() + static_cast<size_t>(job->gen.max_new_tokens) + 1);
        s.context.assign(job->prompt.begin(), job->prompt.end());
        s.check.reserve(k + 1);
        if (!s.stream->greedy()) s.draft_probs.resize(k * lane->model->config.vocab_size);
      }
    }
    lane->seqs.push_back(std::move(s));
    ++running_;
    moved = true;
  }
  if (!keep.empty()) {
    std::lock_guard<std::mutex> l(mu_);
    for (auto it = keep.rbegin(); it != keep.rend(); ++it) queue_.push_front(std::move(*it));
  }
  return moved;
}

Scheduler::Draft* Scheduler::GetDraft(Lane& lane, const Shape& shape, Lane** source_out) {
  const std::string key = shape.ToString();
  bool existed = false;
  // The draft shape's own lane (made again if it failed meanwhile): its model is views now and
  // the merged copy when hot.
  Lane* source = GetLane(shape, &existed);
  *source_out = source;
  if (!source) return nullptr;
  auto it = lane.drafts.find(key);
  if (it != lane.drafts.end()) return it->second.get();
  auto d = std::make_unique<Draft>();
  d->shape = shape;
  d->key = key;
  d->model = source->model;
  d->engine = NewEngine(d->model);
  d->layer_keys = source->layer_keys;
  d->cache = d->engine->NewCache(opt_.slots_per_shape);
  LoadSavedPrefixes(DraftCacheKey(*d), d->cache);
  spdlog::info("scheduler: {} drafts for {}", key, lane.shape.ToString());
  if (opt_.draft_format && !draft_copies_.count(key)) StartDraftCopy(shape, *d->model);
  Draft* raw = d.get();
  lane.drafts[key] = std::move(d);
  return raw;
}

void Scheduler::Finish(Lane& lane, size_t index, FinishReason reason, absl::Status error) {
  Seq& s = lane.seqs[index];
  std::string_view rest = s.stream->Finish(reason);
  if (!rest.empty() && s.job->on_token) s.job->on_token(-1, rest);
  const auto now = Clock::now();
  JobResult r;
  r.reason = s.stream->finish_reason();
  r.error = std::move(error);
  r.prompt_tokens = static_cast<int64_t>(s.job->prompt.size());
  r.cached_tokens = s.cached_tokens;
  r.completion_tokens = s.sent_tokens;  // what the client received, not what was sampled
  r.queue_ms = Ms(s.job->enqueued, s.started);
  r.ttft_ms = s.has_first ? Ms(s.job->enqueued, s.first_token) : 0;
  r.total_ms = Ms(s.job->enqueued, now);
  r.shape = lane.shape;
  // What this sequence computed serves the next request that starts the same way (a failed step
  // leaves the KV in an unknown state: nothing of it is kept).
  if (r.reason != FinishReason::kError) PublishPrefix(lane, s, /*finished=*/true);
  if (s.draft) {
    r.draft = s.draft->shape;
    r.drafted_tokens = s.drafted;
    r.accepted_tokens = s.accepted;
    r.draft_rounds = s.rounds;
    s.draft->cache.Reset(s.slot);
    --s.draft->users;
    auto source = lanes_.find(s.draft->key);
    if (source != lanes_.end()) --source->second->drafting_for_others;
    s.draft = nullptr;
  }
  // Counted out before the client hears of it: whoever sees the result sees it not running.
  --running_;
  s.counted_out = true;
  s.job->on_done(r);
  lane.slot_used[s.slot] = false;
  lane.cache.Reset(s.slot);  // gives the slot's KV memory back
  lane.seqs.erase(lane.seqs.begin() + static_cast<std::ptrdiff_t>(index));
}

std::optional<FinishReason> Scheduler::EndedEarly(const Seq& s, Clock::time_point now) {
  // A passed deadline first: gRPC cancels the call when it passes, and the request ended by its
  // deadline, not by the client.
  if ((s.job->deadline && now >= *s.job->deadline) || (s.time_limit && now >= *s.time_limit))
    return FinishReason::kTimeLimit;
  if (s.job->cancelled) {
    // The client's copy of a deadline passes first (the server's starts when the call arrives),
    // and its cancellation can reach us before ours passes: that close to it, it is the deadline
    // (ServerTest.ClientDeadlineEndsTheSequenceOnTheServer read "cancelled" under load).
    constexpr auto kDeadlineTransit = std::chrono::milliseconds(100);
    if (s.job->deadline && now + kDeadlineTransit >= *s.job->deadline)
      return FinishReason::kTimeLimit;
    return FinishReason::kCancelled;
  }
  return std::nullopt;
}

void Scheduler::DraftStep(Lane& lane) {
  std::vector<DraftPlan>& plans = draft_plans_;
  plans.clear();
  PlanDrafts(lane, plans);
  RunDrafts(plans);
}

void Scheduler::PlanDrafts(Lane& lane, std::vector<DraftPlan>& plans) {
  int64_t decoding = 0;
  for (Seq& s : lane.seqs) {
    s.checking = 0;
    s.check.clear();
    decoding += s.fed >= s.job->prompt.size() && s.has_first;
  }
  if (decoding > opt_.max_speculating_batch) return;
  for (auto& [key, d] : lane.drafts) {
    if (d->users == 0) continue;
    DraftPlan plan{.lane = &lane, .draft = d.get()};
    absl::Status st;
    try {
      st = PlanDraft(lane, key, plan);
    } catch (...) {
      st = StatusFromException(std::current_exception(), "draft");
    }
    if (!st.ok()) {
      DetachDraft(lane, *d, st);
    } else if (!plan.inputs.empty()) {
      plans.push_back(std::move(plan));
    }
  }
}

void Scheduler::DetachDraft(Lane& lane, Draft& d, const absl::Status& why) {
  spdlog::warn("scheduler: draft {} for {} failed: {}; its sequences decode token by token", d.key,
               lane.shape.ToString(), std::string(why.message()));
  for (Seq& s : lane.seqs) {
    if (s.draft != &d) continue;
    s.checking = 0;
    s.check.clear();
    d.cache.Reset(s.slot);
    --d.users;
    if (auto source = lanes_.find(d.key); source != lanes_.end())
      --source->second->drafting_for_others;
    s.draft = nullptr;
  }
}

absl::Status Scheduler::PlanDraft(Lane& lane, const std::string& key, DraftPlan& plan) {
  const int64_t max_len = lane.cache.max_len();
  Draft* d = plan.draft;
  if (opt_.fault_hook) opt_.fault_hook("draft", d->shape);
  // The draft's own copy is ready, or (without one) the draft shape's lane got a merged copy:
  // same KV layout, draft on it from now on.
  std::shared_ptr<const Model> newer;
  if (auto copy = draft_copies_.find(key); copy != draft_copies_.end() && copy->second) {
    newer = copy->second;
  } else if (auto src = lanes_.find(key); src != lanes_.end()) {
    newer = src->second->model;
  }
  if (newer && newer != d->model) {
    d->model = std::move(newer);
    d->engine = NewEngine(d->model);
  }
  // Who drafts this step, and what each feeds the draft first: the context it has not seen (the
  // prompt on the first round; one or two tokens later), or a chunk of it when that is longer
  // than a prefill chunk (then the sequence decodes token by token this step).
  for (Seq& s : lane.seqs) {
    if (s.draft != d || s.fed < s.job->prompt.size() || !s.has_first) continue;
    const int64_t have = lane.cache.length(s.slot), seen = d->cache.length(s.slot);
    const int64_t left =
        s.job->gen.max_new_tokens - static_cast<int64_t>(s.stream->tokens().size());
    // A check yields up to k + 1 tokens and must leave room in the context.
    const int64_t k = std::min(
        {s.job->draft_tokens, kTokenByTokenAttentionMax - 1, left - 1, max_len - 2 - have});
    const int64_t unseen = have + 1 - seen;  // context[seen, have] (context[have] = next)
    if (k <= 0 || unseen <= 0) continue;
    if (unseen > opt_.prefill_chunk) {
      plan.inputs.push_back(
          {s.slot, std::span<const int32_t>(s.context.data() + seen, opt_.prefill_chunk)});
      plan.who.push_back(&s);
      continue;
    }
    s.checking = k;
    s.check.push_back(s.next);
    s.stream->BeginDraft();
    plan.inputs.push_back({s.slot, std::span<const int32_t>(s.context.data() + seen, unseen)});
    plan.who.push_back(&s);
    plan.rounds = std::max(plan.rounds, k);
  }
  return absl::OkStatus();
}

absl::Status Scheduler::RunPass(std::span<SharedForwardGroup> groups, SharedPassStats* stats) {
  if (groups.size() > 1) return Engine::ForwardShared(groups, shared_workspace_, stats);
  SharedForwardGroup& g = groups[0];
  auto logits = g.engine->Forward(*g.cache, g.seqs, g.all_logits);
  if (!logits.ok()) return logits.status();
  g.logits = *logits;
  return absl::OkStatus();
}

void Scheduler::RunDrafts(std::vector<DraftPlan>& plans) {
  // Round i feeds every sequence still drafting its last drafted token (its whole unseen context
  // in round 0) and picks the next one from the draft's logits. The drafts with rows in a round
  // run in one pass: several drafts (of this lane or of others) read the supernet's panels once.
  std::vector<DraftPlan*>& round = draft_round_;
  std::vector<SharedForwardGroup>& groups = step_groups_;
  for (int64_t i = 0;; ++i) {
    round.clear();
    for (DraftPlan& p : plans) {
      if (p.failed || i >= std::max<int64_t>(p.rounds, 1)) continue;
      if (i > 0) {
        p.inputs.clear();
        std::erase_if(p.who, [&](const Seq* s) { return s->checking <= i; });
        for (Seq* s : p.who)
          p.inputs.push_back({s->slot, std::span<const int32_t>(&s->check[i], 1)});
      }
      if (!p.inputs.empty()) round.push_back(&p);
    }
    if (round.empty()) return;
    groups.clear();
    for (DraftPlan* p : round)
      groups.push_back({.engine = p->draft->engine.get(),
                        .cache = &p->draft->cache,
                        .seqs = p->inputs,
                        .layer_keys = p->draft->layer_keys});
    absl::Status pass = absl::OkStatus();
    try {
      pass = RunPass(groups, nullptr);
      if (pass.ok() && round.size() > 1) ++shared_draft_passes_;
    } catch (...) {
      pass = StatusFromException(std::current_exception(), "draft");
    }
    if (!pass.ok()) {  // the drafts of this pass stop; their sequences go on token by token
      for (DraftPlan* p : round) {
        p->failed = true;
        DetachDraft(*p->lane, *p->draft, pass);
      }
      continue;
    }
    for (size_t g = 0; g < round.size(); ++g) {
      const at::Tensor& logits = groups[g].logits;
      const DraftPlan& p = *round[g];
      for (size_t j = 0; j < p.who.size(); ++j) {
        Seq& s = *p.who[j];
        if (s.checking == 0) continue;  // catching up only
        const int64_t vocab = logits.size(1);
        float* probs = s.draft_probs.empty() ? nullptr : s.draft_probs.data() + i * vocab;
        s.check.push_back(
            s.stream->Draft(logits.select(0, static_cast<int64_t>(j)).data_ptr<float>(), probs));
      }
    }
  }
}

bool Scheduler::BeginStep(Lane& lane) {
  const auto now = Clock::now();
  // Cancellation and deadlines are honoured before spending a step on the sequence.
  for (size_t i = lane.seqs.size(); i-- > 0;)
    if (auto reason = EndedEarly(lane.seqs[i], now)) Finish(lane, i, *reason);
  if (lane.seqs.empty()) {
    // Everyone left: the listener hears the lane is empty (else its gauge keeps the last count).
    if (opt_.on_lane_step) opt_.on_lane_step(lane.shape, 0);
    return false;
  }
  lane.last_used = now;
  if (opt_.fault_hook) opt_.fault_hook("step", lane.shape);
  // New sequences take their cached prefix, in admission order (one that starts now computes the
  // prefix the ones after it may wait for).
  for (Seq& s : lane.seqs)
    if (s.awaiting_prefix && !PrefixComingUp(lane, s)) RestorePrefix(lane, s);
  return true;
}

bool Scheduler::CollectInputs(Lane& lane) {
  std::vector<SeqInput>& inputs = lane.inputs;
  inputs.clear();
  std::vector<int64_t>& input_of = lane.input_of;
  input_of.assign(lane.seqs.size(), -1);  // a waiting sequence has none
  for (size_t i = 0; i < lane.seqs.size(); ++i) {
    Seq& s = lane.seqs[i];
    if (s.awaiting_prefix) continue;
    input_of[i] = static_cast<int64_t>(inputs.size());
    if (s.fed < s.job->prompt.size()) {
      const size_t n = std::min<size_t>(opt_.prefill_chunk, s.job->prompt.size() - s.fed);
      inputs.push_back({s.slot, std::span<const int32_t>(s.job->prompt.data() + s.fed, n),
                        /*all_logits=*/s.job->gen.prompt_logprobs});
    } else if (s.checking > 0) {  // next and the drafted tokens: logits for each
      inputs.push_back({s.slot, s.check, /*all_logits=*/true});
    } else {
      inputs.push_back({s.slot, std::span<const int32_t>(&s.next, 1)});
    }
  }
  if (inputs.empty()) {  // defensive: a sequence waits only while another one feeds
    if (opt_.on_lane_step) opt_.on_lane_step(lane.shape, static_cast<int64_t>(lane.seqs.size()));
    return false;
  }
  return true;
}

bool Scheduler::PrepareStep(Lane& lane) {
  if (!BeginStep(lane)) return false;
  if (!lane.drafts.empty()) DraftStep(lane);
  return CollectInputs(lane);
}

void Scheduler::Step(Lane& lane) {
  if (!PrepareStep(lane)) return;
  const absl::StatusOr<at::Tensor> logits = lane.engine->Forward(lane.cache, lane.inputs);
  if (logits.ok()) {
    AddChoices(lane, *logits);
    ChooseTokens();
  }
  FinishStep(lane, logits);
}

int64_t Scheduler::DrawRow(const Seq& s, const SeqInput& in, int64_t first_row) {
  if (s.fed >= s.job->prompt.size()) return first_row;
  const size_t fed_after = s.fed + in.tokens.size();
  if (fed_after < s.job->prompt.size()) return -1;  // more prompt to feed
  if (s.job->gen.max_new_tokens <= 0) return -1;    // scoring only
  return in.all_logits ? first_row + LogitsRows(s.checking, in) - 1 : first_row;
}

void Scheduler::AddChoices(const Lane& lane, const at::Tensor& logits) {
  int64_t row = 0;
  for (size_t i = 0; i < lane.seqs.size(); ++i) {
    if (lane.input_of[i] < 0) continue;
    const Seq& s = lane.seqs[i];
    const SeqInput& in = lane.inputs[static_cast<size_t>(lane.input_of[i])];
    const int64_t sample_row = DrawRow(s, in, row);
    row += LogitsRows(s.checking, in);
    // Checks go one after another (each decides whether the next is made).
    if (s.checking > 0 || sample_row < 0) continue;
    choices_.emplace_back(s.stream.get(), logits.data_ptr<float>() + sample_row * logits.stride(0));
  }
}

void Scheduler::ChooseTokens() {
  // A draw reads and rewrites a whole row of logits (15-50 us at 32000 tokens with temperature
  // or top-p; bench/sampling), and the team's other threads would wait for the sequential pass.
  if (choices_.size() >= 2 && at::get_num_threads() > 1) {
    auto choose = [&] {
      ParallelFor(0, static_cast<int64_t>(choices_.size()), 1, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) choices_[k].first->Choose(choices_[k].second);
      });
    };
    try {
      RunInTeam(choose);
      chosen_in_parallel_ += static_cast<int64_t>(choices_.size());
    } catch (...) {
      // FinishStep's sequential pass draws whatever was not chosen.
      spdlog::error("scheduler: choosing tokens in parallel failed: {}",
                    StatusFromException(std::current_exception(), "sampler").ToString());
    }
  }
  choices_.clear();
}

void Scheduler::FinishStep(Lane& lane, const absl::StatusOr<at::Tensor>& logits) {
  const std::vector<SeqInput>& inputs = lane.inputs;
  const std::vector<int64_t>& input_of = lane.input_of;
  if (!logits.ok()) {
    spdlog::error("scheduler: step on {} failed: {}", lane.shape.ToString(),
                  logits.status().ToString());
    for (size_t i = lane.seqs.size(); i-- > 0;)
      Finish(lane, i, FinishReason::kError, logits.status());
    return;
  }
  std::vector<std::pair<size_t, FinishReason>> done;
  int64_t row = 0;
  for (size_t i = 0; i < lane.seqs.size(); ++i) {
    if (input_of[i] < 0) continue;
    Seq& s = lane.seqs[i];
    const SeqInput& in = inputs[static_cast<size_t>(input_of[i])];
    // Logits rows: the drafted tokens' checks, every prompt position (scoring), or one.
    const int64_t rows = LogitsRows(s.checking, in);
    const int64_t first_row = row;
    row += rows;
    // Where the next token's logits are (-1: none this step), decided before `fed` moves.
    const int64_t sample_row = DrawRow(s, in, first_row);
    if (s.fed < s.job->prompt.size()) {
      const size_t n = in.tokens.size();
      if (in.all_logits) ScorePrompt(s, *logits, first_row, static_cast<int64_t>(n));
      s.fed += n;
      if (!s.job->for_profiling) prompt_prefilled_ += static_cast<int64_t>(n);
      PublishPrefix(lane, s, /*finished=*/false);  // sequences waiting for it go on next step
      if (s.fed < s.job->prompt.size()) continue;  // more prompt to feed
      if (s.job->gen.max_new_tokens <= 0) {        // scoring only
        done.emplace_back(i, FinishReason::kLength);
        continue;
      }
    }
    // Row j holds the logits after check[j]: with j < checking it decides on drafted token j+1
    // (kept, or replaced by the lane's own choice, which ends the check); the last row, reached
    // only when every drafted token was kept, gives one more token of the lane's own.
    const int64_t before = lane.cache.length(s.slot) - rows;  // context before this step
    int64_t kept = 0;
    bool finished = false;
    const int64_t sampled_rows = s.checking > 0 ? s.checking + 1 : 1;
    for (int64_t j = 0; j < sampled_rows && !finished; ++j) {
      TokenStream::Proposal proposal;
      const bool drafted = j < s.checking;
      if (drafted) {
        proposal.token = s.check[j + 1];
        if (!s.draft_probs.empty()) proposal.probs = s.draft_probs.data() + j * logits->size(1);
      }
      TokenStream::Step st = s.stream->Next(logits->select(0, sample_row + j).data_ptr<float>(),
                                            drafted ? &proposal : nullptr);
      if (!s.has_first) {
        s.has_first = true;
        s.first_token = Clock::now();
      }
      s.next = st.token;
      if (s.draft) s.context.push_back(st.token);
      if (st.logprobs && s.job->on_logprobs) s.job->on_logprobs(*st.logprobs);
      if (s.job->on_token && (!st.text.empty() || !st.done)) {
        s.job->on_token(st.token, st.text);
        ++s.sent_tokens;
      }
      if (st.done) {
        done.emplace_back(i, FinishReason::kLength);
        finished = true;
      } else if (j + 1 < sampled_rows) {  // between tokens of one check: none once ended
        if (auto reason = EndedEarly(s, Clock::now())) {
          done.emplace_back(i, *reason);
          finished = true;
        }
      }
      if (drafted && st.accepted) ++kept;
      if (drafted && !st.accepted) break;
    }
    if (s.checking > 0) {
      // Keep next and the drafted tokens that were kept; the rest of both caches is rolled back.
      lane.cache.set_length(s.slot, before + 1 + kept);
      s.draft->cache.set_length(s.slot, std::min(s.draft->cache.length(s.slot), before + 1 + kept));
      s.drafted += s.checking;
      s.accepted += kept;
      ++s.rounds;
      if (opt_.on_draft_checked)
        opt_.on_draft_checked(lane.shape, s.draft->shape, s.checking, kept);
    }
    // The context is full: stop with LENGTH rather than overrunning the cache.
    if (!finished && lane.cache.length(s.slot) + 1 >= lane.cache.max_len())
      done.emplace_back(i, FinishReason::kLength);
  }
  for (auto it = done.rbegin(); it != done.rend(); ++it) Finish(lane, it->first, it->second);
  if (opt_.on_lane_step) opt_.on_lane_step(lane.shape, static_cast<int64_t>(lane.seqs.size()));
}

std::string Scheduler::CacheKey(const Lane& lane) {
  return lane.merged ? lane.shape.ToString() + "#merged" : lane.shape.ToString();
}

void Scheduler::ScorePrompt(Seq& s, const at::Tensor& logits, int64_t first_row, int64_t rows) {
  const std::vector<int32_t>& p = s.job->prompt;
  const int64_t vocab = logits.size(1);
  TokenLogprobs lp;
  for (int64_t j = 0; j < rows; ++j) {
    const size_t pos = s.fed + static_cast<size_t>(j) + 1;  // the token row j predicts
    if (pos >= p.size()) break;
    prompt_scorer_.Read(logits.select(0, first_row + j).data_ptr<float>(), vocab);
    lp.token = p[pos];
    lp.logprob = prompt_scorer_.Of(lp.token);
    prompt_scorer_.Top(std::max(0, std::min(s.job->gen.logprobs, kMaxTopLogprobs)), lp.top);
    if (s.job->on_prompt_logprobs) s.job->on_prompt_logprobs(lp);
  }
}

bool Scheduler::CachesPrompt(const Job& j) const {
  return opt_.prompt_cache_bytes > 0 && !j.for_profiling;
}

bool Scheduler::ReusesPrompt(const Job& j) const {
  return CachesPrompt(j) && !j.gen.prompt_logprobs;
}

bool Scheduler::PrefixComingUp(const Lane& lane, const Seq& s) const {
  const std::vector<int32_t>& p = s.job->prompt;
  if (!ReusesPrompt(*s.job) || p.size() < 2) return false;
  const std::string key = CacheKey(lane);
  const int64_t block = prefix_cache_.options().block_tokens;
  const auto usable_end = p.end() - 1;  // the last prompt token is always computed (its logits)
  int64_t cached = -1;
  for (const Seq& o : lane.seqs) {
    if (&o == &s || o.awaiting_prefix || o.job->for_profiling || o.cache_key != key ||
        o.fed >= o.job->prompt.size())
      continue;
    const auto& q = o.job->prompt;
    const int64_t common =
        std::mismatch(p.begin(), usable_end, q.begin(), q.end()).first - p.begin();
    // What `o` publishes while it prefills: the whole blocks of its prompt. The shared prefix is
    // restorable once the blocks that cover it are out.
    const int64_t shared = std::min(common, static_cast<int64_t>(q.size()) / block * block);
    const int64_t covering = (shared + block - 1) / block * block;
    if (static_cast<int64_t>(o.fed) >= covering) continue;  // its blocks are out already
    if (cached < 0) cached = prefix_cache_.Cached(key, p, static_cast<int64_t>(p.size()) - 1);
    if (shared > cached) return true;
  }
  return false;
}

void Scheduler::RestorePrefix(Lane& lane, Seq& s) {
  s.awaiting_prefix = false;
  s.cache_key = CacheKey(lane);
  // Scoring needs logits at every prompt position: nothing restored (what it computes is
  // published all the same).
  if (!ReusesPrompt(*s.job)) return;
  const std::vector<int32_t>& p = s.job->prompt;
  const int64_t usable = static_cast<int64_t>(p.size()) - 1;
  // Less than a block (a BOS, a template's first tokens) saves nothing worth a copy, and would
  // only change how the rest is batched: whole prompts, or a block at least.
  s.cached_tokens = prefix_cache_.Restore(s.cache_key, p, usable, lane.cache, s.slot,
                                          std::min(usable, prefix_cache_.options().block_tokens));
  s.fed = static_cast<size_t>(s.cached_tokens);
  if (s.draft && s.draft->cache.length(s.slot) == 0)
    prefix_cache_.Restore(DraftCacheKey(*s.draft), p, usable, s.draft->cache, s.slot);
  ++(s.cached_tokens > 0 ? prompt_hits_ : prompt_misses_);
  prompt_cached_ += s.cached_tokens;
  if (s.cached_tokens > 0)
    spdlog::debug("[{}] scheduler: {} of {} prompt tokens from the prompt cache", s.job->request_id,
                  s.cached_tokens, p.size());
}

void Scheduler::PublishPrefix(Lane& lane, Seq& s, bool finished) {
  if (!CachesPrompt(*s.job) || s.awaiting_prefix ||
      s.cache_key != CacheKey(lane))  // the lane's model changed under it: its KV is mixed
    return;
  try {
    if (!finished) {
      prefix_cache_.Insert(s.cache_key, s.job->prompt, static_cast<int64_t>(s.fed), lane.cache,
                           s.slot);
      return;
    }
    // The conversation so far: prompt and the tokens generated, as far as the KV holds them (the
    // last sampled token was never fed).
    std::vector<int32_t> tokens(s.job->prompt);
    tokens.insert(tokens.end(), s.stream->tokens().begin(), s.stream->tokens().end());
    prefix_cache_.Insert(s.cache_key, tokens, lane.cache.length(s.slot), lane.cache, s.slot);
    if (s.draft)
      prefix_cache_.Insert(DraftCacheKey(*s.draft), s.context, s.draft->cache.length(s.slot),
                           s.draft->cache, s.slot);
  } catch (...) {  // a cache that cannot grow only costs later prefills
    spdlog::warn("[{}] scheduler: prompt cache insert failed: {}", s.job->request_id,
                 std::string(StatusFromException(std::current_exception(), "cache").message()));
  }
}

std::string Scheduler::PromptCacheFile(const std::string& key) const {
  std::string name = opt_.prompt_cache_tag + "-" + key;
  for (char& c : name)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '=' && c != ',' && c != '.' &&
        c != '-')
      c = '_';
  return opt_.prompt_cache_dir + "/" + name + ".kvcache";
}

void Scheduler::LoadSavedPrefixes(const std::string& key, const KVCache& layout_of) {
  if (opt_.prompt_cache_dir.empty() || opt_.prompt_cache_bytes <= 0 ||
      !prompt_cache_loaded_.insert(key).second)
    return;
  const std::string path = PromptCacheFile(key);
  if (access(path.c_str(), F_OK) != 0) return;
  const int64_t before = prefix_cache_.stats().blocks;
  if (absl::Status st = prefix_cache_.Load(key, path, layout_of); !st.ok()) {
    spdlog::warn("scheduler: saved prompt cache of {} not loaded: {}", key,
                 std::string(st.message()));
    return;
  }
  spdlog::info("scheduler: prompt cache of {}: {} blocks loaded from {}", key,
               prefix_cache_.stats().blocks - before, path);
}

void Scheduler::SavePromptCache() {
  if (opt_.prompt_cache_dir.empty() || opt_.prompt_cache_bytes <= 0) return;
  for (const std::string& key : prefix_cache_.keys()) {
    const std::string path = PromptCacheFile(key);
    if (absl::Status st = prefix_cache_.Save(key, path); !st.ok()) {
      spdlog::warn("scheduler: prompt cache of {} not saved: {}", key, std::string(st.message()));
      continue;
    }
    spdlog::info("scheduler: prompt cache of {} saved to {}", key, path);
  }
}

void Scheduler::FailLane(const std::string& key, const absl::Status& error) {
  auto it = lanes_.find(key);
  if (it == lanes_.end()) return;
  Lane& lane = *it->second;
  // Counted before the requests end: a client whose stream ended must see the failure in stats().
  ++lane_failures_;
  for (size_t i = lane.seqs.size(); i-- > 0;) {
    spdlog::error("[{}] scheduler: step on {} failed: {}", lane.seqs[i].job->request_id, key,
                  std::string(error.message()));
    try {
      Finish(lane, i, FinishReason::kError, error);
    } catch (...) {  // the sequence's state is broken too: end it without its held-back text
      if (Draft* d = lane.seqs[i].draft) {
        auto source = lanes_.find(d->key);
        if (source != lanes_.end()) --source->second->drafting_for_others;
      }
      lane.slot_used[lane.seqs[i].slot] = false;
      JobResult r;
      r.reason = FinishReason::kError;
      r.error = error;
      r.shape = lane.shape;
      if (!lane.seqs[i].counted_out) --running_;
      lane.seqs[i].job->on_done(r);
      lane.seqs.erase(lane.seqs.begin() + static_cast<std::ptrdiff_t>(i));
    }
  }
  cache_bytes_ -= lane.bytes + lane.delta_bytes;  // a merged copy (or a build's reservation)
  if (lane.merged) --merged_lanes_;
  lanes_.erase(it);  // a build in flight for it is dropped when it arrives
  lane_count_ = static_cast<int64_t>(lanes_.size());
}

bool Scheduler::SharedStep(std::vector<std::pair<std::string, absl::Status>>& failed) {
  const auto step_started = Clock::now();
  bool any = false;
  std::vector<std::pair<const std::string*, Lane*>>& ready = step_lanes_;
  ready.clear();
  std::vector<std::pair<const std::string*, Lane*>>& begun = step_begun_;
  begun.clear();
  for (auto& [k, lane] : lanes_) {
    if (lane->seqs.empty()) continue;
    any = true;
    try {
      if (BeginStep(*lane)) begun.emplace_back(&k, lane.get());
    } catch (...) {
      failed.emplace_back(k, StatusFromException(std::current_exception(), "engine"));
    }
  }
  // Every lane's drafts, round by round, each round one pass for all of them; then the checks go
  // into the step's pass with everyone else's rows.
  std::vector<DraftPlan>& plans = draft_plans_;
  plans.clear();
  for (auto& [k, lane] : begun)
    if (!lane->drafts.empty()) PlanDrafts(*lane, plans);
  RunDrafts(plans);
  for (auto& [k, lane] : begun) {
    try {
      if (CollectInputs(*lane)) ready.emplace_back(k, lane);
    } catch (...) {
      failed.emplace_back(*k, StatusFromException(std::current_exception(), "engine"));
    }
  }
  if (ready.empty()) return any;
  const auto started = Clock::now();
  // One pass over every lane's rows; a lane alone runs its own Forward (the same kernels).
  absl::Status pass = absl::OkStatus();
  SharedPassStats pass_stats;
  std::vector<SharedForwardGroup>& groups = step_groups_;
  groups.clear();
  try {
    const bool on_views = static_cast<int64_t>(ready.size()) > opt_.merged_copies_up_to_lanes;
    for (auto& [k, lane] : ready) {
      Engine* engine = lane->engine.get();
      if (on_views && lane->view_engine) {
        engine = lane->view_engine.get();
        ++merged_lane_steps_on_views_;
      }
      groups.push_back({.engine = engine,
                        .cache = &lane->cache,
                        .seqs = lane->inputs,
                        .layer_keys = lane->layer_keys});
    }
    pass = RunPass(groups, &pass_stats);
  } catch (...) {
    // The pass's state is unknown for every lane in it.
    const absl::Status error = StatusFromException(std::current_exception(), "engine");
    for (auto& [k, lane] : ready) failed.emplace_back(*k, error);
    return true;
  }
  if (opt_.on_shared_step && ready.size() > 1)
    opt_.on_shared_step(pass_stats, static_cast<int64_t>(ready.size()), Ms(started, Clock::now()));
  // Every step teaches the step-time model: its rows (every new token is one), the weights it
  // streamed and its whole time, preparing and sampling included (what each of its sequences
  // waits per token). The rows of prompts (and checks) are also averaged: a sequence shares its
  // steps with the prompts of the requests arriving meanwhile.
  std::vector<std::pair<Shape, int64_t>>& batch = step_batch_;
  batch.clear();
  double prompt_mb = 0;
  {
    std::lock_guard<std::mutex> l(load_mu_);
    for (auto& [k, lane] : ready) {
      int64_t tokens = 0, extra = 0;
      for (const SeqInput& in : lane->inputs) {
        tokens += static_cast<int64_t>(in.tokens.size());
        extra += static_cast<int64_t>(in.tokens.size()) - 1;
      }
      batch.emplace_back(lane->shape, tokens);
      prompt_mb += static_cast<double>(extra) * CostOf(lane->shape).row_mb;
    }
  }
  if (pass.ok()) {
    for (size_t i = 0; i < ready.size(); ++i) AddChoices(*ready[i].second, groups[i].logits);
    ChooseTokens();
  }
  for (size_t i = 0; i < ready.size(); ++i) {
    Lane& lane = *ready[i].second;
    try {
      if (!pass.ok()) {
        FinishStep(lane, pass);
      } else {
        FinishStep(lane, groups[i].logits);
      }
    } catch (...) {
      failed.emplace_back(*ready[i].first, StatusFromException(std::current_exception(), "engine"));
    }
  }
  if (pass.ok()) {
    const double ms = Ms(step_started, Clock::now());
    std::lock_guard<std::mutex> l(load_mu_);
    const auto [union_mb, row_mb] = BatchMb(batch);
    const double predicted = step_model_.Predict(union_mb, row_mb);
    step_model_.Observe(union_mb, row_mb, ms);
    prompt_mb_per_step_ += 0.02 * (prompt_mb - prompt_mb_per_step_);
    if (step_model_.observed() % 500 == 0) {
      const auto& c = step_model_.coefficients();
      spdlog::info(
          "scheduler: step time {:.2f} ms (predicted {:.2f}) for {:.0f} MB streamed, {:.0f} MB of "
          "rows; model ({:.3f} ms + {:.4f} ms/MB streamed + {:.5f} ms/MB of rows) x {:.2f}",
          ms, predicted, union_mb, row_mb, c[0], c[1], c[2], step_model_.correction());
    }
  }
  return true;
}

const Scheduler::ShapeCost& Scheduler::CostOf(const Shape& s) const {
  const std::pair<int64_t, double> key{s.depth, s.width};  // no string: looked up every step
  auto it = shape_costs_.find(key);
  if (it != shape_costs_.end()) return it->second;
  ShapeCost c;
  const ModelConfig& cfg = supernet_.base().config;
  const double H = static_cast<double>(cfg.hidden_size), hd = static_cast<double>(cfg.head_dim);
  const double G = static_cast<double>(cfg.group_size());
  const double mb = BytesPerWeight(opt_.weights_format) / 1e6;
  const DepthEntry* d = supernet_.spec().FindDepth(s.depth);
  const auto* w = supernet_.spec().FindWidth(s.width);
  if (d && w) {
    for (int l : d->layers) {
      const double g = static_cast<double>(w->alloc.kv_groups[l]);
      const double ch = static_cast<double>(w->alloc.channels[l]);
      // q and o: g·G heads; k and v: g heads; gate, up and down: ch channels.
      const double layer = (2 * g * G * hd * H + 2 * g * hd * H + 3 * ch * H) * mb;
      c.layer_mb.emplace_back(l, layer);
      c.row_mb += layer;
    }
  }
  c.head_mb = static_cast<double>(cfg.vocab_size) * H * mb;
  c.row_mb += c.head_mb;
  return shape_costs_.emplace(key, std::move(c)).first->second;
}

std::pair<double, double> Scheduler::BatchMb(
    const std::vector<std::pair<Shape, int64_t>>& shapes) const {
  // Per supernet layer, the MB of its widest shape in the batch (scratch under load_mu_).
  std::vector<double>& widest = widest_scratch_;
  widest.assign(static_cast<size_t>(supernet_.base().config.num_hidden_layers), 0.0);
  double head = 0, rows = 0;
  for (const auto& [shape, n] : shapes) {
    if (n <= 0) continue;
    const ShapeCost& c = CostOf(shape);
    for (const auto& [layer, mb] : c.layer_mb)
      widest[static_cast<size_t>(layer)] = std::max(widest[static_cast<size_t>(layer)], mb);
    head = std::max(head, c.head_mb);
    rows += static_cast<double>(n) * c.row_mb;
  }
  double streamed = head;
  for (double mb : widest) streamed += mb;
  return {streamed, rows};
}

bool Scheduler::HoldForBudgets(const Job& job, Clock::time_point now) {
  if (job.decode_target_ms || job.for_profiling || opt_.hold_for_budgets_ms <= 0 ||
      !opt_.shared_steps ||
      now - job.enqueued > std::chrono::milliseconds(opt_.hold_for_budgets_ms))
    return false;
  std::optional<double> tightest;
  std::vector<std::pair<Shape, int64_t>>& batch = admit_batch_;
  batch.clear();
  for (auto& [k, lane] : lanes_) {
    if (lane->seqs.empty()) continue;
    batch.emplace_back(lane->shape, static_cast<int64_t>(lane->seqs.size()));
    for (const Seq& s : lane->seqs)
      if (s.job->decode_target_ms)
        tightest = std::min(tightest.value_or(*s.job->decode_target_ms), *s.job->decode_target_ms);
  }
  if (!tightest) return false;
  batch.emplace_back(job.shape, 1);
  std::lock_guard<std::mutex> l(load_mu_);
  const auto [union_mb, row_mb] = BatchMb(batch);
  return step_model_.Predict(union_mb, row_mb + prompt_mb_per_step_) >
         opt_.budget_headroom * *tightest;
}

void Scheduler::PublishLoad() {
  RunningLoad load;
  for (auto& [k, lane] : lanes_) {
    if (lane->seqs.empty()) continue;
    load.shapes.emplace_back(lane->shape, static_cast<int64_t>(lane->seqs.size()));
    for (const Seq& s : lane->seqs)
      if (s.job->decode_target_ms) load.targets.push_back(*s.job->decode_target_ms);
  }
  std::lock_guard<std::mutex> l(load_mu_);
  running_load_ = std::move(load);
}

LoadEstimate Scheduler::EstimateLoad(const Shape& shape) const {
  std::vector<std::pair<Shape, int64_t>> waiting;
  std::vector<double> targets;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (const auto& j : queue_) {
      waiting.emplace_back(j->shape, 1);
      if (j->decode_target_ms) targets.push_back(*j->decode_target_ms);
    }
  }
  std::lock_guard<std::mutex> l(load_mu_);
  // Sequences per shape, running and waiting; a shape runs at most slots_per_shape at once.
  std::map<std::string, std::pair<Shape, int64_t>> per_shape;
  for (const auto& [s, n] : running_load_.shapes) {
    auto& e = per_shape[s.ToString()];
    e.first = s;
    e.second += n;
  }
  for (const auto& [s, n] : waiting) {
    auto& e = per_shape[s.ToString()];
    e.first = s;
    e.second += n;
  }
  LoadEstimate est;
  est.free_slots = opt_.slots_per_shape;
  if (auto it = per_shape.find(shape.ToString()); it != per_shape.end())
    est.free_slots -= it->second.second;
  std::vector<std::pair<Shape, int64_t>> batch;
  for (auto& [k, e] : per_shape) {
    est.sequences += e.second;
    batch.emplace_back(e.first, std::min(e.second, opt_.slots_per_shape));
  }
  targets.insert(targets.end(), running_load_.targets.begin(), running_load_.targets.end());
  if (!targets.empty()) est.tightest_target_ms = *std::min_element(targets.begin(), targets.end());
  const auto [now_union, now_rows] = BatchMb(batch);
  est.current_ms =
      batch.empty() ? 0.0 : step_model_.Predict(now_union, now_rows + prompt_mb_per_step_);
  batch.emplace_back(shape, 1);
  const auto [with_union, with_rows] = BatchMb(batch);
  est.decode_ms = step_model_.Predict(with_union, with_rows + prompt_mb_per_step_);
  return est;
}

void Scheduler::Loop() {
  at::InferenceMode guard;  // thread-local: the worker never builds autograd graphs
  bool trimmed = true;
  bool stepping = false;  // this thread's copy of stepping_ (which admitting a build also sets)
  for (;;) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (stop_) {
        for (auto& j : queue_) j->cancelled = true;
        break;
      }
    }
    SwapInFinishedBuilds();
    Admit();
    bool any = false;
    int64_t kv = 0;
    std::vector<std::pair<std::string, absl::Status>> failed;
    if (opt_.shared_steps) {
      any = SharedStep(failed);
      for (auto& [k, lane] : lanes_) kv += lane->cache.bytes();
    } else {
      for (auto& [k, lane] : lanes_) {
        if (lane->seqs.empty()) continue;
        any = true;
        try {
          Step(*lane);
        } catch (...) {
          failed.emplace_back(k, StatusFromException(std::current_exception(), "engine"));
          continue;
        }
        kv += lane->cache.bytes();
      }
    }
    for (const auto& [k, error] : failed) FailLane(k, error);
    // Queued builds wait while sequences run (BuilderLoop): tell a waiting one when that ends.
    if (any && !stepping) {
      std::lock_guard<std::mutex> l(mu_);
      stepping_ = stepping = true;
    } else if (!any) {
      bool was;
      {
        std::lock_guard<std::mutex> l(mu_);
        was = stepping_;
        stepping_ = stepping = false;
        if (was) idle_since_ = Clock::now();
      }
      if (was) build_cv_.notify_all();
    }
    PublishLoad();
    kv_bytes_ = kv + KVCache::PooledArenaBytes();  // finished slots' memory kept for reuse
    EvictIdleLanes();
    if (any) {
      trimmed = false;
      continue;
    }
    if (!trimmed) {  // idle: once it lasts, drop the activations and hand freed pages to the OS
      // idle_since_ is written only on this thread (above): read here without the lock.
      const Clock::time_point now = Clock::now();
      if (now - idle_since_ >= std::chrono::milliseconds(opt_.idle_trim_ms)) {
        const int64_t pooled = KVCache::PooledArenaBytes();
        *workspace_ = EngineWorkspace{};
        shared_workspace_ = SharedWorkspace{};
        KVCache::ReleasePooledArenas(static_cast<size_t>(opt_.idle_kv_keep_bytes));
        malloc_trim(0);
        trimmed = true;
        ++idle_trims_;
        spdlog::debug(
            "scheduler: idle for {} ms: activations and {:.1f} MB of KV arenas released ({:.1f} "
            "MB kept)",
            Ms(idle_since_, now), (pooled - KVCache::PooledArenaBytes()) / 1e6,
            KVCache::PooledArenaBytes() / 1e6);
      }
    }
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait_for(l, std::chrono::milliseconds(50),
                 [&] { return !queue_.empty() || !built_.empty() || stop_; });
  }
  // Stopped: queued and running jobs end as CANCELLED.
  Admit();
  for (auto& [k, lane] : lanes_)
    for (size_t i = lane->seqs.size(); i-- > 0;) Finish(*lane, i, FinishReason::kCancelled);
  SavePromptCache();
}

}  // namespace amoeba
