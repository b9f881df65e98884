#include "server/scheduler.h"

#include <malloc.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "model/packed_linear.h"

namespace amoeba {

namespace {
double Ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// What an exception means for the requests it hits.
absl::Status StatusFromException(std::exception_ptr e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory");
  } catch (const c10::Error& err) {
    const std::string m = err.what_without_backtrace();
    if (m.find("alloc") != std::string::npos || m.find("memory") != std::string::npos)
      return absl::ResourceExhaustedError("out of memory");
    return absl::InternalError(absl::StrCat("engine error: ", m.substr(0, 200)));
  } catch (const std::exception& err) {
    return absl::InternalError(
        absl::StrCat("engine error: ", std::string(err.what()).substr(0, 200)));
  } catch (...) {
    return absl::InternalError("engine error");
  }
}

}  // namespace

Scheduler::Scheduler(const Supernet& supernet, SchedulerOptions options)
    : supernet_(supernet), opt_(std::move(options)) {
  worker_ = std::thread([this] { Loop(); });
  if (opt_.smol && opt_.merge_after_requests > 0) builder_ = std::thread([this] { BuilderLoop(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
    draining_ = true;
  }
  cv_.notify_all();
  build_cv_.notify_all();
  worker_.join();
  if (builder_.joinable()) builder_.join();
}

absl::Status Scheduler::Submit(std::shared_ptr<Job> job) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (draining_) return absl::UnavailableError("server is draining");
    if (static_cast<int64_t>(queue_.size()) >= opt_.max_queue) {
      return absl::ResourceExhaustedError(
          absl::StrCat("queue full (", opt_.max_queue, " waiting requests)"));
    }
    job->enqueued = Clock::now();
    queue_.push_back(std::move(job));
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
  s.merges_built = merges_built_;
  s.evictions = evictions_;
  s.lane_failures = lane_failures_;
  s.build_failures = build_failures_;
  return s;
}

std::unique_ptr<Engine> Scheduler::NewEngine(std::shared_ptr<const Model> model) const {
  EngineOptions eo;
  eo.max_len = opt_.max_context;
  eo.workspace = workspace_;  // one worker thread: all lanes share the activations
  eo.kv_dtype = opt_.kv_dtype;
  return std::make_unique<Engine>(std::move(model), eo);
}

Scheduler::Lane* Scheduler::GetLane(const Shape& s, bool* existed) {
  const std::string key = s.ToString();
  auto it = lanes_.find(key);
  *existed = it != lanes_.end();
  if (*existed) return it->second.get();
  // Views of the supernet (already in the serving dtype); adapters ride along unmerged, so the
  // first request of a shape pays no copy. Hot shapes get a merged copy later (MaybeStartBuild).
  auto m = BuildSubnet(supernet_, opt_.smol, s,
                       {.adapters = AdapterMode::kUnmerged, .uniform_width = false});
  if (!m.ok()) return nullptr;
  auto lane = std::make_unique<Lane>();
  lane->shape = s;
  lane->model = std::make_shared<const Model>(std::move(*m));
  lane->engine = NewEngine(lane->model);
  lane->cache = lane->engine->NewCache(opt_.slots_per_shape);
  lane->slot_used.assign(opt_.slots_per_shape, false);
  spdlog::info("scheduler: new lane {} (supernet views{})", key,
               opt_.smol ? ", adapters unmerged" : "");
  lane->last_used = Clock::now();
  Lane* raw = lane.get();
  lanes_[key] = std::move(lane);
  lane_count_ = static_cast<int64_t>(lanes_.size());
  return raw;
}

void Scheduler::MaybeStartBuild(Lane& lane) {
  if (!opt_.smol || opt_.merge_after_requests <= 0 || lane.merged || lane.building ||
      lane.merge_failed)
    return;
  if (lane.requests < opt_.merge_after_requests) return;
  // The merged copy keeps only panels in the serving dtype (PackWeights + DropPackedRowMajor):
  // the sliced projections' element count in that dtype.
  int64_t need = 0;
  for (const LayerWeights& l : lane.model->layers)
    for (int p = 0; p < kNumProj; ++p)
      need += static_cast<int64_t>(static_cast<double>(l.proj(static_cast<Proj>(p)).numel()) *
                                   BytesPerWeight(opt_.weights_format));
  if (!EvictIdleLanes(&lane, need)) return;  // no room under the cap: stay unmerged
  Build b;
  b.key = lane.shape.ToString();
  b.shape = lane.shape;
  lane.building = true;
  lane.bytes = need;  // reserved now, so queued builds cannot overshoot the cap together
  cache_bytes_ += need;
  spdlog::info("scheduler: building merged copy of {} in the background", b.key);
  {
    std::lock_guard<std::mutex> l(mu_);
    builds_.push_back(std::move(b));
  }
  build_cv_.notify_all();
}

void Scheduler::BuilderLoop() {
  at::InferenceMode guard;
  // Builds are background work: below the decode loop in the kernel's eyes (threads this one
  // starts, e.g. its OpenMP team, inherit the niceness).
  setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10);
  for (;;) {
    Build b;
    {
      std::unique_lock<std::mutex> l(mu_);
      build_cv_.wait(l, [&] { return stop_ || !builds_.empty(); });
      if (stop_) return;
      b = std::move(builds_.front());
      builds_.pop_front();
    }
    const auto t0 = Clock::now();
    try {
      if (opt_.fault_hook) opt_.fault_hook("build", b.shape);
      auto merged = BuildSubnet(supernet_, opt_.smol, b.shape,
                                {.adapters = AdapterMode::kMerged, .uniform_width = false});
      if (!merged.ok()) throw std::runtime_error(std::string(merged.status().message()));
      // The merged projections get panels; the rest share the base's.
      PackWeights(*merged, opt_.weights_format);
      DropPackedRowMajor(*merged);
      b.result = std::make_shared<const Model>(std::move(*merged));
      spdlog::info("scheduler: merged copy of {} built in {:.0f} ms", b.key, Ms(t0, Clock::now()));
    } catch (...) {
      b.result.reset();
      spdlog::error("scheduler: merged copy of {} failed: {}; the shape stays unmerged", b.key,
                    std::string(StatusFromException(std::current_exception()).message()));
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      built_.push_back(std::move(b));
    }
    cv_.notify_all();  // wakes an idle worker to swap it in
  }
}

