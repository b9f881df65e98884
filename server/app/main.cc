// amoeba-server: serves any subnet shape of one supernet over gRPC and an OpenAI-compatible
// HTTP API. This file only wires the libraries together: the configuration (server_config.h),
// the serving core, the two front ends, the metrics endpoint, and the drain on SIGTERM.
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/server_builder_option.h>
#include <grpcpp/impl/server_builder_plugin.h>
#include <malloc.h>
#include <signal.h>
#include <spdlog/spdlog.h>

#include <filesystem>
#include <iostream>

#include "model/file_util.h"
#include "model/kernels.h"
#include "model/quantized_panels.h"
#include "model/runtime.h"
#include "model/thread_pinning.h"
#include "server/grpc_service.h"
#include "server/http_frontend.h"
#include "server/metrics.h"
#include "server/metrics_endpoint.h"
#include "server/served_latency.h"
#include "server_config.h"
#include "subnet/latency_profile.h"
#include "subnet/subnet_builder.h"

namespace amoeba {
namespace {

// Removes gRPC's reflection plugin from a server (linking the library registers it for every
// server builder; an option is the public way to drop a plugin).
class WithoutReflection : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    std::erase_if(*plugins, [](const auto& p) { return p->name() == "proto_server_reflection"; });
  }
};

// --model-alias name=depth=D,width=W → aliases; the first bad one is named.
absl::Status ParseAliases(const ServerConfig& c, const Supernet& supernet,
                          std::map<std::string, Shape>& out) {
  for (const std::string& a : c.model_aliases) {
    const size_t eq = a.find('=');
    auto shape = eq == std::string::npos
                     ? absl::StatusOr<Shape>(absl::InvalidArgumentError("expected name=shape"))
                     : Shape::Parse(a.substr(eq + 1), supernet.base().config.num_hidden_layers);
    if (shape.ok()) {
      absl::Status v = supernet.Validate(*shape);
      if (!v.ok()) shape = v;
    }
    if (!shape.ok())
      return absl::InvalidArgumentError(
          absl::StrCat("--model-alias ", a, ": ", std::string(shape.status().message())));
    out[a.substr(0, eq)] = *shape;
  }
  return absl::OkStatus();
}

