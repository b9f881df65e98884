// The protocol-free core both front ends (gRPC and HTTP) call: one request type with its
// validation and limits, target resolution (shape, budget or neither), job preparation
// (tokenising, sampling options), planning, auth. Front ends only translate their wire formats
// to and from these types, so nothing is validated twice or in only one of them.
#pragma once
#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "server/export_job.h"
#include "server/metrics.h"
#include "server/planner.h"
#include "server/scheduler.h"
#include "subnet/supernet.h"

namespace amoeba {

// Every limit is checked before any work is done for a request (docs/api.md lists them).
struct ServiceLimits {
  int64_t max_prompt_tokens = 2048;
  int64_t max_prompt_bytes = 32768;  // text prompts and Tokenize text, checked before tokenising
  int64_t max_new_tokens = 1024;
  int64_t max_stop_strings = 16;
  int64_t max_stop_length = 256;
  int64_t max_time_limit_ms = 24ll * 3600 * 1000;
};

struct ServiceOptions {
  ServiceLimits limits;
  std::string auth_token;      // when set, ExportSubnet needs "authorization: Bearer <token>"
  bool token_for_all = false;  // ... and so does every RPC
  // Without a token ExportSubnet is refused unless the operator allows it explicitly.
  bool allow_unauthenticated_export = false;
  std::string export_tmp_dir;  // where exports are staged before streaming ("" = system temp)
  int export_workers = 1;      // exports at once; more are RESOURCE_EXHAUSTED
  std::string weights_dtype = "f32";   // reported by GetModelInfo
  std::string speculate = "auto";      // requests that do not say: auto | off | a draft shape
  double speculate_min_speedup = 1.3;  // auto drafts only where the profile expects this much
  // Drafts read their own copy in this format (SchedulerOptions::draft_format); "" = the serving
  // format. Their cost: this host's decode time of the shape scaled by the profile's ratio for
  // that format (eval --draft-weights-dtype), else by bytes per weight.
  std::string draft_weights_dtype;
};

// A generation request as either front end received it.
struct GenerationRequest {
  std::string request_id;                      // "" = assigned by the server
  std::optional<std::string> text;             // the prompt: text ...
  std::optional<std::vector<int32_t>> tokens;  // ... or token ids (exactly one of them)
  bool add_bos = true;                         // text prompts
  std::optional<Shape> shape;                  // target: a shape, a budget, or neither (full)
  std::optional<PlanBudget> budget;
  std::optional<float> temperature, top_p, repetition_penalty;
  std::optional<int64_t> top_k;
  std::optional<uint64_t> seed;
  std::optional<int64_t> max_new_tokens;  // default 128
  std::vector<std::string> stop;
  std::optional<int64_t> time_limit_ms;
  std::optional<std::string> speculate;  // "auto" | "off" | a draft shape; unset: the default
  std::optional<int64_t> draft_tokens;
};

// INVALID_ARGUMENT "field: why": the form of every request-validation error.
absl::Status InvalidField(const std::string& field, const std::string& why);

// INVALID_ARGUMENT naming the field, or OK.
absl::Status ValidateGenerationRequest(const GenerationRequest& r, const ServiceLimits& l,
                                       int64_t vocab_size);
absl::Status ValidateBudget(const PlanBudget& b);

class Serving {
 public:
  // `smol` (may be null) are the adapters the scheduler serves with; exports merge them.
  Serving(const Supernet& supernet, const Smol* smol, Scheduler& scheduler, Metrics* metrics,
          ServiceOptions options, HostSpeed host, std::vector<ShapeProfile> profiles);

  const Supernet& supernet() const { return supernet_; }
  const Smol* smol() const { return smol_; }
  Scheduler& scheduler() { return scheduler_; }
  Metrics* metrics() { return metrics_; }
  const ServiceOptions& options() const { return options_; }
  ExportWorkers& export_workers() { return export_workers_; }
  const std::string& export_dir() const { return export_dir_; }

  std::string NewRequestId();
  // `authorization` is the header's value, if the request had one. UNAUTHENTICATED when it is
  // needed and missing, PERMISSION_DENIED when wrong (or export is disabled).
  absl::Status CheckAuth(std::optional<std::string_view> authorization, bool export_call) const;
  // The grid shape for a request's target (shape, budget or neither).
  absl::StatusOr<Shape> ResolveTarget(const std::optional<Shape>& shape,
                                      const std::optional<PlanBudget>& budget) const;
  // Validates `r`, resolves its target and tokenises it: a job ready for the scheduler (its
  // callbacks and deadline are the front end's to set).
  absl::StatusOr<std::shared_ptr<Job>> PrepareJob(const GenerationRequest& r,
                                                  const std::string& id) const;
  absl::StatusOr<PlanResult> Plan(const PlanBudget& b) const;
  absl::StatusOr<ExportPlanResult> PlanExport(const PlanBudget& b) const;
  std::vector<ShapeEstimateResult> Shapes() const;
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
  const Supernet& supernet_;
  const Smol* smol_;
  Scheduler& scheduler_;
  Metrics* metrics_;
  ServiceOptions options_;
  HostSpeed host_;
  std::vector<ShapeProfile> profiles_;
  std::atomic<uint64_t> next_id_{1};
  std::string export_dir_;
  ExportWorkers export_workers_;
};

}  // namespace amoeba
