#include "server_config.h"

#include <map>

#include "absl/strings/str_cat.h"

namespace amoeba {
namespace {

const std::map<std::string, WeightFormat> kFormats = {{"f32", WeightFormat::kF32},
                                                      {"f16", WeightFormat::kF16},
                                                      {"q8_0", WeightFormat::kQ8_0},
                                                      {"q4_0", WeightFormat::kQ4_0}};

// A flag with its environment twin AMOEBA_<NAME> and its default shown in --help.
template <typename T>
CLI::Option* Flag(CLI::App& app, const std::string& name, T& value, const std::string& help) {
  std::string env = "AMOEBA_" + name;
  for (char& ch : env) ch = ch == '-' ? '_' : static_cast<char>(std::toupper(ch));
  return app.add_option("--" + name, value, help)->envname(env)->capture_default_str();
}

}  // namespace

void AddServerFlags(CLI::App& app, ServerConfig& c) {
  app.set_config("--config", "", "TOML or INI file of these options (flag = value)");
  app.allow_config_extras(false);
  Flag(app, "supernet", c.supernet, "Supernet directory")->required();
  Flag(app, "threads", c.threads, "Compute threads (0 = all cores)");
  Flag(app, "profile", c.profile, "Measure every shape's decode latency at start-up");

  // Listeners.
  Flag(app, "host", c.host, "Listen address (gRPC and HTTP)");
  Flag(app, "port", c.port, "gRPC port (0 = any free port)");
  Flag(app, "http-port", c.http.port,
       "OpenAI-compatible HTTP API port (-1 = off, 0 = any free port)");
  Flag(app, "metrics-port", c.metrics_port, "Prometheus /metrics port (-1 = off, 0 = any)");
  Flag(app, "metrics-host", c.metrics_host, "Metrics listen address");
  Flag(app, "tls-cert", c.tls_cert, "PEM certificate (enables TLS on gRPC and HTTP)");
  Flag(app, "tls-key", c.tls_key, "PEM private key");
  Flag(app, "drain-seconds", c.drain_seconds, "Graceful drain on SIGTERM")
      ->check(CLI::Range(0.0, 3600.0));
  Flag(app, "port-file", c.port_file, "Write the bound ports here (tests)");

  // Limits.
  ServiceLimits& l = c.service.limits;
  Flag(app, "max-prompt-tokens", l.max_prompt_tokens, "Longest prompt")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  Flag(app, "max-new-tokens", l.max_new_tokens, "Largest max_new_tokens")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  Flag(app, "max-prompt-bytes", l.max_prompt_bytes, "Largest text prompt, before tokenising")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30));

  // Scheduler.
  SchedulerOptions& s = c.scheduler;
  Flag(app, "max-context", s.max_context, "KV cache length per sequence")
      ->check(CLI::Range(int64_t{2}, int64_t{1} << 20));
  Flag(app, "max-concurrent", s.slots_per_shape, "Concurrent sequences per shape (batch size)")
      ->check(CLI::Range(int64_t{1}, int64_t{4096}));
  Flag(app, "queue-size", s.max_queue, "Waiting requests before RESOURCE_EXHAUSTED")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
  Flag(app, "merge-after", s.merge_after_requests,
       "Requests before a shape gets a merged-adapter copy, built in the background (0 = always "
       "unmerged; cold shapes always start unmerged)");
  Flag(app, "cache-mb", c.cache_mb, "Memory cap for merged subnet copies (MiB)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30));
  Flag(app, "prefill-chunk", s.prefill_chunk, "Prompt tokens per scheduler step")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  Flag(app, "weights-dtype", c.weights_dtype,
       "f32 | f16 | q8_0 | q4_0 (decode panels packed once at start; q8_0/q4_0 are GGML's block "
       "formats, the LM head quantized too)")
      ->check(CLI::IsMember({"f32", "f16", "q8_0", "q4_0"}));
  Flag(app, "draft-weights-dtype", c.draft_weights_dtype,
       "Drafts read their own copy of the draft shape in this format (f32 | f16 | q8_0 | q4_0; "
       "default: --weights-dtype, no copy): fewer bytes per drafted token, the output still the "
       "target's")
      ->check(CLI::IsMember({"", "f32", "f16", "q8_0", "q4_0"}));
  Flag(app, "kv-dtype", c.kv_dtype,
       "f32 | f16 (KV cache: half the memory and attention reads, K/V rounded)")
      ->check(CLI::IsMember({"f32", "f16"}));

  // Speculative decoding.
  Flag(app, "speculate", c.service.speculate,
       "Speculative decoding for requests that do not ask: auto (a smaller shape drafts where the "
       "profile from `amoeba-admin eval` expects a gain) | off | a draft shape depth=D,width=W");
  Flag(app, "speculate-min-speedup", c.service.speculate_min_speedup,
       "auto drafts only where the expected speedup is at least this (the estimate leaves out "
       "the scheduler's per-step costs: on the demo model it ran ~0.2 high)")
      ->check(CLI::Range(1.0, 100.0));

  // Access and exports.
  Flag(app, "auth-token", c.service.auth_token, "Bearer token required for exports");
  app.add_flag("--auth-all", c.service.token_for_all,
               "Require the token for every call but the health check")
      ->envname("AMOEBA_AUTH_ALL");
  app.add_flag("--allow-unauthenticated-export", c.service.allow_unauthenticated_export,
               "Serve exports without --auth-token (anyone who reaches the port can download the "
               "model)")
      ->envname("AMOEBA_ALLOW_UNAUTHENTICATED_EXPORT");
  Flag(app, "export-dir", c.service.export_tmp_dir,
       "Where exports are staged before streaming (default: the system temp directory)");
  Flag(app, "export-workers", c.service.export_workers,
       "Exports at once (more are RESOURCE_EXHAUSTED)")
      ->check(CLI::Range(1, 16));

  // HTTP.
  Flag(app, "model-alias", c.model_aliases,
       "Extra HTTP model name for a shape: name=depth=D,width=W (repeatable)");
  Flag(app, "chat-template", c.chat_template,
       "auto (from tokenizer_config.json) | plain | chatml | llama2 | llama3 | zephyr");
  Flag(app, "max-body-bytes", c.http.max_body_bytes, "Largest HTTP request body (413 beyond)")
      ->check(CLI::Range(size_t{1024}, size_t{1} << 30));
}

absl::Status FinishServerConfig(ServerConfig& c) {
  if (c.tls_cert.empty() != c.tls_key.empty())
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  // A prompt must leave room for at least one new token in the KV cache.
  c.service.limits.max_prompt_tokens =
      std::min(c.service.limits.max_prompt_tokens, c.scheduler.max_context - 1);
  c.scheduler.kv_dtype = c.kv_dtype == "f16" ? at::kHalf : at::kFloat;
  c.scheduler.cache_bytes = c.cache_mb << 20;
  c.scheduler.weights_format = kFormats.at(c.weights_dtype);
  c.service.weights_format = c.scheduler.weights_format;
  c.scheduler.draft_format.reset();
  if (auto it = kFormats.find(c.draft_weights_dtype);
      it != kFormats.end() && it->second != c.scheduler.weights_format)
    c.scheduler.draft_format = it->second;
  c.service.draft_format = c.scheduler.draft_format;
  c.http.host = c.host;
  c.http.tls_cert = c.tls_cert;
  c.http.tls_key = c.tls_key;
  return absl::OkStatus();
}

}  // namespace amoeba
