// amoeba-server's configuration: the library option structs themselves, bound to command-line
// flags, environment variables (AMOEBA_<FLAG>) and a TOML/INI file (--config). Every default is
// the option struct's own, so the tests, which build the same structs, run the production
// defaults. Precedence: flag > file > environment > default. --print-config writes the
// effective configuration in the file's format (a valid --config file).
#pragma once
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "server/http_frontend.h"
#include "server/scheduler.h"
#include "server/serving.h"

namespace amoeba {

struct ServerConfig {
  std::string supernet;                    // required
  int threads = 0;                         // compute threads (0 = all cores)
  bool pin_threads = true;                 // team threads on distinct CPUs (model/thread_pinning.h)
  bool profile = true;                     // measure every shape's decode latency at start-up
  std::string kv_dtype = "f32";            // SchedulerOptions::kv_dtype
  std::string prefill_attention = "auto";  // SchedulerOptions::bf16_prefill_attention (auto)
  // SchedulerOptions::weights_format and draft_format ("" = none), by name.
  std::string weights_dtype = WeightFormatName(SchedulerOptions{}.weights_format);
  std::string draft_weights_dtype;
  int64_t cache_mb = SchedulerOptions{}.cache_bytes >> 20;  // SchedulerOptions::cache_bytes
  // SchedulerOptions::prompt_cache_bytes
  int64_t prompt_cache_mb = SchedulerOptions{}.prompt_cache_bytes >> 20;
  int64_t idle_kv_keep_mb = SchedulerOptions{}.idle_kv_keep_bytes >> 20;  // idle_kv_keep_bytes
  // gRPC
  std::string host = "0.0.0.0";
  int port = 50051;
  std::string tls_cert, tls_key;  // PEM; both set = TLS on gRPC and HTTP
  // Prometheus /metrics on its own port
  std::string metrics_host = "0.0.0.0";
  int metrics_port = 9090;
  double drain_seconds = 20;
  std::string port_file;  // tests: the bound ports are written here
  std::vector<std::string> model_aliases;
  std::string chat_template = "auto";

  SchedulerOptions scheduler;
  ServiceOptions service;
  HttpOptions http;
};

// Binds every flag of `c` to `app` (and the --config file option).
void AddServerFlags(CLI::App& app, ServerConfig& c);

// After parsing: what the flags cannot check alone (TLS pairs, limits against the context).
// INVALID_ARGUMENT naming the flag.
absl::Status FinishServerConfig(ServerConfig& c);

}  // namespace amoeba