void Scheduler::SwapInFinishedBuilds() {
  std::deque<Build> done;
  {
    std::lock_guard<std::mutex> l(mu_);
    done.swap(built_);
  }
  for (Build& b : done) {
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
    lane.engine = NewEngine(lane.model);
    lane.merged = true;
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
      // Only merged copies cost memory; lanes running on views are free to keep.
      if (!l->seqs.empty() || l.get() == keep || l->bytes == 0 || l->building) continue;
      if (!victim || l->last_used < victim->last_used) {
        victim = l.get();
        key = k;
      }
    }
    if (!victim) return false;
    cache_bytes_ -= victim->bytes;
    if (victim->merged) --merged_lanes_;
    spdlog::info("scheduler: evict idle lane {} (merged copy, {} MB)", key, victim->bytes >> 20);
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
      error = StatusFromException(std::current_exception());
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
    if (slot < 0) {
      keep.push_back(std::move(job));  // lane full: stays queued, in order
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

void Scheduler::Finish(Lane& lane, size_t index, FinishReason reason, absl::Status error) {
  Seq& s = lane.seqs[index];
  std::string_view rest = s.stream->Finish(reason);
  if (!rest.empty() && s.job->on_token) s.job->on_token(-1, rest);
  const auto now = Clock::now();
  JobResult r;
  r.reason = s.stream->finish_reason();
  r.error = std::move(error);
  r.prompt_tokens = static_cast<int64_t>(s.job->prompt.size());
  r.completion_tokens = s.sent_tokens;  // what the client received, not what was sampled
  r.queue_ms = Ms(s.job->enqueued, s.started);
  r.ttft_ms = s.has_first ? Ms(s.job->enqueued, s.first_token) : 0;
  r.total_ms = Ms(s.job->enqueued, now);
  r.shape = lane.shape;
  s.job->on_done(r);
  lane.slot_used[s.slot] = false;
  lane.cache.Reset(s.slot);  // gives the slot's KV memory back
  lane.seqs.erase(lane.seqs.begin() + static_cast<std::ptrdiff_t>(index));
  --running_;
}

void Scheduler::Step(Lane& lane) {
  const auto now = Clock::now();
  // Cancellation and deadlines are honoured before spending a step on the sequence.
  for (size_t i = lane.seqs.size(); i-- > 0;) {
    Seq& s = lane.seqs[i];
    // A passed deadline first: gRPC cancels the call when it passes, and the request ended by
    // its deadline, not by the client.
    if ((s.job->deadline && now >= *s.job->deadline) || (s.time_limit && now >= *s.time_limit)) {
      Finish(lane, i, FinishReason::kTimeLimit);
    } else if (s.job->cancelled) {
      Finish(lane, i, FinishReason::kCancelled);
    }
  }
  if (lane.seqs.empty()) return;
  lane.last_used = now;
  if (opt_.fault_hook) opt_.fault_hook("step", lane.shape);
  std::vector<SeqInput> inputs;
  inputs.reserve(lane.seqs.size());
  for (Seq& s : lane.seqs) {
    if (s.fed < s.job->prompt.size()) {
      const size_t n = std::min<size_t>(opt_.prefill_chunk, s.job->prompt.size() - s.fed);
      inputs.push_back({s.slot, std::span<const int32_t>(s.job->prompt.data() + s.fed, n)});
    } else {
      inputs.push_back({s.slot, std::span<const int32_t>(&s.next, 1)});
    }
  }
  auto logits = lane.engine->Forward(lane.cache, inputs);
  if (!logits.ok()) {
    spdlog::error("scheduler: step on {} failed: {}", lane.shape.ToString(),
                  logits.status().ToString());
    for (size_t i = lane.seqs.size(); i-- > 0;)
      Finish(lane, i, FinishReason::kError, logits.status());
    return;
  }
  std::vector<size_t> done;
  for (size_t i = 0; i < lane.seqs.size(); ++i) {
    Seq& s = lane.seqs[i];
    if (s.fed < s.job->prompt.size()) {
      s.fed += inputs[i].tokens.size();
      if (s.fed < s.job->prompt.size()) continue;  // more prompt to feed
    }
    TokenStream::Step st =
        s.stream->Next(logits->select(0, static_cast<int64_t>(i)).data_ptr<float>());
    if (!s.has_first) {
      s.has_first = true;
      s.first_token = Clock::now();
    }
    s.next = st.token;
    if (s.job->on_token && (!st.text.empty() || !st.done)) {
      s.job->on_token(st.token, st.text);
      ++s.sent_tokens;
    }
    // The context is full: stop with LENGTH rather than overrunning the cache.
    if (!st.done && lane.cache.length(s.slot) + 1 >= lane.cache.max_len()) {
      done.push_back(i);
      continue;
    }
    if (st.done) done.push_back(i);
  }
  for (auto it = done.rbegin(); it != done.rend(); ++it) Finish(lane, *it, FinishReason::kLength);
  if (opt_.on_lane_step) opt_.on_lane_step(lane.shape, static_cast<int64_t>(lane.seqs.size()));
}

void Scheduler::FailLane(const std::string& key, const absl::Status& error) {
  auto it = lanes_.find(key);
  if (it == lanes_.end()) return;
  Lane& lane = *it->second;
  for (size_t i = lane.seqs.size(); i-- > 0;) {
    spdlog::error("[{}] scheduler: step on {} failed: {}", lane.seqs[i].job->request_id, key,
                  std::string(error.message()));
    try {
      Finish(lane, i, FinishReason::kError, error);
    } catch (...) {  // the sequence's state is broken too: end it without its held-back text
      lane.slot_used[lane.seqs[i].slot] = false;
      JobResult r;
      r.reason = FinishReason::kError;
      r.error = error;
      r.shape = lane.shape;
      lane.seqs[i].job->on_done(r);
      lane.seqs.erase(lane.seqs.begin() + static_cast<std::ptrdiff_t>(i));
      --running_;
    }
  }
  ++lane_failures_;
  cache_bytes_ -= lane.bytes;  // a merged copy, or a build's reservation
  if (lane.merged) --merged_lanes_;
  lanes_.erase(it);  // a build in flight for it is dropped when it arrives
  lane_count_ = static_cast<int64_t>(lanes_.size());
}

void Scheduler::Loop() {
  at::InferenceMode guard;  // thread-local: the worker never builds autograd graphs
  bool trimmed = true;
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
    for (auto& [k, lane] : lanes_) {
      if (lane->seqs.empty()) continue;
      any = true;
      try {
        Step(*lane);
      } catch (...) {
        failed.emplace_back(k, StatusFromException(std::current_exception()));
        continue;
      }
      kv += lane->cache.bytes();
    }
    for (const auto& [k, error] : failed) FailLane(k, error);
    kv_bytes_ = kv;
    EvictIdleLanes();
    if (any) {
      trimmed = false;
      continue;
    }
    if (!trimmed) {  // just went idle: drop the activations and hand freed pages to the OS
      *workspace_ = EngineWorkspace{};
      malloc_trim(0);
      trimmed = true;
    }
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait_for(l, std::chrono::milliseconds(50),
                 [&] { return !queue_.empty() || !built_.empty() || stop_; });
  }
  // Stopped: queued and running jobs end as CANCELLED.
  Admit();
  for (auto& [k, lane] : lanes_)
    for (size_t i = lane->seqs.size(); i-- > 0;) Finish(*lane, i, FinishReason::kCancelled);
}

}  // namespace amoeba
