#include "grpc_status.h"

#include "server/request_checks.h"

namespace amoeba {

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(static_cast<int>(s.code())),
                      BoundedMessage(std::string_view(s.message().data(), s.message().size())));
}

RequestContext ContextOf(const grpc::CallbackServerContext* ctx) {
  RequestContext c;
  const auto& md = ctx->client_metadata();
  if (auto it = md.find("authorization"); it != md.end())
    c.authorization = std::string(it->second.data(), it->second.size());
  if (ctx->deadline() != std::chrono::system_clock::time_point::max()) c.deadline = ctx->deadline();
  return c;
}

}  // namespace amoeba
