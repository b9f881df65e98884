// The HTTP front end in-process (the Python tests drive the real binary): its exception
// boundary, exports over HTTP, route labels in /metrics, and finish reasons.
#include <gtest/gtest.h>
#include <httplib.h>

#include <map>
#include <regex>

#include <nlohmann/json.hpp>

#include "file_digest.h"
#include "server/http_frontend.h"
#include "tests/server_fixture.h"

namespace amoeba {
namespace http_frontend_test {  // named: a unity build joins test files
using nlohmann::json;
using testing::TestServer;

struct Http {
  HttpFrontend front;
  httplib::Client client;
  Http(Serving& s, HttpOptions o) : front(s, std::move(o)), client("127.0.0.1", Start()) {}
  int Start() {
    EXPECT_TRUE(front.Start().ok());
    return front.port();
  }
};

HttpOptions Local(std::function<void(const std::string&)> hook = nullptr) {
  HttpOptions o;
  o.host = "127.0.0.1";
  o.port = 0;
  o.fault_hook = std::move(hook);
  return o;
}

// ustar: name at 0, octal size at 124, data in 512-byte blocks; two zero blocks end it.
std::map<std::string, std::string> Untar(const std::string& tar) {
  std::map<std::string, std::string> files;
  size_t at = 0;
  while (at + 512 <= tar.size()) {
    const std::string name(tar.c_str() + at);
    if (name.empty()) break;
    const uint64_t size = std::stoull(std::string(tar.data() + at + 124, 11), nullptr, 8);
    files[name] = tar.substr(at + 512, size);
    at += 512 + (size + 511) / 512 * 512;
  }
  return files;
}

TEST(HttpFrontendTest, AThrowingHandlerIsA500AndTheServerGoesOn) {
  TestServer ts;
  std::atomic<bool> fail{true};
  Http h(*ts.serving, Local([&](const std::string&) {
    if (fail) throw std::runtime_error("injected handler fault");
  }));
  auto r = h.client.Get("/v1/models");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 500);
  const json body = json::parse(r->body);
  EXPECT_EQ(body["error"]["message"], "internal error");  // the detail stays in the log
  EXPECT_EQ(body["error"]["type"], "server_error");
  fail = false;
  r = h.client.Post("/v1/completions",
                    R"({"model": "full", "prompt": "go on", "max_tokens": 3, "temperature": 0})",
                    "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(json::parse(r->body)["usage"]["completion_tokens"], 3);
}

TEST(HttpFrontendTest, ExportsStreamATarWithChecksums) {
  TestServer ts({}, "secret");
  Http h(*ts.serving, Local());
  const std::string req = R"({"shape": "depth=3,width=0.625", "format": "gguf", "dtype": "q8_0"})";
  auto r = h.client.Post("/v1/amoeba/export", req, "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401) << r->body;  // exports need the token
  r = h.client.Post("/v1/amoeba/export", {{"Authorization", "Bearer secret"}}, req,
                    "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(r->get_header_value("Content-Type"), "application/x-tar");
  const auto files = Untar(r->body);
  ASSERT_TRUE(files.count("model.gguf"));
  ASSERT_TRUE(files.count("SHA256SUMS"));
  Sha256 digest;
  digest.Update(files.at("model.gguf"));
  EXPECT_EQ(files.at("SHA256SUMS"), digest.HexDigest() + "  model.gguf\n");
  EXPECT_EQ(files.at("model.gguf").substr(0, 4), "GGUF");
  // Bad requests are refused before any work, naming the field.
  r = h.client.Post("/v1/amoeba/export", {{"Authorization", "Bearer secret"}},
                    R"({"shape": "depth=2,width=0.5"})", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 400) << r->body;
  r = h.client.Post("/v1/amoeba/export", {{"Authorization", "Bearer secret"}},
                    R"({"colour": "red"})", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 400);
  EXPECT_NE(r->body.find("colour"), std::string::npos);
}

// /v1/amoeba/shapes was counted under route "other".
TEST(HttpFrontendTest, EveryRouteIsCountedUnderItsOwnLabel) {
  TestServer ts;
  Http h(*ts.serving, Local());
  for (const char* path : {"/v1/amoeba/shapes", "/v1/models", "/health", "/nowhere"})
    ASSERT_TRUE(h.client.Get(path));
  // Counted after the response is sent: wait for the four.
  for (const char* route : {"/v1/amoeba/shapes", "/v1/models", "/health", "other"}) {
    const std::regex counted(std::string("amoeba_http_requests_total\\{[^}]*route=\"") + route +
                             "\"[^}]*\\} 1");
    std::string m;
    for (int i = 0; i < 200; ++i) {
      m = ts.metrics.Render();
      if (std::regex_search(m, counted)) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    EXPECT_TRUE(std::regex_search(m, counted)) << route << "\n" << m;
  }
}

// A time limit reached OpenAI clients as finish reason "length".
TEST(HttpFrontendTest, ATimeLimitIsNotReportedAsLength) {
  TestServer ts;
  Http h(*ts.serving, Local());
  auto r = h.client.Post("/v1/completions",
                         R"({"model": "full", "prompt": "slow", "max_tokens": 200,
                             "temperature": 0, "amoeba": {"time_limit_ms": 1}})",
                         "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const json body = json::parse(r->body);
  EXPECT_EQ(body["choices"][0]["finish_reason"], "time_limit") << body;
  EXPECT_LT(body["usage"]["completion_tokens"].get<int>(), 200);
}

// amoeba.priority reaches the core: a class out of range is a 400 naming the field.
TEST(HttpFrontendTest, PriorityIsAnAmoebaExtension) {
  TestServer ts;
  Http h(*ts.serving, Local());
  auto ok = h.client.Post("/v1/completions",
                          R"({"model": "full", "prompt": "hi", "max_tokens": 2,
                              "amoeba": {"priority": 7}})",
                          "application/json");
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200) << ok->body;
  for (const char* bad : {R"(101)", R"("high")", R"(1.5)"}) {
    auto r = h.client.Post("/v1/completions",
                           std::string(R"({"model": "full", "prompt": "hi", "max_tokens": 2,
                              "amoeba": {"priority": )") +
                               bad + "}}",
                           "application/json");
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 400) << bad << ": " << r->body;
    EXPECT_NE(r->body.find("priority"), std::string::npos) << r->body;
  }
}

}  // namespace http_frontend_test
}  // namespace amoeba
