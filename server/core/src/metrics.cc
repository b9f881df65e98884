#include "server/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <mutex>

namespace amoeba {

struct Metrics::Impl {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  prometheus::Family<prometheus::Histogram>& ttft = prometheus::BuildHistogram()
                                                        .Name("amoeba_time_to_first_token_seconds")
                                                        .Help("Time to first token")
                                                        .Register(*registry);
  prometheus::Family<prometheus::Histogram>& itl = prometheus::BuildHistogram()
                                                       .Name("amoeba_inter_token_latency_seconds")
                                                       .Help("Time between tokens")
                                                       .Register(*registry);
  prometheus::Family<prometheus::Histogram>& e2e = prometheus::BuildHistogram()
                                                       .Name("amoeba_request_latency_seconds")
                                                       .Help("End-to-end latency")
                                                       .Register(*registry);
  prometheus::Family<prometheus::Histogram>& queue = prometheus::BuildHistogram()
                                                         .Name("amoeba_queue_time_seconds")
                                                         .Help("Time waiting for a slot")
                                                         .Register(*registry);
  prometheus::Family<prometheus::Counter>& requests = prometheus::BuildCounter()
                                                          .Name("amoeba_requests_total")
                                                          .Help("Finished requests")
                                                          .Register(*registry);
  prometheus::Family<prometheus::Counter>& tokens = prometheus::BuildCounter()
                                                        .Name("amoeba_tokens_total")
                                                        .Help("Prompt and generated tokens")
                                                        .Register(*registry);
  prometheus::Family<prometheus::Gauge>& running = prometheus::BuildGauge()
                                                       .Name("amoeba_running_requests")
                                                       .Help("Sequences in a batch")
                                                       .Register(*registry);
  prometheus::Family<prometheus::Gauge>& global =
      prometheus::BuildGauge().Name("amoeba_scheduler").Help("Scheduler state").Register(*registry);
  prometheus::Gauge& waiting = global.Add({{"kind", "waiting_requests"}});
  prometheus::Gauge& cache_bytes =
      prometheus::BuildGauge()
          .Name("amoeba_cache_bytes")
          .Help("Merged subnet copies and packed adapter deltas (capped by --cache-mb)")
          .Register(*registry)
          .Add({});
  prometheus::Gauge& kv_bytes = prometheus::BuildGauge()
                                    .Name("amoeba_kv_cache_bytes")
                                    .Help("KV caches of running sequences")
                                    .Register(*registry)
                                    .Add({});
  prometheus::Gauge& lanes = global.Add({{"kind", "lanes"}});
  prometheus::Gauge& merged_lanes = global.Add({{"kind", "merged_lanes"}});
  prometheus::Family<prometheus::Counter>& lane_events =
      prometheus::BuildCounter()
          .Name("amoeba_lane_events_total")
          .Help(
              "Per-shape copies: merged copies built, idle lanes evicted under --cache-mb, steps "
              "a merged lane ran on its supernet views (steps over many shapes), failed builds "
              "and lanes")
          .Register(*registry);
  struct Cumulative {
    prometheus::Counter* counter;
    double last = 0;
    void Advance(int64_t now) {
      const double v = static_cast<double>(now);
      if (v > last) counter->Increment(v - last);
      last = v;
    }
  };
  Cumulative merges_built{&lane_events.Add({{"kind", "merged_copy_built"}})};
  Cumulative evictions{&lane_events.Add({{"kind", "eviction"}})};
  Cumulative steps_on_views{&lane_events.Add({{"kind", "merged_lane_step_on_views"}})};
  Cumulative build_failures{&lane_events.Add({{"kind", "build_failure"}})};
  Cumulative lane_failures{&lane_events.Add({{"kind", "lane_failure"}})};
  prometheus::Family<prometheus::Counter>& cache = prometheus::BuildCounter()
                                                       .Name("amoeba_cache_lookups_total")
                                                       .Help("Subnet cache lookups")
                                                       .Register(*registry);
  prometheus::Family<prometheus::Histogram>& accepted =
      prometheus::BuildHistogram()
          .Name("amoeba_draft_accepted_tokens")
          .Help("Drafted tokens the target kept per check, by target and draft shape")
          .Register(*registry);
  prometheus::Family<prometheus::Counter>& drafted =
      prometheus::BuildCounter()
          .Name("amoeba_draft_tokens_total")
          .Help("Speculative decoding: tokens drafted and kept, by target and draft shape")
          .Register(*registry);
  prometheus::Family<prometheus::Counter>& http_requests =
      prometheus::BuildCounter()
          .Name("amoeba_http_requests_total")
          .Help("HTTP requests by route and status")
          .Register(*registry);
  prometheus::Family<prometheus::Counter>& prompt_lookups =
      prometheus::BuildCounter()
          .Name("amoeba_prompt_cache_lookups_total")
          .Help("Requests that reused a cached prompt prefix (hit) or not (miss), by shape")
          .Register(*registry);
  prometheus::Family<prometheus::Gauge>& prompt_cache =
      prometheus::BuildGauge()
          .Name("amoeba_prompt_cache")
          .Help("Prompt cache blocks and bytes (capped by --prompt-cache-mb)")
          .Register(*registry);
  prometheus::Gauge& prompt_cache_bytes = prompt_cache.Add({{"kind", "bytes"}});
  prometheus::Gauge& prompt_cache_blocks = prompt_cache.Add({{"kind", "blocks"}});
  prometheus::Counter& prefilled = prometheus::BuildCounter()
                                       .Name("amoeba_prefill_tokens_total")
                                       .Help("Prompt tokens computed (not restored from the cache)")
                                       .Register(*registry)
                                       .Add({});
  double last_prefilled = 0;
  prometheus::Counter& hits = cache.Add({{"result", "hit"}});
  prometheus::Counter& misses = cache.Add({{"result", "miss"}});
  double last_hits = 0, last_misses = 0;
  std::mutex mu;