int Run(ServerConfig c) {
  if (!c.pin_threads) SetTeamPinning(false);
  InitRuntime(c.threads);
  // KV slots and activation buffers come and go with requests. A fixed mmap threshold (glibc
  // otherwise raises it after the first large free) makes big buffers go back to the OS when
  // freed, so resident memory follows the work in flight instead of its high-water mark.
  mallopt(M_MMAP_THRESHOLD, 256 * 1024);
  spdlog::info("server: loading supernet {}", c.supernet);
  auto loaded = Supernet::Load(c.supernet);
  if (!loaded.ok()) {
    spdlog::error("server: {}", loaded.status().ToString());
    return 2;
  }
  if (!(*loaded)->tokenizer()) {
    spdlog::error("server: {} has no tokenizer", c.supernet);
    return 2;
  }
  auto adapters = LoadAdapters(**loaded);
  if (!adapters.ok()) {
    spdlog::error("server: {}", adapters.status().ToString());
    return 2;
  }
  std::unique_ptr<Smol> smol = std::move(*adapters);
  if (smol)
    spdlog::info("server: SMoL adapters loaded ({} experts, rank {})", smol->config().experts,
                 smol->config().rank);
  const WeightFormat format = c.scheduler.weights_format;
  // Decode runs from panels packed once (f16 halves them, q8_0/q4_0 quarter and eighth them):
  // every lane's views share them.
  (*loaded)->PackBaseWeights(format);
  spdlog::info(
      "server: decode weights packed as {} panels ({} MB read per token at full shape), "
      "{} kernels{}{}",
      WeightFormatName(format), (*loaded)->base().DecodeWeightBytes() >> 20,
      KernelIsaName(ActiveKernelIsa()), IsQuantized(format) ? ", integer dots " : "",
      IsQuantized(format) ? QuantKernelName() : "");
  const Supernet& supernet = **loaded;
  std::map<std::string, Shape> aliases;
  if (absl::Status st = ParseAliases(c, supernet, aliases); !st.ok()) {
    spdlog::error("{}", std::string(st.message()));
    return 2;
  }
  HostSpeed host;
  host.bandwidth_gbs = MeasureReadBandwidthGBs(256, 2);
  host.compute_gflops = MeasureGemmGflops();
  auto profiles = ProfilesFromSupernet(supernet, at::elementSize(c.scheduler.kv_dtype));

  Metrics metrics;
  MetricsEndpoint metrics_endpoint(
      metrics, c.service.token_for_all ? c.service.auth_token : std::string(), c.http.limits);
  if (c.metrics_port >= 0) {
    if (absl::Status st = metrics_endpoint.Start(c.metrics_host, c.metrics_port); !st.ok()) {
      spdlog::error("{}", st.ToString());
      return 1;
    }
    spdlog::info("server: metrics on http://{}:{}/metrics", c.metrics_host,
                 metrics_endpoint.port());
  }
  SchedulerOptions& so = c.scheduler;
  so.smol = smol.get();
  so.on_lane_step = [&metrics](const Shape& s, int64_t running) {
    metrics.SetRunning(s.ToString(), running);
  };
  so.on_shared_step = [&metrics](const SharedPassStats& st, int64_t lanes, double ms) {
    metrics.ObserveSharedStep(lanes, st.rows, st.weight_bytes, st.weight_bytes_alone, ms / 1e3);
  };
  so.on_draft_checked = [&metrics](const Shape& target, const Shape& draft, int64_t drafted,
                                   int64_t accepted) {
    metrics.ObserveDraftCheck(target.ToString(), draft.ToString(), drafted, accepted);
  };
  Scheduler scheduler(supernet, so);
  if (c.profile) {
    // Through the scheduler, as requests will see it (before any client can connect).
    ServedLatencyOptions lo;
    lo.bandwidth_gbs = host.bandwidth_gbs;
    const auto measured = ProfileServedLatency(
        scheduler, profiles, static_cast<int32_t>(supernet.base().config.bos_token_id), lo);
    LogLatencyProfile(measured, "server profile");
    // The planner uses the line fitted through every shape's median: noise in one shape's
    // figure cannot make it look faster than a smaller shape.
    for (size_t i = 0; i < profiles.size(); ++i)
      if (measured[i].fitted_ms > 0) profiles[i].measured_decode_ms = measured[i].fitted_ms;
  }
  spdlog::info("server: host {:.1f} GB/s, {:.0f} GFLOP/s; {} shapes{}", host.bandwidth_gbs,
               host.compute_gflops, profiles.size(), c.profile ? " profiled" : "");

  if (c.service.auth_token.empty() && c.service.allow_unauthenticated_export) {
    spdlog::warn(
        "server: --allow-unauthenticated-export: ANY client that reaches {}:{} can download the "
        "whole model",
        c.host, c.port);
  }
  Serving serving(supernet, smol.get(), scheduler, &metrics, c.service, host, profiles);
  AmoebaService service(serving);
  if (c.service.speculate != "auto" && c.service.speculate != "off") {
    // An explicit default draft must be a grid shape (checked against the full shape's target).
    auto d = serving.ResolveDraft(supernet.FullShape(), c.service.speculate, std::nullopt);
    if (!d.ok()) {
      spdlog::error("--speculate: {}", std::string(d.status().message()));
      return 2;
    }
  }
  for (const Shape& s : supernet.GridShapes()) {
    auto d = serving.ResolveDraft(s, "auto", std::nullopt);
    if (d.ok() && *d)
      spdlog::info("server: speculate=auto drafts {} with {} ({} tokens per check)", s.ToString(),
                   (*d)->draft.ToString(), (*d)->tokens);
  }

  // The OpenAI-compatible HTTP front end, over the same core, TLS and token.
  std::unique_ptr<HttpFrontend> http;
  if (c.http.port >= 0) {
    c.http.aliases = aliases;
    auto format = ChatFormatFromFlag(c.chat_template, c.supernet);
    if (!format.ok()) {
      spdlog::error("--chat-template: {}", std::string(format.status().message()));
      return 2;
    }
    c.http.chat_format = *std::move(format);
    http = std::make_unique<HttpFrontend>(serving, c.http);
    if (absl::Status st = http->Start(); !st.ok()) {
      spdlog::error("server: {}", std::string(st.message()));
      return 1;
    }
    spdlog::info("server: OpenAI-compatible HTTP on {}:{} (chat template {})", c.host, http->port(),
                 c.http.chat_format.Name());
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (!c.tls_cert.empty()) {
    auto cert = ReadFile(c.tls_cert), key = ReadFile(c.tls_key);
    if (!cert.ok() || !key.ok()) {
      spdlog::error("server: cannot read --tls-cert/--tls-key");
      return 2;
    }
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({*key, *cert});
    creds = grpc::SslServerCredentials(ssl);
  }
  int bound_port = 0;
  builder.AddListeningPort(c.host + ":" + std::to_string(c.port), creds, &bound_port);
  builder.RegisterService(&service);
  // Reflection lists the API to anyone who asks; under --auth-all it is not served (the health
  // service stays open for probes; every Amoeba RPC checks the token).
  if (c.service.token_for_all) builder.SetOption(std::make_unique<WithoutReflection>());
  builder.SetMaxReceiveMessageSize(4 << 20);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || bound_port == 0) {
    spdlog::error("server: cannot listen on {}:{}", c.host, c.port);
    return 1;
  }
  auto* health = server->GetHealthCheckService();
  health->SetServingStatus(true);
  spdlog::info("server: serving amoeba.v1.Amoeba on {}:{} ({})", c.host, bound_port,
               c.tls_cert.empty() ? "insecure" : "TLS");
  if (!c.port_file.empty())
    (void)WriteFileAtomic(c.port_file, std::to_string(bound_port) + " " +
                                           std::to_string(metrics_endpoint.port()) + " " +
                                           std::to_string(http ? http->port() : -1) + "\n");

  // Wait for SIGTERM/SIGINT (blocked in every thread, so sigwait sees them), then drain.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  int sig = 0;
  sigwait(&set, &sig);
  spdlog::info("server: signal {}, draining for up to {:.0f}s", sig, c.drain_seconds);
  health->SetServingStatus(false);
  serving.SetDraining();
  // Idle HTTP connections and clients still sending a request are closed now, so slow clients
  // cannot hold the exit; new requests are still answered (503 for work) until the drain ends.
  if (http) http->BeginShutdown();
  const auto deadline =
      Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(c.drain_seconds * 1000));
  scheduler.Drain(deadline);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
  if (http) http->Stop();
  metrics_endpoint.Stop();
  spdlog::info("server: stopped");
  return 0;
}

}  // namespace
}  // namespace amoeba

int main(int argc, char** argv) {
  // Block the shutdown signals before any thread starts; main waits for them with sigwait.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  amoeba::InitLogging();
  amoeba::ServerConfig config;
  CLI::App app{"amoeba-server: serve any subnet of an Amoeba supernet over gRPC and HTTP"};
  amoeba::AddServerFlags(app, config);
  bool print_config = false;
  app.add_flag("--print-config", print_config,
               "Print the effective configuration (a valid --config file) and exit")
      ->configurable(false);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }
  if (absl::Status st = amoeba::FinishServerConfig(config); !st.ok()) {
    std::cerr << std::string(st.message()) << "\n";
    return 2;
  }
  if (print_config) {
    std::cout << app.config_to_str(/*default_also=*/true, /*write_description=*/true);
    return 0;
  }
  return amoeba::Run(std::move(config));
}
