// The two streaming RPCs' reactors. Each asks the core for the work and only moves its output
// onto the wire: writes serialised (one in flight), Finish called once, after the core's last
// callback, so a reactor outlives every callback into it.
#pragma once
#include <grpcpp/grpcpp.h>

#include "amoeba/v1/amoeba.pb.h"
#include "server/serving.h"

namespace amoeba {

grpc::ServerWriteReactor<v1::GenerateResponse>* NewGenerateReactor(Serving& serving,
                                                                   grpc::CallbackServerContext* ctx,
                                                                   const v1::GenerateRequest* req);

grpc::ServerWriteReactor<v1::FileChunk>* NewExportReactor(Serving& serving,
                                                          grpc::CallbackServerContext* ctx,
                                                          const v1::ExportSubnetRequest* req);

}  // namespace amoeba
