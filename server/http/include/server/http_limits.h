// The limits and timeouts of an HTTP listener (the API port and the metrics port), as plain
// options; docs/operations.md explains each and how to set it.
#pragma once
#include <cstdint>

namespace amoeba {

// Limits and timeouts of one HTTP listener; every default is what production runs.
struct HttpLimits {
  int io_threads = 2;                          // threads that run the sockets (never a handler)
  int handler_threads = 2;                     // threads that run the handlers
  int64_t max_header_bytes = 16 << 10;         // request line + fields; larger is 431
  int max_header_fields = 64;                  // more is 431
  int64_t max_body_bytes = 1 << 20;            // per request, chunked included; larger is 413
  int64_t max_inflight_body_bytes = 64 << 20;  // all bodies held at once; beyond is 503
  int max_connections = 1024;                  // in all; beyond, new connections are closed
  int max_connections_per_client = 256;        // per client address
  int header_timeout_ms = 10000;               // to receive a whole request head
  int body_timeout_ms = 30000;                 // to receive a whole body
  int idle_timeout_ms = 30000;                 // keep-alive: waiting for the next request
  int write_timeout_ms = 30000;                // one write that makes no progress
  int64_t max_stream_buffer_bytes = 1 << 20;   // unsent bytes of one response; beyond, closed
  // The kernel's send buffer per connection (SO_SNDBUF), which holds a non-reading client's
  // bytes before the bound above sees them; 0 = the kernel's autotuning (up to net.ipv4.tcp_wmem).
  int socket_send_buffer_bytes = 0;
};

}  // namespace amoeba
