// amoeba-server: serves any subnet shape of one supernet over gRPC.
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <malloc.h>
#include <signal.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <filesystem>
#include <fstream>

#include "model/file_util.h"
#include "model/kernels.h"
#include "model/quantized_panels.h"
#include "model/runtime.h"
#include "model/weight_format.h"
#include "server/http_frontend.h"
#include "server/metrics.h"
#include "server/planner.h"
#include "server/scheduler.h"
#include "server/served_latency.h"
#include "server/service.h"
#include "subnet/latency_profile.h"
#include "subnet/speculation.h"
#include "subnet/subnet_builder.h"

namespace amoeba {
namespace {

struct Flags {
  std::string supernet;
  std::string host = "0.0.0.0";
  int port = 50051;
  int metrics_port = 9090;
  std::string metrics_host = "0.0.0.0";
  int threads = 0;
  int64_t max_prompt_tokens = 2048, max_new_tokens = 1024, max_context = 2048;
  int64_t slots = 16, queue = 64, cache_mb = 1024, prefill_chunk = 64, merge_after = 2;
  std::string weights_dtype = "f32";
  std::string draft_weights_dtype;  // "" = weights_dtype
  std::string speculate = "auto";
  double speculate_min_speedup = 1.3;
  std::string kv_dtype = "f32";
  std::string tls_cert, tls_key, auth_token;
  bool auth_all = false, allow_unauthenticated_export = false;
  std::string export_dir;
  int export_workers = 1;
  int http_port = -1;
  std::vector<std::string> model_aliases;
  std::string chat_template = "auto";
  double drain_seconds = 20;
  bool profile = true;
  std::string port_file;
};

int Run(const Flags& f) {
  InitRuntime(f.threads);
  // KV slots and activation buffers come and go with requests. A fixed mmap threshold (glibc
  // otherwise raises it after the first large free) makes big buffers go back to the OS when
  // freed, so resident memory follows the work in flight instead of its high-water mark.
  mallopt(M_MMAP_THRESHOLD, 256 * 1024);
  const auto format = ParseWeightFormat(f.weights_dtype);
  if (!format.ok()) {
    spdlog::error("--{}", std::string(format.status().message()));
    return 2;
  }
  const auto draft_parsed = ParseDraftFormat(f.draft_weights_dtype, *format);
  if (!draft_parsed.ok()) {
    spdlog::error("--{}", std::string(draft_parsed.status().message()));
    return 2;
  }
  const std::optional<WeightFormat> draft_format = *draft_parsed;
  if ((f.tls_cert.empty()) != (f.tls_key.empty())) {
    spdlog::error("--tls-cert and --tls-key go together");
    return 2;
  }
  spdlog::info("server: loading supernet {}", f.supernet);
  auto loaded = Supernet::Load(f.supernet);
  if (!loaded.ok()) {
    spdlog::error("server: {}", loaded.status().ToString());
    return 2;
  }
  if (!(*loaded)->tokenizer()) {
    spdlog::error("server: {} has no tokenizer", f.supernet);
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
  // Decode runs from panels packed once (f16 halves them, q8_0/q4_0 quarter and eighth them):
  // every lane's views share them.
  (*loaded)->PackBaseWeights(*format);
  spdlog::info(
      "server: decode weights packed as {} panels ({} MB read per token at full shape), "
      "{} kernels{}{}",
      WeightFormatName(*format), (*loaded)->base().DecodeWeightBytes() >> 20,
      KernelIsaName(ActiveKernelIsa()), IsQuantized(*format) ? ", integer dots " : "",
      IsQuantized(*format) ? QuantKernelName() : "");
  const Supernet& supernet = **loaded;
  const at::ScalarType kv_dtype = f.kv_dtype == "f16" ? at::kHalf : at::kFloat;
  HostSpeed host;
  host.bandwidth_gbs = MeasureReadBandwidthGBs(256, 2);
  host.compute_gflops = MeasureGemmGflops();
  auto profiles = ProfilesFromSupernet(supernet, at::elementSize(kv_dtype));

  Metrics metrics;
  if (f.metrics_port >= 0) {
    auto st = metrics.Serve(f.metrics_host, f.metrics_port);
    if (!st.ok()) {
      spdlog::error("{}", st.ToString());
      return 1;
    }
    spdlog::info("server: metrics on http://{}:{}/metrics", f.metrics_host, metrics.port());
  }
  SchedulerOptions so;
  so.smol = smol.get();
  so.slots_per_shape = f.slots;
  so.max_context = f.max_context;
  so.max_queue = f.queue;
  so.prefill_chunk = f.prefill_chunk;
  so.cache_bytes = f.cache_mb << 20;
  so.weights_format = *format;
  so.draft_format = draft_format;
  so.kv_dtype = kv_dtype;
  so.merge_after_requests = f.merge_after;
  so.on_lane_step = [&metrics](const Shape& s, int64_t running) {
    metrics.SetRunning(s.ToString(), running);
  };
  so.on_draft_checked = [&metrics](const Shape& target, const Shape& draft, int64_t drafted,
                                   int64_t accepted) {
    metrics.ObserveDraftCheck(target.ToString(), draft.ToString(), drafted, accepted);
  };
  Scheduler scheduler(supernet, so);
  if (f.profile) {
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
               host.compute_gflops, profiles.size(), f.profile ? " profiled" : "");

  ServiceOptions svo;
  svo.limits.max_prompt_tokens = std::min(f.max_prompt_tokens, f.max_context - 1);
  svo.limits.max_new_tokens = f.max_new_tokens;
  svo.auth_token = f.auth_token;
  svo.token_for_all = f.auth_all;
  svo.allow_unauthenticated_export = f.allow_unauthenticated_export;
  svo.export_tmp_dir = f.export_dir;
  svo.export_workers = f.export_workers;
  svo.weights_dtype = f.weights_dtype;
  if (draft_format) svo.draft_weights_dtype = WeightFormatName(*draft_format);
  svo.speculate = f.speculate;
  svo.speculate_min_speedup = f.speculate_min_speedup;
  if (f.auth_token.empty() && f.allow_unauthenticated_export) {
    spdlog::warn(
        "server: --allow-unauthenticated-export: ANY client that reaches {}:{} can download the "
        "whole model",
        f.host, f.port);
  }
  Serving serving(supernet, smol.get(), scheduler, &metrics, svo, host, profiles);
  AmoebaService service(serving);
  if (f.speculate != "auto" && f.speculate != "off") {
    // An explicit default draft must be a grid shape (checked against the full shape's target).
    auto d = serving.ResolveDraft(supernet.FullShape(), f.speculate, std::nullopt);
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
  if (f.http_port >= 0) {
    HttpOptions ho;
    ho.host = f.host;
    ho.port = f.http_port;
    ho.tls_cert = f.tls_cert;
    ho.tls_key = f.tls_key;
    for (const std::string& a : f.model_aliases) {
      const size_t eq = a.find('=');
      auto shape = eq == std::string::npos
                       ? absl::StatusOr<Shape>(absl::InvalidArgumentError("expected name=shape"))
                       : Shape::Parse(a.substr(eq + 1), supernet.base().config.num_hidden_layers);
      if (shape.ok()) {
        absl::Status v = supernet.Validate(*shape);
        if (!v.ok()) shape = v;
      }
      if (!shape.ok()) {
        spdlog::error("--model-alias {}: {}", a, std::string(shape.status().message()));
        return 2;
      }
      ho.aliases[a.substr(0, eq)] = *shape;
    }
    if (f.chat_template == "auto") {
      ho.chat_template = ChatTemplateForModel(f.supernet);
    } else {
      auto t = ParseChatTemplate(f.chat_template);
      if (!t.ok()) {
        spdlog::error("--chat-template: {}", std::string(t.status().message()));
        return 2;
      }
      ho.chat_template = *t;
    }
    http = std::make_unique<HttpFrontend>(serving, ho);
    const absl::Status st = http->Start();
    if (!st.ok()) {
      spdlog::error("server: {}", std::string(st.message()));
      return 1;
    }
    spdlog::info("server: OpenAI-compatible HTTP on {}:{} (chat template {})", f.host, http->port(),
                 ChatTemplateName(ho.chat_template));
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (!f.tls_cert.empty()) {
    auto cert = ReadFile(f.tls_cert), key = ReadFile(f.tls_key);
    if (!cert.ok() || !key.ok()) {
      spdlog::error("server: cannot read --tls-cert/--tls-key");
      return 2;
    }
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({*key, *cert});
    creds = grpc::SslServerCredentials(ssl);
  }
  int bound_port = 0;
  builder.AddListeningPort(f.host + ":" + std::to_string(f.port), creds, &bound_port);
  builder.RegisterService(&service);
  builder.SetMaxReceiveMessageSize(4 << 20);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || bound_port == 0) {
    spdlog::error("server: cannot listen on {}:{}", f.host, f.port);
    return 1;
  }
  auto* health = server->GetHealthCheckService();
  health->SetServingStatus(true);
  spdlog::info("server: serving amoeba.v1.Amoeba on {}:{} ({})", f.host, bound_port,
               f.tls_cert.empty() ? "insecure" : "TLS");
  if (!f.port_file.empty())
    (void)WriteFileAtomic(f.port_file, std::to_string(bound_port) + " " +
                                           std::to_string(metrics.port()) + " " +
                                           std::to_string(http ? http->port() : -1) + "\n");

  // Wait for SIGTERM/SIGINT (blocked in every thread, so sigwait sees them), then drain.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  std::atomic<bool> stop_metrics{false};
  std::thread gauges([&] {
    while (!stop_metrics) {
      auto s = scheduler.stats();
      metrics.SetGlobal(s.waiting, s.cache_bytes, s.kv_bytes, s.cache_hits, s.cache_misses,
                        s.lanes);
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
    }
  });
  int sig = 0;
  sigwait(&set, &sig);
  spdlog::info("server: signal {}, draining for up to {:.0f}s", sig, f.drain_seconds);
  health->SetServingStatus(false);
  if (http) http->SetDraining();
  const auto deadline =
      Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(f.drain_seconds * 1000));
  scheduler.Drain(deadline);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
  if (http) http->Stop();
  stop_metrics = true;
  gauges.join();
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
  amoeba::Flags f;
  CLI::App app{"amoeba-server: serve any subnet of an Amoeba supernet over gRPC"};
  app.add_option("--supernet", f.supernet, "Supernet directory")
      ->envname("AMOEBA_SUPERNET")
      ->required();
  app.add_option("--host", f.host, "Listen address")->envname("AMOEBA_HOST")->capture_default_str();
  app.add_option("--port", f.port, "gRPC port (0 = any free port)")
      ->envname("AMOEBA_PORT")
      ->capture_default_str();
  app.add_option("--metrics-port", f.metrics_port, "Prometheus /metrics port (-1 = off, 0 = any)")
      ->envname("AMOEBA_METRICS_PORT")
      ->capture_default_str();
  app.add_option("--metrics-host", f.metrics_host, "Metrics listen address")
      ->envname("AMOEBA_METRICS_HOST")
      ->capture_default_str();
  app.add_option("--threads", f.threads, "Compute threads (0 = all cores)")
      ->envname("AMOEBA_THREADS")
      ->capture_default_str();
  app.add_option("--max-prompt-tokens", f.max_prompt_tokens, "Longest prompt")
      ->envname("AMOEBA_MAX_PROMPT_TOKENS")
      ->capture_default_str();
  app.add_option("--max-new-tokens", f.max_new_tokens, "Largest max_new_tokens")
      ->envname("AMOEBA_MAX_NEW_TOKENS")
      ->capture_default_str();
  app.add_option("--max-context", f.max_context, "KV cache length per sequence")
      ->envname("AMOEBA_MAX_CONTEXT")
      ->capture_default_str();
  app.add_option("--max-concurrent", f.slots, "Concurrent sequences per shape (batch size)")
      ->envname("AMOEBA_MAX_CONCURRENT")
      ->capture_default_str();
  app.add_option("--queue-size", f.queue, "Waiting requests before RESOURCE_EXHAUSTED")
      ->envname("AMOEBA_QUEUE_SIZE")
      ->capture_default_str();
  app.add_option("--merge-after", f.merge_after,
                 "Requests before a shape gets a merged-adapter copy, built in the background "
                 "(0 = always unmerged; cold shapes always start unmerged)")
      ->envname("AMOEBA_MERGE_AFTER")
      ->capture_default_str();
  app.add_option("--cache-mb", f.cache_mb, "Memory cap for merged subnet copies")
      ->envname("AMOEBA_CACHE_MB")
      ->capture_default_str();
  app.add_option("--prefill-chunk", f.prefill_chunk, "Prompt tokens per scheduler step")
      ->envname("AMOEBA_PREFILL_CHUNK")
      ->capture_default_str();
  app.add_option(
         "--weights-dtype", f.weights_dtype,
         "f32 | f16 | q8_0 | q4_0 (decode panels packed once at start; q8_0/q4_0 are GGML's "
         "block formats, the LM head quantized too)")
      ->envname("AMOEBA_WEIGHTS_DTYPE")
      ->capture_default_str();
  app.add_option("--draft-weights-dtype", f.draft_weights_dtype,
                 "Drafts read their own copy of the draft shape in this format (f32 | f16 | q8_0 | "
                 "q4_0; default: --weights-dtype, no copy): fewer bytes per drafted token, the "
                 "output still the target's")
      ->envname("AMOEBA_DRAFT_WEIGHTS_DTYPE");
  app.add_option("--speculate", f.speculate,
                 "Speculative decoding for requests that do not ask: auto (a smaller shape "
                 "drafts where the profile from `amoeba-admin eval` expects a gain) | off | a "
                 "draft shape depth=D,width=W")
      ->envname("AMOEBA_SPECULATE")
      ->capture_default_str();
  app.add_option("--speculate-min-speedup", f.speculate_min_speedup,
                 "auto drafts only where the expected speedup is at least this (the estimate "
                 "leaves out the scheduler's per-step costs: on the demo model it ran ~0.2 high)")
      ->envname("AMOEBA_SPECULATE_MIN_SPEEDUP")
      ->check(CLI::Range(1.0, 100.0))
      ->capture_default_str();
  app.add_option("--kv-dtype", f.kv_dtype,
                 "f32 | f16 (KV cache: half the memory and attention reads, K/V rounded)")
      ->envname("AMOEBA_KV_DTYPE")
      ->check(CLI::IsMember({"f32", "f16"}))
      ->capture_default_str();
  app.add_option("--tls-cert", f.tls_cert, "PEM certificate (enables TLS)")
      ->envname("AMOEBA_TLS_CERT");
  app.add_option("--tls-key", f.tls_key, "PEM private key")->envname("AMOEBA_TLS_KEY");
  app.add_option("--auth-token", f.auth_token, "Bearer token required for ExportSubnet")
      ->envname("AMOEBA_AUTH_TOKEN");
  app.add_flag("--auth-all", f.auth_all, "Require the token for every RPC")
      ->envname("AMOEBA_AUTH_ALL");
  app.add_flag("--allow-unauthenticated-export", f.allow_unauthenticated_export,
               "Serve ExportSubnet without --auth-token (anyone who reaches the port can download "
               "the model)")
      ->envname("AMOEBA_ALLOW_UNAUTHENTICATED_EXPORT");
  app.add_option("--export-dir", f.export_dir,
                 "Where exports are staged before streaming (default: the system temp directory)")
      ->envname("AMOEBA_EXPORT_DIR");
  app.add_option("--export-workers", f.export_workers,
                 "Exports at once (more are RESOURCE_EXHAUSTED)")
      ->envname("AMOEBA_EXPORT_WORKERS")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  app.add_option("--drain-seconds", f.drain_seconds, "Graceful drain on SIGTERM")
      ->envname("AMOEBA_DRAIN_SECONDS")
      ->capture_default_str();
  app.add_option("--profile", f.profile, "Measure every shape's decode latency at start-up")
      ->envname("AMOEBA_PROFILE")
      ->capture_default_str();
  app.add_option("--http-port", f.http_port,
                 "OpenAI-compatible HTTP API port (-1 = off, 0 = any free port)")
      ->envname("AMOEBA_HTTP_PORT")
      ->capture_default_str();
  app.add_option("--model-alias", f.model_aliases,
                 "Extra HTTP model name for a shape: name=depth=D,width=W (repeatable)")
      ->envname("AMOEBA_MODEL_ALIAS");
  app.add_option("--chat-template", f.chat_template,
                 "auto (from tokenizer_config.json) | plain | chatml | llama2 | llama3 | zephyr")
      ->envname("AMOEBA_CHAT_TEMPLATE")
      ->capture_default_str();
  app.add_option("--port-file", f.port_file, "Write the bound ports here (tests)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }
  return amoeba::Run(f);
}
