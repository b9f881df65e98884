#include "client/amoeba_client.h"

#include "file_digest.h"

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "grpc/health/v1/health.grpc.pb.h"

namespace amoeba::client {
namespace fs = std::filesystem;

Client::Client(const ClientOptions& options) : opt_(options) {
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (opt_.tls) {
    grpc::SslCredentialsOptions ssl;
    if (!opt_.ca_cert_file.empty()) {
      std::ifstream in(opt_.ca_cert_file);
      std::stringstream ss;
      ss << in.rdbuf();
      ssl.pem_root_certs = ss.str();
    }
    creds = grpc::SslCredentials(ssl);
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  channel_ = grpc::CreateCustomChannel(opt_.target, creds, args);
  stub_ = v1::Amoeba::NewStub(channel_);
}

void Client::Prepare(grpc::ClientContext* ctx) const {
  if (!opt_.token.empty()) ctx->AddMetadata("authorization", "Bearer " + opt_.token);
  if (opt_.timeout_s > 0) {
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(static_cast<int64_t>(opt_.timeout_s * 1000)));
  }
}

grpc::Status Client::Generate(const v1::GenerateRequest& req,
                              const std::function<void(const v1::GenerateResponse&)>& on_message) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  auto reader = stub_->Generate(&ctx, req);
  v1::GenerateResponse r;
  while (reader->Read(&r)) on_message(r);
  return reader->Finish();
}

grpc::Status Client::Plan(const v1::PlanRequest& req, v1::PlanResponse* resp) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  return stub_->Plan(&ctx, req, resp);
}

grpc::Status Client::ListShapes(v1::ListShapesResponse* resp) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  return stub_->ListShapes(&ctx, v1::ListShapesRequest(), resp);
}

grpc::Status Client::GetModelInfo(v1::ModelInfo* resp) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  return stub_->GetModelInfo(&ctx, v1::GetModelInfoRequest(), resp);
}

grpc::Status Client::Tokenize(const v1::TokenizeRequest& req, v1::TokenizeResponse* resp) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  return stub_->Tokenize(&ctx, req, resp);
}

grpc::Status Client::Health(std::string* status, const std::string& service) {
  auto stub = grpc::health::v1::Health::NewStub(channel_);
  grpc::ClientContext ctx;
  Prepare(&ctx);
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse resp;
  grpc::Status s = stub->Check(&ctx, req, &resp);
  if (s.ok()) *status = grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status());
  return s;
}

std::string VerifyModelDirectory(const std::string& dir) {
  const fs::path gguf = fs::path(dir) / "model.gguf";
  if (fs::exists(gguf)) {  // a GGUF export: the header (the SHA-256s covered the bytes)
    std::ifstream in(gguf, std::ios::binary);
    char magic[4] = {};
    uint32_t version = 0;
    in.read(magic, 4);
    in.read(reinterpret_cast<char*>(&version), 4);
    if (!in || std::string(magic, 4) != "GGUF" || version != 3) return "model.gguf: not GGUF v3";
    return "";
  }
  std::ifstream cfg(fs::path(dir) / "config.json");
  if (!cfg) return "missing config.json";
  auto j = nlohmann::json::parse(cfg, nullptr, false);
  if (j.is_discarded() || !j.contains("hidden_size") || !j.contains("num_hidden_layers"))
    return "config.json is not a LLaMA config";
  const fs::path st = fs::path(dir) / "model.safetensors";
  std::ifstream in(st, std::ios::binary);
  if (!in) return "missing model.safetensors";
  const uint64_t size = fs::file_size(st);
  uint64_t hl = 0;
  in.read(reinterpret_cast<char*>(&hl), 8);
  if (!in || hl > size - 8) return "model.safetensors: truncated header";
  std::string h(hl, '\0');
  in.read(h.data(), static_cast<std::streamsize>(hl));
  auto hj = nlohmann::json::parse(h, nullptr, false);
  if (hj.is_discarded() || !hj.is_object()) return "model.safetensors: header is not JSON";
  const uint64_t data = size - 8 - hl;
  int tensors = 0;
  for (auto& [name, v] : hj.items()) {
    if (name == "__metadata__") continue;
    auto off = v.value("data_offsets", std::vector<uint64_t>{});
    if (off.size() != 2 || off[1] < off[0] || off[1] > data)
      return "model.safetensors: tensor " + name + " outside the file";
    ++tensors;
  }
  if (tensors == 0) return "model.safetensors: no tensors";
  return "";
}