  prometheus::Family<prometheus::Histogram>& shared_step =
      prometheus::BuildHistogram()
          .Name("amoeba_shared_step_seconds")
          .Help("Engine time of decode steps shared by several shapes")
          .Register(*registry);
  prometheus::Family<prometheus::Histogram>& shared_lanes =
      prometheus::BuildHistogram()
          .Name("amoeba_shared_step_shapes")
          .Help("Shapes (lanes) served by one shared step")
          .Register(*registry);
  prometheus::Family<prometheus::Histogram>& shared_rows =
      prometheus::BuildHistogram()
          .Name("amoeba_shared_step_rows")
          .Help("Token rows computed by one shared step")
          .Register(*registry);
  prometheus::Family<prometheus::Counter>& shared_bytes =
      prometheus::BuildCounter()
          .Name("amoeba_shared_step_weight_bytes_total")
          .Help(
              "Weight bytes streamed by shared steps (read), and what stepping each shape on "
              "its own would have streamed (alone)")
          .Register(*registry);
  static prometheus::Histogram::BucketBoundaries Buckets() {
    return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
  }
};

Metrics::Metrics() : impl_(std::make_unique<Impl>()) {}

Metrics::~Metrics() = default;

std::string Metrics::Render() const {
  std::lock_guard<std::mutex> l(impl_->mu);
  return prometheus::TextSerializer().Serialize(impl_->registry->Collect());
}

void Metrics::ObserveHttp(std::string_view route, int status) {
  std::lock_guard<std::mutex> l(impl_->mu);
  impl_->http_requests.Add({{"route", std::string(route)}, {"status", std::to_string(status)}})
      .Increment();
}

void Metrics::ObserveRequest(const std::string& shape, const std::string& status, double queue_s,
                             double ttft_s, double e2e_s, int64_t prompt_tokens,
                             int64_t completion_tokens, int64_t cached_tokens) {
  std::lock_guard<std::mutex> l(impl_->mu);
  impl_->queue.Add({{"shape", shape}}, Impl::Buckets()).Observe(queue_s);
  if (ttft_s > 0) impl_->ttft.Add({{"shape", shape}}, Impl::Buckets()).Observe(ttft_s);
  impl_->e2e.Add({{"shape", shape}}, Impl::Buckets()).Observe(e2e_s);
  impl_->requests.Add({{"shape", shape}, {"status", status}}).Increment();
  impl_->tokens.Add({{"shape", shape}, {"kind", "prompt"}})
      .Increment(static_cast<double>(prompt_tokens));
  impl_->tokens.Add({{"shape", shape}, {"kind", "generated"}})
      .Increment(static_cast<double>(completion_tokens));
  impl_->tokens.Add({{"shape", shape}, {"kind", "cached_prompt"}})
      .Increment(static_cast<double>(cached_tokens));
  if (prompt_tokens > 0)
    impl_->prompt_lookups.Add({{"shape", shape}, {"result", cached_tokens > 0 ? "hit" : "miss"}})
        .Increment();
}

void Metrics::ObserveSharedStep(int64_t shapes, int64_t rows, int64_t weight_bytes,
                                int64_t weight_bytes_alone, double seconds) {
  static const prometheus::Histogram::BucketBoundaries kCounts = {1, 2, 4, 8, 16, 32, 64, 128, 256};
  impl_->shared_step.Add({}, Impl::Buckets()).Observe(seconds);
  impl_->shared_lanes.Add({}, kCounts).Observe(static_cast<double>(shapes));
  impl_->shared_rows.Add({}, kCounts).Observe(static_cast<double>(rows));
  impl_->shared_bytes.Add({{"kind", "read"}}).Increment(static_cast<double>(weight_bytes));
  impl_->shared_bytes.Add({{"kind", "alone"}}).Increment(static_cast<double>(weight_bytes_alone));
}

void Metrics::ObserveDraftCheck(const std::string& target, const std::string& draft,
                                int64_t drafted, int64_t accepted) {
  static const prometheus::Histogram::BucketBoundaries kBuckets = {0, 1, 2, 3, 4, 5, 6, 7, 8};
  impl_->accepted.Add({{"shape", target}, {"draft", draft}}, kBuckets)
      .Observe(static_cast<double>(accepted));
  impl_->drafted.Add({{"shape", target}, {"draft", draft}, {"kind", "drafted"}})
      .Increment(static_cast<double>(drafted));
  impl_->drafted.Add({{"shape", target}, {"draft", draft}, {"kind", "accepted"}})
      .Increment(static_cast<double>(accepted));
}

void Metrics::ObserveInterToken(const std::string& shape, double seconds) {
  std::lock_guard<std::mutex> l(impl_->mu);
  impl_->itl.Add({{"shape", shape}}, Impl::Buckets()).Observe(seconds);
}

void Metrics::SetRunning(const std::string& shape, int64_t n) {
  std::lock_guard<std::mutex> l(impl_->mu);
  impl_->running.Add({{"shape", shape}}).Set(static_cast<double>(n));
}

void Metrics::SetGlobal(int64_t waiting, int64_t cache_bytes, int64_t kv_bytes, int64_t hits,
                        int64_t misses, int64_t lanes) {
  std::lock_guard<std::mutex> l(impl_->mu);
  impl_->waiting.Set(static_cast<double>(waiting));
  impl_->cache_bytes.Set(static_cast<double>(cache_bytes));
  impl_->kv_bytes.Set(static_cast<double>(kv_bytes));
  impl_->lanes.Set(static_cast<double>(lanes));
  if (hits > impl_->last_hits) impl_->hits.Increment(hits - impl_->last_hits);
  if (misses > impl_->last_misses) impl_->misses.Increment(misses - impl_->last_misses);
  impl_->last_hits = static_cast<double>(hits);
  impl_->last_misses = static_cast<double>(misses);
}

void Metrics::SetPromptCache(int64_t bytes, int64_t blocks, int64_t prefilled_tokens) {
  std::lock_guard<std::mutex> l(impl_->mu);
  impl_->prompt_cache_bytes.Set(static_cast<double>(bytes));
  impl_->prompt_cache_blocks.Set(static_cast<double>(blocks));
  const double p = static_cast<double>(prefilled_tokens);
  if (p > impl_->last_prefilled) impl_->prefilled.Increment(p - impl_->last_prefilled);
  impl_->last_prefilled = p;
}

void Metrics::SetLanes(const LaneCounts& c) {
  std::lock_guard<std::mutex> l(impl_->mu);
  impl_->merged_lanes.Set(static_cast<double>(c.merged_lanes));
  impl_->merges_built.Advance(c.merges_built);
  impl_->evictions.Advance(c.evictions);
  impl_->steps_on_views.Advance(c.merged_lane_steps_on_views);
  impl_->build_failures.Advance(c.build_failures);
  impl_->lane_failures.Advance(c.lane_failures);
}

}  // namespace amoeba
