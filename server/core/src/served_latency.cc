#include "server/served_latency.h"

#include <future>

namespace amoeba {
namespace {

// Greedy decode of `tokens` tokens after BOS; ms per token after the first (0 on failure).
double TimeOneJob(Scheduler& scheduler, const Shape& shape, int32_t bos, int tokens) {
  auto job = std::make_shared<Job>();
  job->request_id = "profile";
  job->shape = shape;
  job->prompt = {bos};
  job->gen.max_new_tokens = tokens;
  job->gen.stop_at_eos = false;
  job->for_profiling = true;
  std::promise<JobResult> done;
  job->on_token = [](int32_t, std::string_view) {};
  job->on_done = [&done](const JobResult& r) { done.set_value(r); };
  if (!scheduler.Submit(job).ok()) return 0;
  const JobResult r = done.get_future().get();
  if (r.reason == FinishReason::kError || r.completion_tokens < 2) return 0;
  return (r.total_ms - r.ttft_ms) / static_cast<double>(r.completion_tokens - 1);
}

}  // namespace

std::vector<ShapeLatency> ProfileServedLatency(Scheduler& scheduler,
                                               const std::vector<ShapeProfile>& shapes, int32_t bos,
                                               const ServedLatencyOptions& o) {
  std::vector<ShapeLatency> out(shapes.size());
  if (shapes.empty()) return out;
  std::vector<int> tokens(shapes.size(), o.min_tokens);
  for (size_t i = 0; i < shapes.size(); ++i) {
    out[i].shape = shapes[i].shape;
    out[i].decode_weight_bytes = shapes[i].decode_weight_bytes;
    if (o.bandwidth_gbs > 0)
      out[i].predicted_ms =
          static_cast<double>(shapes[i].decode_weight_bytes) / (o.bandwidth_gbs * 1e6);
  }
  // Warm-up (the largest shape), then a first pass that builds every lane and sizes the runs.
  (void)TimeOneJob(scheduler, shapes.front().shape, bos, o.max_tokens);
  for (size_t i = 0; i < shapes.size(); ++i) {
    const double ms = TimeOneJob(scheduler, shapes[i].shape, bos, o.min_tokens);
    tokens[i] =
        ms > 0 ? std::clamp(static_cast<int>(o.min_round_ms / ms) + 1, o.min_tokens, o.max_tokens)
               : o.min_tokens;
  }
  for (int r = 0; r < o.rounds; ++r) {
    for (size_t k = 0; k < shapes.size(); ++k) {
      const size_t i = r % 2 ? shapes.size() - 1 - k : k;
      const double ms = TimeOneJob(scheduler, shapes[i].shape, bos, tokens[i]);
      if (ms > 0) out[i].rounds.push_back(ms);
    }
  }
  for (auto& s : out) s.ms_per_token = MedianOf(s.rounds);
  MarkLatencyOutliers(out, o.outlier_factor);
  FitLatencyLine(out);
  return out;
}

}  // namespace amoeba
