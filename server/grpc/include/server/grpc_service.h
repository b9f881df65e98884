// The amoeba.v1.Amoeba gRPC front end (callback API): a thin translation layer over the serving
// core. Each RPC turns its message into the core's request type, calls one Serving method, and
// turns the answer (or the status, grpc_status.h's one mapping) back into messages.
#pragma once
#include "amoeba/v1/amoeba.grpc.pb.h"
#include "server/serving.h"

namespace amoeba {

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

 private:
  Serving& serving_;
};

}  // namespace amoeba
