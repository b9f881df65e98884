#include "server_config.h"

#include <filesystem>
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

// What the KV of a prefix depends on: the supernet's files (names, sizes, modification times) and
// the weight format decoded. A saved prompt cache carries it in its file names.
std::string PromptCacheTag(const std::string& supernet, const std::string& weights_dtype) {
  namespace fs = std::filesystem;
  std::vector<std::string> parts = {weights_dtype};
  std::error_code ec;
  for (fs::recursive_directory_iterator it(supernet, ec), end; !ec && it != end; it.increment(ec)) {
    if (!it->is_regular_file(ec)) continue;
    const auto mtime = fs::last_write_time(it->path(), ec).time_since_epoch().count();
    parts.push_back(absl::StrCat(fs::relative(it->path(), supernet, ec).string(), ":",
                                 it->file_size(ec), ":", mtime));
  }
  std::sort(parts.begin(), parts.end());
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a: stable across processes and builds
  for (const std::string& p : parts)
    for (char ch : p + "\n") h = (h ^ static_cast<uint8_t>(ch)) * 0x100000001b3ull;
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return hex;
}

}  // namespace

void AddServerFlags(CLI::App& app, ServerConfig& c) {
  app.set_config("--config", "", "TOML or INI file of these options (flag = value)");
  app.allow_config_extras(false);
  Flag(app, "supernet", c.supernet, "Supernet directory")->required();
  Flag(app, "threads", c.threads,
       "Compute threads (0 = the CPUs this process may use: affinity mask, cgroup CPU quota)");
  Flag(app, "pin-threads", c.pin_threads,
       "Pin the compute threads to distinct CPUs while they decode (off also with OMP_PROC_BIND "
       "set)");
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
  Flag(app, "merged-copies-up-to-lanes", s.merged_copies_up_to_lanes,
       "A step over more shapes than this runs the merged ones on their supernet views (adapters "
       "as packed deltas): one stream of the shared weights instead of one per copy")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
  Flag(app, "build-defer-ms", s.build_defer_ms,
       "How long after it was queued a merged-copy or draft-copy build keeps waiting for the "
       "decode worker to go idle (before it starts, and after each matrix for requests that "
       "arrive meanwhile) before it runs through beside them (a build slows the steps it "
       "overlaps)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30));
  Flag(app, "idle-trim-ms", s.idle_trim_ms,
       "Idle time after which the decode worker hands memory back (activations, finished "
       "sequences' KV arenas beyond --idle-kv-keep-mb); shorter gaps between requests keep it for "
       "the next ones")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30));
  Flag(app, "idle-kv-keep-mb", c.idle_kv_keep_mb,
       "KV arenas of finished sequences the idle worker keeps for the next requests (MiB, "
       "the smallest arenas; the rest go at --idle-trim-ms)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30));
  Flag(app, "cache-mb", c.cache_mb,
       "Memory cap for per-shape copies: merged subnet copies and unmerged shapes' packed adapter "
       "deltas (MiB)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30));
  Flag(app, "prompt-cache-mb", c.prompt_cache_mb,
       "Memory cap for the prompt cache: KV of prompt prefixes and finished conversations per "
       "shape, reused by later requests that start the same way (MiB; 0 = off)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30));
  Flag(app, "prompt-cache-dir", s.prompt_cache_dir,
       "Save the prompt cache here at shutdown and read it back on start, shape by shape (files "
       "name the supernet's weights; empty = not saved)");
  Flag(app, "prompt-cache-block", s.prompt_cache_block,
       "Tokens per prompt-cache block (prefixes are reused in whole blocks)")
      ->check(CLI::Range(int64_t{1}, int64_t{4096}));
  Flag(app, "hold-for-budgets-ms", s.hold_for_budgets_ms,
       "Longest a request without a decode target waits while admitting it would break a running "
       "budget request's target (0: never)")
      ->check(CLI::Range(int64_t{0}, int64_t{3600000}));
  Flag(app, "shared-steps", s.shared_steps,
       "One engine pass per step for every shape in flight: the supernet's weights are read once "
       "for all of them (false: each shape steps on its own)");
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
  Flag(app, "prefill-attention", c.prefill_attention,
       "auto (bf16 products on AMX tiles where the CPU has them: long prompts ~2x faster, logits "
       "at bf16's rounding) | fp32")
      ->check(CLI::IsMember({"auto", "fp32"}));

  // Speculative decoding.
  Flag(app, "speculate", c.service.speculate,
       "Speculative decoding for requests that do not ask: auto (a smaller shape drafts where the "
       "profile from `amoeba-admin eval` expects a gain) | off | a draft shape depth=D,width=W");
  Flag(app, "plan-under-load", c.service.plan_under_load,
       "Plan budget requests with a decode-latency target against the load in flight (smaller "
       "shapes when busy, RESOURCE_EXHAUSTED when no shape can keep the target); false: the idle "
       "profile alone");
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
       "auto (tokenizer_config.json's Jinja template, rendered) | plain | chatml | llama2 | "
       "llama3 | zephyr | a .jinja file");
  Flag(app, "allowed-origins", c.http.allowed_origins,
       "Web origins allowed to call the HTTP API from a browser (CORS), e.g. "
       "https://app.example.com; * = any (default: none but the server's own)");
  Flag(app, "allowed-hosts", c.http.allowed_hosts,
       "Host names the HTTP API answers to (421 otherwise; guards against DNS rebinding); "
       "default: any");

  // HTTP limits (the API port and the metrics port).
  HttpLimits& h = c.http.limits;
  Flag(app, "max-body-bytes", h.max_body_bytes,
       "Largest HTTP request body, chunked included (413 beyond)")
      ->check(CLI::Range(int64_t{1024}, int64_t{1} << 30));
  Flag(app, "http-max-inflight-body-bytes", h.max_inflight_body_bytes,
       "Bytes of request bodies held at once, all clients together (503 beyond)")
      ->check(CLI::Range(int64_t{1024}, int64_t{1} << 40));
  Flag(app, "http-max-header-bytes", h.max_header_bytes, "Largest request head (431 beyond)")
      ->check(CLI::Range(int64_t{1024}, int64_t{1} << 24));
  Flag(app, "http-max-header-fields", h.max_header_fields, "Most header fields (431 beyond)")
      ->check(CLI::Range(8, 10000));
  Flag(app, "http-max-connections", h.max_connections,
       "Open HTTP connections in all (more are closed at once)")
      ->check(CLI::Range(1, 1 << 20));
  Flag(app, "http-max-connections-per-client", h.max_connections_per_client,
       "Open HTTP connections per client address")
      ->check(CLI::Range(1, 1 << 20));
  Flag(app, "http-header-timeout-ms", h.header_timeout_ms,
       "Time a client has to send a whole request head (then closed)")
      ->check(CLI::Range(100, 3600000));
  Flag(app, "http-body-timeout-ms", h.body_timeout_ms, "Time a client has to send a whole body")
      ->check(CLI::Range(100, 3600000));
  Flag(app, "http-idle-timeout-ms", h.idle_timeout_ms,
       "Keep-alive: how long an idle connection waits for its next request")
      ->check(CLI::Range(100, 3600000));
  Flag(app, "http-write-timeout-ms", h.write_timeout_ms,
       "A response write that makes no progress this long closes the connection")
      ->check(CLI::Range(100, 3600000));
  Flag(app, "http-stream-buffer-bytes", h.max_stream_buffer_bytes,
       "Unsent bytes of one response before a client that stopped reading is dropped (and its "
       "generation cancelled)")
      ->check(CLI::Range(int64_t{4096}, int64_t{1} << 30));
  Flag(app, "http-socket-send-buffer-bytes", h.socket_send_buffer_bytes,
       "Kernel send buffer per HTTP connection (SO_SNDBUF; 0 = the kernel's autotuning)")
      ->check(CLI::Range(0, 1 << 30));
  Flag(app, "http-io-threads", h.io_threads, "Threads that run the HTTP sockets")
      ->check(CLI::Range(1, 64));
  Flag(app, "http-handler-threads", h.handler_threads, "Threads that run the HTTP handlers")
      ->check(CLI::Range(1, 64));
}

absl::Status FinishServerConfig(ServerConfig& c) {
  if (c.tls_cert.empty() != c.tls_key.empty())
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  // A prompt must leave room for at least one new token in the KV cache.
  c.service.limits.max_prompt_tokens =
      std::min(c.service.limits.max_prompt_tokens, c.scheduler.max_context - 1);
  c.scheduler.kv_dtype = c.kv_dtype == "f16" ? at::kHalf : at::kFloat;
  c.scheduler.bf16_prefill_attention = c.prefill_attention == "auto";
  c.scheduler.cache_bytes = c.cache_mb << 20;
  c.scheduler.prompt_cache_bytes = c.prompt_cache_mb << 20;
  c.scheduler.idle_kv_keep_bytes = c.idle_kv_keep_mb << 20;
  if (!c.scheduler.prompt_cache_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(c.scheduler.prompt_cache_dir, ec);
    if (ec)
      return absl::InvalidArgumentError(absl::StrCat(
          "--prompt-cache-dir ", c.scheduler.prompt_cache_dir, ": cannot create: ", ec.message()));
    c.scheduler.prompt_cache_tag = PromptCacheTag(c.supernet, c.weights_dtype);
  }
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
