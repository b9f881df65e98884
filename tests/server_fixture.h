// A real AmoebaService on a loopback port over a small calibrated supernet (optionally with
// random SMoL adapters), plus helpers to stream a generation and to run the same greedy
// generation locally. Shared by the server test files.
#pragma once
#include <ATen/ATen.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <future>
#include <memory>
#include <optional>

#include "absl/strings/str_cat.h"
#include "client/amoeba_client.h"
#include "model/engine.h"
#include "model/generation.h"
#include "model/kernels.h"
#include "model/presets.h"
#include "server/grpc_service.h"
#include "server/metrics.h"
#include "server/scheduler.h"
#include "subnet/calibrate.h"
#include "subnet/subnet_builder.h"
#include "tests/supernet_fixture.h"
#include "tests/test_util.h"

namespace amoeba::testing {

struct TestServer {
  TempDir dir;
  std::unique_ptr<Supernet> supernet;
  std::unique_ptr<Smol> smol;
  std::unique_ptr<Scheduler> scheduler;
  Metrics metrics;
  std::unique_ptr<Serving> serving;
  std::unique_ptr<AmoebaService> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;

  explicit TestServer(SchedulerOptions so = {}, std::string token = "", bool adapters = false,
                      const std::function<void(ServiceOptions&)>& edit_service = nullptr,
                      const std::function<void(ModelConfig&)>& edit_model = nullptr) {
    supernet = MakeTestSupernet(dir, edit_model);
    if (adapters) {
      smol = MakeTestAdapters(*supernet);
      so.smol = smol.get();
    }
    so.max_context = 128;
    // As amoeba-server does: the supernet decodes from panels of the served format.
    if (so.weights_format != WeightFormat::kF32) supernet->PackBaseWeights(so.weights_format);
    if (!so.on_draft_checked)
      so.on_draft_checked = [this](const Shape& t, const Shape& d, int64_t n, int64_t kept) {
        metrics.ObserveDraftCheck(t.ToString(), d.ToString(), n, kept);
      };
    scheduler = std::make_unique<Scheduler>(*supernet, so);
    ServiceOptions svo;
    svo.weights_format = so.weights_format;
    svo.limits.max_prompt_tokens = 100;
    svo.limits.max_new_tokens = 200;
    svo.auth_token = token;
    if (edit_service) edit_service(svo);
    auto profiles = ProfilesFromSupernet(*supernet);
    for (auto& p : profiles)
      p.measured_decode_ms = 0.001 * p.decode_weight_bytes / 1000.0;  // deterministic
    serving = std::make_unique<Serving>(*supernet, smol.get(), *scheduler, &metrics, svo,
                                        HostSpeed{}, profiles);
    service = std::make_unique<AmoebaService>(*serving);
    grpc::EnableDefaultHealthCheckService(true);
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(service.get());
    server = b.BuildAndStart();
    server->GetHealthCheckService()->SetServingStatus(true);
  }
  ~TestServer() {
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
    // The serving core reads the scheduler (its gauges thread): it goes first.
    server.reset();
    service.reset();
    serving.reset();
    scheduler.reset();
  }
  client::Client Client(const std::string& token = "", double timeout = 0) {
    client::ClientOptions o;
    o.target = absl::StrCat("127.0.0.1:", port);
    o.token = token;
    o.timeout_s = timeout;
    return client::Client(o);
  }
};

struct Streamed {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::string text;
  v1::GenerateResponse last;
  int messages = 0;
};

inline Streamed Stream(client::Client& c, const v1::GenerateRequest& r) {
  Streamed s;
  s.status = c.Generate(r, [&](const v1::GenerateResponse& m) {
    for (int32_t t : m.token_ids()) s.tokens.push_back(t);
    s.text += m.text();
    s.last = m;
    ++s.messages;
  });
  return s;
}

inline v1::GenerateRequest Req(const std::string& text, int depth, double width, int n) {
  v1::GenerateRequest r;
  r.set_text(text);
  r.mutable_shape()->set_depth(depth);
  r.mutable_shape()->set_width(width);
  r.set_max_new_tokens(n);
  return r;
}

// Greedy generation of `model` from BOS + the text's tokens.
inline std::vector<int32_t> GreedyOn(std::shared_ptr<const Model> model, const Tokenizer& tok,
                                     const std::string& text, int n,
                                     at::ScalarType kv_dtype = at::kFloat) {
  at::InferenceMode g;
  Engine e(model, {.max_len = 128, .kv_dtype = kv_dtype});
  KVCache c = e.NewCache(1);
  std::vector<int32_t> prompt = {static_cast<int32_t>(model->config.bos_token_id)};
  for (int32_t t : tok.Encode(text)) prompt.push_back(t);
  GenerationOptions o;
  o.max_new_tokens = n;
  std::vector<int32_t> tokens = Generate(e, c, 0, tok, prompt, o)->tokens;
  // The server ends a sequence at its EOS without streaming the EOS itself.
  const auto& eos = model->config.eos_token_ids;
  if (!tokens.empty() && std::find(eos.begin(), eos.end(), tokens.back()) != eos.end())
    tokens.pop_back();
  return tokens;
}

// The same greedy generation locally, on the subnet with its adapters merged (if given).
inline std::vector<int32_t> LocalGreedy(const Supernet& s, const Shape& shape,
                                        const std::string& text, int n, const Smol* smol = nullptr,
                                        at::ScalarType kv_dtype = at::kFloat) {
  at::InferenceMode g;
  Model m = MustOk(BuildSubnet(s, smol, shape), "build subnet");
  return GreedyOn(std::make_shared<const Model>(std::move(m)), *s.tokenizer(), text, n, kv_dtype);
}

// Scheduler jobs without a front end: a greedy job of BOS + the text's tokens, and runs of
// jobs submitted together (so they share steps) with what each streamed and its result.
struct Outcome {
  std::vector<int32_t> tokens;
  JobResult result;
};

inline std::shared_ptr<Job> NewJob(const Supernet& s, const Shape& shape, const std::string& text,
                                   int n, std::optional<Shape> draft = std::nullopt,
                                   int64_t k = 0) {
  auto job = std::make_shared<Job>();
  job->request_id = "test-job";
  job->shape = shape;
  job->prompt = {static_cast<int32_t>(s.base().config.bos_token_id)};
  for (int32_t t : s.tokenizer()->Encode(text)) job->prompt.push_back(t);
  job->gen.max_new_tokens = n;
  job->draft = draft;
  job->draft_tokens = k;
  return job;
}

// Submits the jobs together (so they share steps) and waits for all of them.
inline std::vector<Outcome> RunAll(Scheduler& sched,
                                   const std::vector<std::shared_ptr<Job>>& jobs) {
  std::vector<Outcome> out(jobs.size());
  std::vector<std::promise<void>> done(jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    Job& j = *jobs[i];
    j.on_token = [&out, i](int32_t token, std::string_view) {
      if (token >= 0) out[i].tokens.push_back(token);
    };
    j.on_done = [&out, &done, i](const JobResult& r) {
      out[i].result = r;
      done[i].set_value();
    };
  }
  for (auto& j : jobs) EXPECT_TRUE(sched.Submit(j).ok());
  for (auto& d : done) d.get_future().wait();
  return out;
}

inline Outcome RunOne(Scheduler& sched, std::shared_ptr<Job> job) {
  return RunAll(sched, {std::move(job)})[0];
}

// AVX-512's fp32 panel kernel sums a one-row product in another order than a many-row one (see
// EngineTest.CheckedRowsEqualTokenByTokenDecodeBitForBit): exactness is the AVX2 kernels' promise.
struct BatchInvariantKernels {
  BatchInvariantKernels() {
    if (CpuHasAvx512()) ForceKernelIsa(KernelIsa::kAvx2);
  }
  ~BatchInvariantKernels() { ForceKernelIsa(KernelIsa::kAuto); }
};

}  // namespace amoeba::testing
