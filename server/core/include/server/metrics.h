// Prometheus metrics (prometheus-cpp registry and text serializer), labelled by shape. The core
// counts; the HTTP front end serves Render() (on its own port and under /metrics).
#pragma once
#include <memory>
#include <string>
#include <string_view>

namespace amoeba {

class Metrics {
 public:
  Metrics();
  ~Metrics();
  // The current text exposition (also what /metrics returns), and its content type.
  std::string Render() const;
  static constexpr const char* kContentType = "text/plain; version=0.0.4; charset=utf-8";

  void ObserveRequest(const std::string& shape, const std::string& status, double queue_s,
                      double ttft_s, double e2e_s, int64_t prompt_tokens, int64_t completion_tokens,
                      int64_t cached_tokens = 0);
  void ObserveInterToken(const std::string& shape, double seconds);
  // One speculative check: `drafted` tokens proposed by `draft`, `accepted` of them kept.
  void ObserveDraftCheck(const std::string& target, const std::string& draft, int64_t drafted,
                         int64_t accepted);
  // One decode step shared by `shapes` lanes: its rows, the weight bytes it streamed and what the
  // shapes stepping alone would have streamed, its engine time.
  void ObserveSharedStep(int64_t shapes, int64_t rows, int64_t weight_bytes,
                         int64_t weight_bytes_alone, double seconds);
  // `route` is one of the front end's own route names (or "other"): labels stay bounded.
  void ObserveHttp(std::string_view route, int status);
  void SetRunning(const std::string& shape, int64_t n);
  // cache_bytes: merged subnet copies; kv_bytes: KV caches (reported apart).
  void SetGlobal(int64_t waiting, int64_t cache_bytes, int64_t kv_bytes, int64_t cache_hits,
                 int64_t cache_misses, int64_t lanes);
  // The prompt cache's blocks (capped by --prompt-cache-mb) and the prompt tokens computed so far.
  void SetPromptCache(int64_t bytes, int64_t blocks, int64_t prefilled_tokens);
  // The scheduler's per-shape copies: merged lanes now, and since start (cumulative, as
  // SchedulerStats counts them) merged copies built, idle lanes evicted, merged lanes' steps run on
  // their views (steps over many shapes), failed builds and failed lanes.
  struct LaneCounts {
    int64_t merged_lanes = 0, merges_built = 0, evictions = 0, merged_lane_steps_on_views = 0;
    int64_t build_failures = 0, lane_failures = 0;
  };
  void SetLanes(const LaneCounts& c);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace amoeba