grpc::Status Client::Export(const v1::ExportSubnetRequest& req, const std::string& out_dir) {
  const std::string tmp = out_dir + ".tmp-download";
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec)
    return grpc::Status(grpc::StatusCode::INTERNAL, "cannot create " + tmp + ": " + ec.message());
  grpc::ClientContext ctx;
  Prepare(&ctx);
  auto reader = stub_->ExportSubnet(&ctx, req);
  v1::FileChunk c;
  std::ofstream out;
  std::string current;
  uint64_t received = 0;  // bytes of `current` so far: chunks must arrive in order
  Sha256 digest;
  bool bad = false;
  std::string why;
  auto fail = [&](const std::string& w) {
    if (!bad) why = w;
    bad = true;
  };
  while (reader->Read(&c)) {
    if (bad) continue;                                    // drain; the call's result is DATA_LOSS
    const fs::path name = fs::path(c.path()).filename();  // never write outside the directory
    if (name.empty() || name.string() != c.path() || c.path() == "." || c.path() == "..") {
      fail("server sent a bad file name: " + c.path().substr(0, 100));
      continue;
    }
    if (current != c.path()) {
      if (!current.empty()) {
        fail("file " + current + " ended without its last chunk");
        continue;
      }
      out.open(fs::path(tmp) / name, std::ios::binary | std::ios::trunc);
      current = c.path();
      received = 0;
    }
    if (c.offset() != received) {
      fail("chunks of " + current + " out of order");
      continue;
    }
    out.write(c.data().data(), static_cast<std::streamsize>(c.data().size()));
    digest.Update(c.data());
    received += c.data().size();
    if (c.last_chunk()) {
      out.close();
      const std::string got = digest.HexDigest();
      if (!out) {
        fail("cannot write " + current);
      } else if (c.sha256().empty()) {
        fail("server sent no SHA-256 for " + current);
      } else if (got != c.sha256()) {
        fail("SHA-256 of " + current + " does not match: the download is corrupt");
      } else if (received != c.total_size()) {
        fail("size of " + current + " does not match");
      }
      current.clear();
    }
  }
  if (!current.empty()) fail("file " + current + " ended without its last chunk");
  out.close();
  grpc::Status s = reader->Finish();
  if (s.ok() && bad) s = grpc::Status(grpc::StatusCode::DATA_LOSS, why);
  if (s.ok()) {
    const std::string problem = VerifyModelDirectory(tmp);
    if (!problem.empty())
      s = grpc::Status(grpc::StatusCode::DATA_LOSS, "export does not verify: " + problem);
  }
  if (!s.ok()) {
    fs::remove_all(tmp, ec);
    return s;
  }
  // Fsync the files, then swap the directory into place.
  for (const auto& e : fs::directory_iterator(tmp)) {
    FILE* f = std::fopen(e.path().c_str(), "rb");
    if (f) {
      fsync(fileno(f));
      std::fclose(f);
    }
  }
  const std::string old = out_dir + ".old";
  fs::remove_all(old, ec);
  if (fs::exists(out_dir)) fs::rename(out_dir, old, ec);
  fs::rename(tmp, out_dir, ec);
  if (ec)
    return grpc::Status(grpc::StatusCode::INTERNAL, "rename into " + out_dir + ": " + ec.message());
  fs::remove_all(old, ec);
  return grpc::Status::OK;
}

}  // namespace amoeba::client
