// The amoeba.v1.Amoeba gRPC front end (callback API): streaming reactors, export jobs, and the
// translation of amoeba.v1 messages to and from the protocol-free Serving core.
#pragma once
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "amoeba/v1/amoeba.grpc.pb.h"
#include "server/request_checks.h"
#include "server/serving.h"

namespace amoeba {

// The gRPC wire format to the protocol-free request (no validation: Serving does that).
GenerationRequest GenerationRequestFromProto(const v1::GenerateRequest& r);
// Validates a GenerateRequest; the message names the field.
absl::Status ValidateGenerateRequest(const v1::GenerateRequest& r, const ServiceLimits& l,
                                     int64_t vocab_size);

// A thin adapter: translates amoeba.v1 messages to and from the protocol-free Serving core.
class AmoebaService final : public v1::Amoeba::CallbackService {
 public:
  explicit AmoebaService(Serving& serving) : serving_(serving) {}

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

  Serving& serving() { return serving_; }
  grpc::Status CheckAuth(grpc::CallbackServerContext* ctx, bool export_call) const;

 private:
  Serving& serving_;
};

PlanBudget BudgetFromProto(const v1::Budget& b);

}  // namespace amoeba
