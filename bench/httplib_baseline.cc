// cpp-httplib (Debian's 0.11) configured as well as it can be, for bench/http_transport.py to
// measure against Amoeba's HTTP transport under the same attacks: a pool of `--threads` workers
// (one connection each), read/write timeouts, a keep-alive timeout and the body limit. It serves
// GET /health and POST /v1/completions (the body is read and dropped).
#include <httplib.h>

#include <CLI/CLI.hpp>
#include <csignal>
#include <fstream>
#include <iostream>

#include "bench/bench_flags.h"

int main(int argc, char** argv) {
  CLI::App app{"cpp-httplib baseline server for bench/http_transport.py"};
  int threads = 64, read_timeout_s = 5, keep_alive_s = 5;
  size_t max_body = 1 << 20;
  std::string port_file;
  app.add_option("--threads", threads, "Worker threads (connections served at once)");
  app.add_option("--read-timeout-s", read_timeout_s, "Per-read timeout");
  app.add_option("--keep-alive-s", keep_alive_s, "Idle keep-alive timeout");
  app.add_option("--max-body", max_body, "Largest body (413 beyond)");
  app.add_option("--port-file", port_file, "Write the bound port here")->required();
  if (const std::optional<int> exit_code = amoeba::bench::ParseFlags(app, argc, argv))
    return *exit_code;

  httplib::Server s;
  s.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  s.set_read_timeout(read_timeout_s, 0);
  s.set_write_timeout(read_timeout_s, 0);
  s.set_keep_alive_timeout(keep_alive_s);
  s.set_payload_max_length(max_body);
  s.Get("/health", [](const httplib::Request&, httplib::Response& r) {
    r.set_content(R"({"status":"SERVING"})", "application/json");
  });
  s.Post("/v1/completions", [](const httplib::Request& req, httplib::Response& r) {
    r.set_content("{\"bytes\":" + std::to_string(req.body.size()) + "}", "application/json");
  });
  const int port = s.bind_to_any_port("127.0.0.1");
  if (port <= 0) return 1;
  std::ofstream(port_file) << port << "\n";
  static httplib::Server* server = &s;
  std::signal(SIGTERM, [](int) { server->stop(); });
  s.listen_after_bind();
  return 0;
}
