// The gRPC front end's one mapping from the core's statuses, and what it reads off a call.
#pragma once
#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "server/request.h"

namespace amoeba {

// absl and gRPC share their code numbers; the message is bounded (BoundedMessage).
grpc::Status ToGrpc(const absl::Status& s);

// The authorization header and the deadline of a call.
RequestContext ContextOf(const grpc::CallbackServerContext* ctx);

}  // namespace amoeba
