// A small C++ client for amoeba.v1 (no libtorch): channel set-up with TLS and bearer token,
// streaming generation, planning, model info, and atomic, verified subnet export.
#pragma once
#include <functional>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "amoeba/v1/amoeba.grpc.pb.h"

namespace amoeba::client {

struct ClientOptions {
  std::string target = "127.0.0.1:50051";
  bool tls = false;
  std::string ca_cert_file;  // PEM roots for TLS ("" = system roots)
  std::string token;         // sent as "authorization: Bearer <token>"
  double timeout_s = 0;      // per call; 0 = none
};

class Client {
 public:
  explicit Client(const ClientOptions& options);

  // Calls `on_message` for every streamed message; returns the call's status.
  grpc::Status Generate(const v1::GenerateRequest& req,
                        const std::function<void(const v1::GenerateResponse&)>& on_message);
  grpc::Status Plan(const v1::PlanRequest& req, v1::PlanResponse* resp);
  grpc::Status ListShapes(v1::ListShapesResponse* resp);
  grpc::Status GetModelInfo(v1::ModelInfo* resp);
  grpc::Status Tokenize(const v1::TokenizeRequest& req, v1::TokenizeResponse* resp);
  // Streams an export into `out_dir` atomically (temp directory, verified, then renamed).
  grpc::Status Export(const v1::ExportSubnetRequest& req, const std::string& out_dir);
  // "SERVING", "NOT_SERVING", ... from grpc.health.v1.
  grpc::Status Health(std::string* status, const std::string& service = "");

 private:
  void Prepare(grpc::ClientContext* ctx) const;
  ClientOptions opt_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Amoeba::Stub> stub_;
};

// Checks that `dir` holds a loadable HF model: config.json parses and model.safetensors has a
// well-formed header whose tensors lie inside the file. Returns "" or what is wrong.
std::string VerifyModelDirectory(const std::string& dir);

}  // namespace amoeba::client
