// The amoeba.v1.Amoeba gRPC service (callback API): validation, planning, and adapters from the
// protocol to the scheduler, supernet and exporter.
#pragma once
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "amoeba/v1/amoeba.grpc.pb.h"
#include "server/export_job.h"
#include "server/metrics.h"
#include "server/planner.h"
#include "server/request_checks.h"
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
  std::string weights_dtype = "f32";  // reported by GetModelInfo
};

// Validates a GenerateRequest (everything but the shape/budget); the message names the field.
absl::Status ValidateGenerateRequest(const v1::GenerateRequest& r, const ServiceLimits& l,
                                     int64_t vocab_size);

class AmoebaService final : public v1::Amoeba::CallbackService {
 public:
  // `smol` (may be null) are the adapters the scheduler serves with; exports merge them.
  AmoebaService(const Supernet& supernet, const Smol* smol, Scheduler& scheduler, Metrics* metrics,
                ServiceOptions options, HostSpeed host, std::vector<ShapeProfile> profiles);

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(grpc::CallbackServerContext* ctx,
                                                           const v1::GenerateRequest* req) override;
  grpc::ServerUnaryReactor* Plan(grpc::CallbackServerContext* ctx, const v1::PlanRequest* req,
                                 v1::PlanResponse* resp) override;
  grpc::ServerUnaryReactor* ListShapes(grpc::CallbackServerContext* ctx,
                                       const v1::ListShapesRequest* req,
                                       v1::ListShapesResponse* resp) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* ctx,
                                         const v1::GetModelInfoRequest* req,
                                         v1::ModelInfo* resp) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx,
                                     const v1::TokenizeRequest* req,
                                     v1::TokenizeResponse* resp) override;
  grpc::ServerWriteReactor<v1::FileChunk>* ExportSubnet(
      grpc::CallbackServerContext* ctx, const v1::ExportSubnetRequest* req) override;

  const Supernet& supernet() const { return supernet_; }
  const Smol* smol() const { return smol_; }
  ExportWorkers& export_workers() { return export_workers_; }
  const std::string& export_dir() const { return export_dir_; }
  Scheduler& scheduler() { return scheduler_; }
  Metrics* metrics() { return metrics_; }
  const ServiceOptions& options() const { return options_; }
  // Resolves the request's target (shape, budget or neither) to a grid shape.
  absl::StatusOr<Shape> ResolveTarget(const v1::GenerateRequest& r) const;
  grpc::Status CheckAuth(grpc::CallbackServerContext* ctx, bool export_call) const;
  std::string NewRequestId();

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

PlanBudget BudgetFromProto(const v1::Budget& b);

}  // namespace amoeba
