// What leaves the server is what was tuned, and no request escapes, floods or crashes it: exports
// of a tuned supernet, export ids that try to leave the staging directory, oversized and
// out-of-range fields, the error boundary, usage and cache statistics, and the planner's single
// quality source. Each test names the failure it would have caught.
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <regex>
#include <thread>

#include "file_digest.h"
#include "model/gguf.h"
#include "model/gguf_model.h"
#include "model/packed_linear.h"
#include "model/torch_forward.h"
#include "server/export_job.h"
#include "server/request_checks.h"
#include "server/served_latency.h"
#include "subnet/export.h"
#include "tests/server_fixture.h"

namespace amoeba {
namespace server_trust_test {  // named: a unity build joins test files
namespace fs = std::filesystem;
using testing::GreedyOn;
using testing::LocalGreedy;
using testing::MaxAbsDiff;
using testing::Req;
using testing::Stream;
using testing::Streamed;
using testing::TempDir;
using testing::TestServer;

std::vector<std::string> Entries(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) out.push_back(e.path().filename());
  return out;
}

// Export used to drop the SMoL adapters: the "phone model" was the untuned subnet. Now the
// exported directory, loaded as a plain model, generates the server's greedy text and its logits
// equal the served (unmerged) subnet's within 1e-4, for grid and uniform widths.
TEST(ServerTrustTest, ExportOfATunedSupernetIsTheServedSubnet) {
  TestServer ts({}, "tok", /*adapters=*/true);
  auto c = ts.Client("tok");
  at::InferenceMode g;
  const at::Tensor ids = at::randint(259, {2, 12}, at::kLong);
  for (bool uniform : {false, true}) {
    for (Shape sh : {Shape{4, 0.75}, Shape{5, 1.0}}) {
      v1::ExportSubnetRequest req;
      req.mutable_shape()->set_depth(static_cast<int32_t>(sh.depth));
      req.mutable_shape()->set_width(sh.width);
      req.set_uniform_width(uniform);
      const std::string out = ts.dir.file(absl::StrCat("export-", uniform, "-", sh.ToString()));
      grpc::Status st = c.Export(req, out);
      ASSERT_TRUE(st.ok()) << st.error_message();
      auto loaded = LoadModel(out);
      ASSERT_TRUE(loaded.ok()) << loaded.status();
      auto served = BuildSubnet(*ts.supernet, ts.smol.get(), sh,
                                {.adapters = AdapterMode::kUnmerged, .uniform_width = uniform});
      ASSERT_TRUE(served.ok()) << served.status();
      // Within 1e-4 of the logits' scale (merging rounds differently than the unmerged delta).
      const at::Tensor want = TorchForward(*served, ids);
      const double scale = std::max(1.0, want.abs().max().item<double>());
      EXPECT_LT(MaxAbsDiff(TorchForward(*loaded, ids), want), 1e-4 * scale)
          << sh.ToString() << (uniform ? " uniform" : "");
      if (!uniform) {  // the server serves grid widths: its greedy text is the export's
        Streamed s = Stream(c, Req("Hello there", static_cast<int>(sh.depth), sh.width, 10));
        ASSERT_TRUE(s.status.ok());
        EXPECT_EQ(s.tokens, GreedyOn(std::make_shared<const Model>(std::move(*loaded)),
                                     *ts.supernet->tokenizer(), "Hello there", 10))
            << sh.ToString();
      }
    }
  }
  // --no-adapters is the base subnet, which differs from the tuned one.
  v1::ExportSubnetRequest req;
  req.mutable_shape()->set_depth(4);
  req.mutable_shape()->set_width(0.75);
  req.set_no_adapters(true);
  ASSERT_TRUE(c.Export(req, ts.dir.file("base")).ok());
  auto base = LoadModel(ts.dir.file("base"));
  auto plain = ts.supernet->Extract({4, 0.75});
  EXPECT_LT(MaxAbsDiff(TorchForward(*base, ids), TorchForward(*plain, ids)), 1e-5);
  auto tuned = LoadModel(ts.dir.file(absl::StrCat("export-0-", Shape{4, 0.75}.ToString())));
  EXPECT_GT(MaxAbsDiff(TorchForward(*base, ids), TorchForward(*tuned, ids)), 1e-3);
}

// GGUF export of a tuned supernet: a non-uniform grid shape is written as deci, a uniform one as
// llama, adapters merged; each reads back with the served subnet's logits (f32), and in q8_0 the
// read-back model decodes as the merged subnet does from q8_0 panels.
TEST(ServerTrustTest, GgufExportOfATunedSupernetIsTheServedSubnet) {
  TestServer ts({}, "tok", /*adapters=*/true);
  at::InferenceMode g;
  const at::Tensor ids = at::randint(259, {2, 12}, at::kLong);
  for (bool uniform : {false, true}) {
    const Shape sh{4, 0.75};
    ExportOptions eo;
    eo.uniform_width = uniform;
    Model sub = testing::MustOk(SubnetForExport(*ts.supernet, ts.smol.get(), sh, eo), "subnet");
    const std::string path = ts.dir.file(absl::StrCat("s", uniform, ".gguf"));
    ASSERT_TRUE(WriteGgufExport(*ts.supernet, sub, sh, path, WeightFormat::kF32).ok());
    auto f = ReadGguf(path);
    ASSERT_TRUE(f.ok());
    EXPECT_EQ(*f->GetString("general.architecture"), uniform ? "llama" : "deci");
    EXPECT_EQ(*f->GetString("tokenizer.ggml.model"), "gpt2");
    auto back = LoadGgufModel(path);
    ASSERT_TRUE(back.ok()) << back.status();
    auto served = BuildSubnet(*ts.supernet, ts.smol.get(), sh,
                              {.adapters = AdapterMode::kUnmerged, .uniform_width = uniform});
    ASSERT_TRUE(served.ok());
    const at::Tensor want = TorchForward(*served, ids);
    const double scale = std::max(1.0, want.abs().max().item<double>());
    EXPECT_LT(MaxAbsDiff(TorchForward(*back, ids), want), 1e-4 * scale) << uniform;
  }
  // Through ExportSubnet: one model.gguf per dtype; bad format/dtype pairs are INVALID_ARGUMENT.
  auto c = ts.Client("tok");
  for (const char* dtype : {"q8_0", "q4_0"}) {
    v1::ExportSubnetRequest req;
    req.mutable_shape()->set_depth(4);
    req.mutable_shape()->set_width(0.75);
    req.set_format("gguf");
    req.set_dtype(dtype);
    const std::string out = ts.dir.file(absl::StrCat("rpc-", dtype));
    grpc::Status st = c.Export(req, out);
    ASSERT_TRUE(st.ok()) << st.error_message();
    auto f = ReadGguf(out + "/model.gguf");
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_EQ(*f->GetString("general.architecture"), "deci");
    EXPECT_EQ(GgmlTypeName(f->Find("blk.0.ffn_up.weight")->type),
              std::string(dtype == std::string("q8_0") ? "Q8_0" : "Q4_0"));
  }
  for (auto [format, dtype] :
       {std::pair{"gguf", "bf16"}, std::pair{"hf", "q8_0"}, std::pair{"onnx", ""}}) {
    v1::ExportSubnetRequest req;
    req.set_format(format);
    req.set_dtype(dtype);
    grpc::Status st = c.Export(req, ts.dir.file("bad"));
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << format << " " << dtype;
    EXPECT_NE(st.error_message().find(std::string(format) == "onnx" ? "format" : "dtype"),
              std::string::npos)
        << st.error_message();
  }
}

// --weights-dtype q8_0 / q4_0 end to end: GetModelInfo names the format, an unmerged lane (no
// merging) and the merged copy built after a first request both serve the greedy text that the
// same subnet decodes locally from panels of that format. (A merged copy quantizes the merged
// weights, so it differs slightly from the unmerged lane, and a lane may switch to it between
// steps: the two cases run on separate servers.)
TEST(ServerTrustTest, ServesQuantizedWeightsEndToEnd) {
  for (WeightFormat format : {WeightFormat::kQ8_0, WeightFormat::kQ4_0}) {
    SchedulerOptions so;
    so.weights_format = format;
    so.merge_after_requests = 0;
    TestServer ts(so, "", /*adapters=*/true);
    auto c = ts.Client();
    v1::ModelInfo info;
    ASSERT_TRUE(c.GetModelInfo(&info).ok());
    EXPECT_EQ(info.weights_dtype(), WeightFormatName(format));
    ASSERT_EQ(PanelsFormat(ts.supernet->base().layers[0].panels[0]), format);
    const Shape sh{4, 0.75};
    at::InferenceMode g;
    auto unmerged = testing::MustOk(
        BuildSubnet(*ts.supernet, ts.smol.get(), sh, {.adapters = AdapterMode::kUnmerged}),
        "unmerged subnet");
    const auto want_cold = GreedyOn(std::make_shared<const Model>(std::move(unmerged)),
                                    *ts.supernet->tokenizer(), "Hello there", 12);
    Streamed cold = Stream(c, Req("Hello there", 4, 0.75, 12));
    ASSERT_TRUE(cold.status.ok()) << cold.status.error_message();
    EXPECT_EQ(cold.tokens, want_cold) << WeightFormatName(format);
    EXPECT_EQ(cold.last.usage().completion_tokens(), static_cast<int>(want_cold.size()));
    // The merged copy: merged fp32 weights packed in the same format.
    so.merge_after_requests = 1;
    TestServer tm(so, "", /*adapters=*/true);
    auto cm = tm.Client();
    ASSERT_TRUE(Stream(cm, Req("warm up", 4, 0.75, 2)).status.ok());
    Model merged =
        testing::MustOk(BuildSubnet(*tm.supernet, tm.smol.get(), sh, {}), "merged subnet");
    for (LayerWeights& l : merged.layers)
      for (at::Tensor& p : l.panels) p = at::Tensor();
    merged.head_panels = tm.supernet->base().head_panels;
    PackWeights(merged, format);
    const auto want_warm = GreedyOn(std::make_shared<const Model>(std::move(merged)),
                                    *tm.supernet->tokenizer(), "Hello there", 12);
    for (int i = 0; i < 200 && tm.scheduler->stats().merges_built < 1; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ASSERT_EQ(tm.scheduler->stats().merges_built, 1);
    Streamed warm = Stream(cm, Req("Hello there", 4, 0.75, 12));
    ASSERT_TRUE(warm.status.ok());
    EXPECT_EQ(warm.tokens, want_warm) << WeightFormatName(format);
  }
}

// The staging path used to be built from request_id: "/.."*12 + "/dir\0" deleted a directory,
// "../../x" created directories outside the export directory, absolute ids made trees under it.
// Now such ids are INVALID_ARGUMENT, nothing outside the staging directory is created or
// deleted, and no staging directory is left behind after any export.
TEST(ServerTrustTest, ExportIdsCannotReachTheFileSystem) {
  TempDir outside;
  const std::string victim = outside.file("victim");
  fs::create_directories(victim);
  std::ofstream(victim + "/keep.txt") << "precious";
  std::string exports;
  TestServer ts({}, "tok", false, [&](ServiceOptions& o) {
    o.export_tmp_dir = outside.file("exports");
    exports = o.export_tmp_dir;
  });
  fs::create_directories(exports);
  auto c = ts.Client("tok");
  std::string climb;
  for (int i = 0; i < 12; ++i) climb += "/..";
  const std::vector<std::string> ids = {climb + victim + std::string(1, '\0'),
                                        "../../victims/x",
                                        "/tmp/absolute",
                                        victim,
                                        std::string(300, 'a'),
                                        "ok\nforged log line"};
  for (const std::string& id : ids) {
    v1::ExportSubnetRequest req;
    req.set_request_id(id);
    req.mutable_shape()->set_depth(4);
    req.mutable_shape()->set_width(0.75);
    grpc::Status st = c.Export(req, ts.dir.file("never"));
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << LogSafe(id);
    EXPECT_NE(st.error_message().find("request_id"), std::string::npos);
    EXPECT_LT(st.error_message().size(), 200u);
  }
  EXPECT_TRUE(fs::exists(victim + "/keep.txt"));
  EXPECT_FALSE(fs::exists(outside.file("victims")));
  EXPECT_FALSE(fs::exists(ts.dir.file("never")));
  EXPECT_EQ(Entries(outside.path()), (std::vector<std::string>{"exports", "victim"}))
      << "created outside the export directory";
  // A good export, and one cancelled by the client after the first chunk: nothing stays behind.
  v1::ExportSubnetRequest req;
  req.set_request_id("export-ok.1");
  req.mutable_shape()->set_depth(4);
  req.mutable_shape()->set_width(0.75);
  ASSERT_TRUE(c.Export(req, ts.dir.file("got")).ok());
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer tok");
    auto stub = v1::Amoeba::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", ts.port),
                                                        grpc::InsecureChannelCredentials()));
    auto reader = stub->ExportSubnet(&ctx, req);
    v1::FileChunk chunk;
    ASSERT_TRUE(reader->Read(&chunk));
    ctx.TryCancel();
    while (reader->Read(&chunk)) {
    }
    (void)reader->Finish();
  }
  bool empty = false;
  for (int i = 0; i < 200 && !empty; ++i) {
    empty = Entries(exports).empty();
    if (!empty) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(empty) << "staging directory left behind: " << Entries(exports).front();
}

// With no token configured, anyone could download the whole model. Now ExportSubnet is refused
// unless the operator passes --allow-unauthenticated-export.
TEST(ServerTrustTest, ExportNeedsATokenOrAnExplicitOptIn) {
  {
    TestServer ts;
    auto c = ts.Client();
    v1::ExportSubnetRequest req;
    req.mutable_shape()->set_depth(4);
    req.mutable_shape()->set_width(0.75);
    grpc::Status st = c.Export(req, ts.dir.file("x"));
    EXPECT_EQ(st.error_code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_NE(st.error_message().find("--allow-unauthenticated-export"), std::string::npos);
  }
  TestServer open({}, "", false, [](ServiceOptions& o) { o.allow_unauthenticated_export = true; });
  auto c = open.Client();
  v1::ExportSubnetRequest req;
  req.mutable_shape()->set_depth(4);
  req.mutable_shape()->set_width(0.75);
  EXPECT_TRUE(c.Export(req, open.dir.file("x")).ok());
}

// Exports ran on the gRPC callback thread, any number at once. The pool takes as many as it has
// workers and refuses the rest at once.
TEST(ServerTrustTest, ExportWorkersAreBounded) {
  ExportWorkers pool(1);
  std::atomic<bool> release{false}, ran_second{false};
  ASSERT_TRUE(pool.TrySubmit([&]() -> ExportWorkers::Delivery {
                    while (!release) std::this_thread::sleep_for(std::chrono::milliseconds(1));
                    return nullptr;
                  })
                  .ok());
  absl::Status busy = pool.TrySubmit([&]() -> ExportWorkers::Delivery {
    ran_second = true;
    return nullptr;
  });
  EXPECT_EQ(busy.code(), absl::StatusCode::kResourceExhausted);
  release = true;
  absl::Status later;
  for (int i = 0; i < 500; ++i) {
    later = pool.TrySubmit([&]() -> ExportWorkers::Delivery {
      ran_second = true;
      return nullptr;
    });
    if (later.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  EXPECT_TRUE(later.ok());
  for (int i = 0; i < 500 && !ran_second; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  EXPECT_TRUE(ran_second);
}

// A job's result is delivered once its worker counts as free: whoever receives it can submit the
// next job at once (delivering first made a client that read a small export quickly and asked for
// another get RESOURCE_EXHAUSTED).
TEST(ServerTrustTest, AnExportWorkerIsFreeWhenItsResultIsDelivered) {
  ExportWorkers pool(1);
  std::atomic<int> state{0};  // 1: the next submission was accepted, 2: refused
  ASSERT_TRUE(pool.TrySubmit([&]() -> ExportWorkers::Delivery {
                    return [&] {
                      const absl::Status next =
                          pool.TrySubmit([]() -> ExportWorkers::Delivery { return nullptr; });
                      state = next.ok() ? 1 : 2;
                    };
                  })
                  .ok());
  for (int i = 0; i < 1000 && state == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  EXPECT_EQ(state, 1);
}

TEST(ServerTrustTest, StagingDirectoriesAreFreshAndStaleOnesAreRemoved) {
  TempDir d;
  auto a = MakeStagingDir(d.path()), b = MakeStagingDir(d.path());
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(*a, *b);
  EXPECT_EQ((fs::status(*a).permissions() & fs::perms::others_all), fs::perms::none);
  // One left by a process that is gone (pid 2^22 + 1 is above Linux's pid_max default range
  // used here), one of a live process (ours), and an unrelated directory.
  fs::create_directories(d.file("amoeba-export-4194305-abcdef"));
  fs::create_directories(d.file("unrelated"));
  EXPECT_EQ(RemoveStaleStagingDirs(d.path()), 1);
  EXPECT_TRUE(fs::exists(*a));
  EXPECT_TRUE(fs::exists(d.file("unrelated")));
  EXPECT_FALSE(fs::exists(d.file("amoeba-export-4194305-abcdef")));
}

TEST(ServerTrustTest, Sha256AndLogSafety) {
  Sha256 h;
  h.Update("ab");
  h.Update("c");
  EXPECT_EQ(h.HexDigest(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(LogSafe("ok\n\x01x", 64), "ok\\x0a\\x01x");
  EXPECT_EQ(LogSafe(std::string(100, 'a'), 4), "aaaa...(100 bytes)");
  EXPECT_TRUE(ValidateRequestId("req-1.a_b:c").ok());
  EXPECT_TRUE(ValidateRequestId("").ok());
  EXPECT_FALSE(ValidateRequestId(std::string(129, 'a')).ok());
  EXPECT_FALSE(ValidateRequestId("a/b").ok());
  EXPECT_FALSE(ValidateRequestId(std::string("a\0b", 3)).ok());
  EXPECT_LE(BoundedMessage(std::string(10000, 'x')).size(), kMaxErrorMessageBytes + 3);
}

// A 10 KB request id made an error message over 8 KB: the client saw "received initial metadata
// size exceeds limit" and other calls on the same connection failed with it. A 4 MB id was
// logged whole by Plan. Now every RPC with an id rejects it with a short message, and concurrent
// calls on the connection are unaffected.
TEST(ServerTrustTest, LongIdsAreRejectedBrieflyAndDoNotHurtOtherCalls) {
  TestServer ts;
  auto c = ts.Client();
  std::atomic<int> info_ok{0}, id_rejected{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 25; ++i) {
        if ((i + t) % 2 == 0) {
          v1::ModelInfo info;
          if (c.GetModelInfo(&info).ok()) ++info_ok;
        } else {
          v1::PlanRequest pr;
          pr.set_request_id(std::string(10000 + i, 'x'));
          v1::PlanResponse resp;
          grpc::Status st = c.Plan(pr, &resp);
          if (st.error_code() == grpc::StatusCode::INVALID_ARGUMENT &&
              st.error_message().size() < 200)
            ++id_rejected;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(info_ok.load(), 50);
  EXPECT_EQ(id_rejected.load(), 50);
  auto r = Req("hi", 5, 1.0, 2);
  r.set_request_id(std::string((4 << 20) - 4096, 'y'));
  Streamed s = Stream(c, r);
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_LT(s.status.error_message().size(), 200u);
}

// Oversized inputs were worked on before any check: 3 MB Tokenize calls pushed RSS to 1.4 GB, a
// 3 MB prompt was tokenised before the length check. Now the byte limit comes first.
TEST(ServerTrustTest, OversizedTextIsRefusedBeforeAnyWork) {
  TestServer ts({}, "", false, [](ServiceOptions& o) { o.limits.max_prompt_bytes = 1000; });
  auto c = ts.Client();
  v1::TokenizeRequest tr;
  tr.set_text(std::string(1001, 'a'));
  v1::TokenizeResponse resp;
  grpc::Status st = c.Tokenize(tr, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("text"), std::string::npos);
  tr.set_text(std::string(1000, 'a'));
  EXPECT_TRUE(c.Tokenize(tr, &resp).ok());
  Streamed s = Stream(c, Req(std::string(1001, 'a'), 5, 1.0, 2));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.status.error_message().find("prompt.text"), std::string::npos);
}

// time_limit_ms >= 1e13 overflowed `started + milliseconds(...)`: the request ended at once with
// TIME_LIMIT and no tokens. Out-of-range values are refused; the largest allowed one works.
TEST(ServerTrustTest, HugeTimeLimitsAreRangeChecked) {
  TestServer ts;
  auto c = ts.Client();
  for (int64_t ms :
       {int64_t{10'000'000'000'000}, std::numeric_limits<int64_t>::max(), int64_t{-1}}) {
    auto r = Req("hi", 5, 1.0, 3);
    r.set_time_limit_ms(ms);
    Streamed s = Stream(c, r);
    EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << ms;
    EXPECT_NE(s.status.error_message().find("time_limit_ms"), std::string::npos);
  }
  auto r = Req("hi", 5, 1.0, 3);
  r.set_time_limit_ms(ServiceLimits{}.max_time_limit_ms);
  Streamed s = Stream(c, r);
  ASSERT_TRUE(s.status.ok());
  EXPECT_EQ(s.last.finish_reason(), v1::LENGTH);
  EXPECT_EQ(s.tokens.size(), 3u);
}

// priority: out of [-100, 100] is refused naming the field; the ends of the range work.
TEST(ServerTrustTest, PriorityIsRangeChecked) {
  TestServer ts;
  auto c = ts.Client();
  for (int32_t p : {101, -101, std::numeric_limits<int32_t>::max()}) {
    auto r = Req("hi", 5, 1.0, 2);
    r.set_priority(p);
    Streamed s = Stream(c, r);
    EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << p;
    EXPECT_NE(s.status.error_message().find("priority"), std::string::npos);
  }
  for (int32_t p : {100, -100}) {
    auto r = Req("hi", 5, 1.0, 2);
    r.set_priority(p);
    Streamed s = Stream(c, r);
    EXPECT_TRUE(s.status.ok()) << p << ": " << s.status.error_message();
  }
}

// When the last step yielded no text (a stop sequence), its token was counted in
// usage.completion_tokens but never streamed. Usage now counts what was sent.
TEST(ServerTrustTest, UsageCountsOnlyStreamedTokens) {
  TestServer ts;
  auto c = ts.Client();
  Streamed free_run = Stream(c, Req("The quick brown fox", 5, 1.0, 12));
  ASSERT_TRUE(free_run.status.ok());
  ASSERT_GE(free_run.text.size(), 4u);
  // Stop at a whole UTF-8 character from byte 2 on: the token completing it is sampled but not
  // streamed.
  auto cont = [&](size_t i) {
    return (static_cast<unsigned char>(free_run.text[i]) & 0xC0) == 0x80;
  };
  size_t b = 2;
  while (b < free_run.text.size() && cont(b)) ++b;
  size_t e = b + 1;
  while (e < free_run.text.size() && cont(e)) ++e;
  ASSERT_LT(b, free_run.text.size());
  auto r = Req("The quick brown fox", 5, 1.0, 12);
  r.add_stop(free_run.text.substr(b, e - b));
  Streamed s = Stream(c, r);
  ASSERT_TRUE(s.status.ok());
  EXPECT_EQ(s.last.finish_reason(), v1::STOP_SEQUENCE);
  EXPECT_EQ(s.last.usage().completion_tokens(), static_cast<int>(s.tokens.size()));
  EXPECT_LT(s.tokens.size(), free_run.tokens.size());
}

// An exception in the scheduler's worker was std::terminate for every stream. Now a failing lane
// ends its own requests (INTERNAL, or RESOURCE_EXHAUSTED for allocation failures) and every
// other request completes with the right tokens; the shape serves again afterwards.
TEST(ServerTrustTest, AFailingLaneEndsOnlyItsOwnRequests) {
  std::atomic<int> mode{0};  // 0 = fine, 1 = throw runtime_error, 2 = throw bad_alloc
  SchedulerOptions so;
  so.fault_hook = [&](const char* site, const Shape& s) {
    if (s.depth != 3 || std::string(site) != "step") return;
    if (mode == 1) throw std::runtime_error("injected fault");
    if (mode == 2) throw std::bad_alloc();
  };
  TestServer ts(so);
  for (int m : {1, 2}) {
    mode = m;
    std::vector<Streamed> good(3);
    Streamed bad;
    std::vector<std::thread> threads;
    for (int i = 0; i < 3; ++i)
      threads.emplace_back([&, i] {
        auto c = ts.Client();
        good[i] = Stream(c, Req(absl::StrCat("fine ", i), 5, 1.0, 12));
      });
    threads.emplace_back([&] {
      auto c = ts.Client();
      bad = Stream(c, Req("doomed", 3, 0.625, 12));
    });
    for (auto& t : threads) t.join();
    EXPECT_EQ(bad.status.error_code(),
              m == 1 ? grpc::StatusCode::INTERNAL : grpc::StatusCode::RESOURCE_EXHAUSTED)
        << bad.status.error_message();
    for (int i = 0; i < 3; ++i) {
      ASSERT_TRUE(good[i].status.ok()) << good[i].status.error_message();
      EXPECT_EQ(good[i].tokens, LocalGreedy(*ts.supernet, {5, 1.0}, absl::StrCat("fine ", i), 12));
    }
  }
  EXPECT_EQ(ts.scheduler->stats().lane_failures, 2);
  EXPECT_EQ(ts.scheduler->stats().running, 0);
  mode = 0;
  auto c = ts.Client();
  Streamed again = Stream(c, Req("doomed", 3, 0.625, 6));
  ASSERT_TRUE(again.status.ok());
  EXPECT_EQ(again.tokens, LocalGreedy(*ts.supernet, {3, 0.625}, "doomed", 6));
  std::string health;
  ASSERT_TRUE(c.Health(&health).ok());
  EXPECT_EQ(health, "SERVING");
}

// A failing merged-copy build (on the builder thread) leaves the shape serving unmerged, and
// correctly; it is not retried on every request.
TEST(ServerTrustTest, AFailingMergeLeavesTheShapeUnmerged) {
  SchedulerOptions so;
  so.merge_after_requests = 1;
  so.fault_hook = [](const char* site, const Shape&) {
    if (std::string(site) == "build") throw std::runtime_error("injected build fault");
  };
  TestServer ts(so, "", /*adapters=*/true);
  auto c = ts.Client();
  const auto want = LocalGreedy(*ts.supernet, {5, 1.0}, "merge", 6, ts.smol.get());
  Streamed first = Stream(c, Req("merge", 5, 1.0, 6));
  ASSERT_TRUE(first.status.ok());
  EXPECT_EQ(first.tokens, want);
  for (int i = 0; i < 300 && ts.scheduler->stats().build_failures == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  for (int i = 0; i < 3; ++i) {
    Streamed s = Stream(c, Req("merge", 5, 1.0, 6));
    ASSERT_TRUE(s.status.ok());
    EXPECT_EQ(s.tokens, want);
  }
  const SchedulerStats st = ts.scheduler->stats();
  EXPECT_EQ(st.build_failures, 1);
  EXPECT_EQ(st.merged_lanes, 0);
  EXPECT_EQ(st.cache_bytes, 0);  // the failed build's reservation is released
}

// The queued job used to count a cache hit on every scheduler loop. Hits and misses are now
// counted once per request.
TEST(ServerTrustTest, CacheHitsAndMissesAreCountedOncePerRequest) {
  SchedulerOptions so;
  so.slots_per_shape = 1;  // requests of one shape queue behind each other
  TestServer ts(so);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i)
    threads.emplace_back([&, i] {
      auto c = ts.Client();
      EXPECT_TRUE(Stream(c, Req(absl::StrCat("q", i), 5, 1.0, 20)).status.ok());
    });
  for (auto& t : threads) t.join();
  auto c = ts.Client();
  EXPECT_TRUE(Stream(c, Req("other", 4, 0.75, 2)).status.ok());
  const SchedulerStats st = ts.scheduler->stats();
  EXPECT_EQ(st.cache_misses, 2);
  EXPECT_EQ(st.cache_hits, 3);
  EXPECT_EQ(st.cache_bytes, 0);  // no adapters: no merged copies; KV bytes are apart
}

// Evaluated shapes used to score minus their perplexity and the rest their parameter count, so
// unevaluated shapes always won. With perplexity for only some shapes, every shape is ranked by
// parameters and the explanation says so; with it for all, by perplexity.
TEST(ServerTrustTest, PlannerRanksEveryShapeByOneQualitySource) {
  std::vector<ShapeProfile> p(3);
  for (int i = 0; i < 3; ++i) {
    p[i].shape = {3 + i, 1.0};
    p[i].params = 1000 * (i + 1);
    p[i].decode_weight_bytes = 4000 * (i + 1);
    p[i].measured_decode_ms = 1.0 * (i + 1);
  }
  p[2].heldout_perplexity = 10;  // only the largest evaluated: it must not lose to params
  PlanBudget b;
  b.max_decode_ms_per_token = 2.5;
  auto plan = PlanShape(p, b, HostSpeed{});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->chosen.profile.shape.depth, 4);
  EXPECT_EQ(plan->chosen.quality_source, "params");
  EXPECT_NE(plan->explanation.find("known for 1 of 3 shapes"), std::string::npos)
      << plan->explanation;
  p[0].heldout_perplexity = 12;
  p[1].heldout_perplexity = 20;  // worse than the smaller shape
  plan = PlanShape(p, b, HostSpeed{});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->chosen.profile.shape.depth, 3);
  EXPECT_EQ(plan->chosen.quality_source, "heldout_perplexity");
  // Measured latency is used only when every shape has it.
  p[1].measured_decode_ms.reset();
  plan = PlanShape(p, b, HostSpeed{.bandwidth_gbs = 0.004, .compute_gflops = 50});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->chosen.latency_source, "roofline");
}

// Byte estimates assumed fp32 whatever was served. They now follow the packed panels' format
// (f16, and the block formats with their scales) and the KV dtype.
TEST(ServerTrustTest, ProfilesCountTheBytesOfTheServedDtype) {
  for (WeightFormat format : {WeightFormat::kF16, WeightFormat::kQ8_0, WeightFormat::kQ4_0}) {
    TestServer ts;
    const auto f32 = ProfilesFromSupernet(*ts.supernet, 4);
    ts.supernet->PackBaseWeights(format);
    const auto packed = ProfilesFromSupernet(*ts.supernet, 2);
    ASSERT_EQ(f32.size(), packed.size());
    const double want = BytesPerWeight(format) / 4;
    for (size_t i = 0; i < f32.size(); ++i) {
      const std::string what = absl::StrCat(WeightFormatName(format), " ", f32[i].shape.ToString());
      EXPECT_EQ(packed[i].params, f32[i].params);
      EXPECT_EQ(packed[i].kv_bytes_per_token * 2, f32[i].kv_bytes_per_token);
      const double ratio = static_cast<double>(packed[i].decode_weight_bytes) /
                           static_cast<double>(f32[i].decode_weight_bytes);
      EXPECT_GT(ratio, want - 0.01) << what;  // norms stay fp32
      EXPECT_LT(ratio, want + 0.02) << what;
    }
  }
}

// Budget → file: the export planner scales every shape's bytes to f16 / q8_0 / q4_0 and picks
// the best shape that fits in some dtype, in the most precise dtype it fits in.
TEST(ServerTrustTest, ExportPlanPicksShapeAndDtypeForTheClientMemory) {
  std::vector<ShapeProfile> p(2);
  p[0].shape = {6, 1.0};
  p[0].params = 1'000'000;
  p[0].weight_bytes = 4'000'000;  // as served in fp32
  p[0].decode_weight_bytes = 3'000'000;
  p[0].heldout_perplexity = 10;
  p[0].measured_decode_ms = 0.001;  // this host's: must not be used for a client
  p[1].shape = {3, 0.5};
  p[1].params = 300'000;
  p[1].weight_bytes = 1'200'000;
  p[1].decode_weight_bytes = 900'000;
  p[1].heldout_perplexity = 20;
  PlanBudget b;
  b.max_context_tokens = 1;
  auto fit = [&](int64_t memory) {
    b.max_memory_bytes = memory;
    return PlanExport(p, b, HostSpeed{});
  };
  auto big = fit(3'000'000);  // the full shape fits in f16 (2 MB)
  ASSERT_TRUE(big.ok()) << big.status();
  EXPECT_EQ(big->chosen.profile.shape.depth, 6);
  EXPECT_EQ(big->format, WeightFormat::kF16);
  EXPECT_EQ(big->file_bytes, 2'000'000);
  EXPECT_EQ(big->chosen.latency_source, "roofline");
  auto mid = fit(1'000'000);  // the full shape fits only in q4_0 (0.56 MB; q8_0 is 1.06 MB)
  ASSERT_TRUE(mid.ok());
  EXPECT_EQ(mid->chosen.profile.shape.depth, 6);
  EXPECT_EQ(mid->format, WeightFormat::kQ4_0);
  EXPECT_NE(mid->explanation.find("q4_0"), std::string::npos) << mid->explanation;
  auto q8 = fit(1'100'000);
  ASSERT_TRUE(q8.ok());
  EXPECT_EQ(q8->format, WeightFormat::kQ8_0);
  auto small = fit(400'000);  // only the small shape, in q8_0 (318 KB)
  ASSERT_TRUE(small.ok());
  EXPECT_EQ(small->chosen.profile.shape.depth, 3);
  EXPECT_EQ(small->format, WeightFormat::kQ8_0);
  auto none = fit(100'000);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(std::string(none.status().message()).find("q4_0"), std::string::npos);
}

// The start-up profile was noise: one bare-engine run per shape, the first one cold, so a larger
// shape could look faster than a smaller one. It now runs jobs through the scheduler in rounds,
// takes medians, and fits one line through them, which orders shapes by bytes; profiling counts
// toward no statistics and starts no merged-copy build.
TEST(ServerTrustTest, ServedLatencyProfileIsOrderedAndLeavesNoTrace) {
  SchedulerOptions so;
  so.merge_after_requests = 1;
  TestServer ts(so, "", /*adapters=*/true);
  const auto profiles = ProfilesFromSupernet(*ts.supernet);
  ServedLatencyOptions lo;
  lo.bandwidth_gbs = 10;
  const auto m = ProfileServedLatency(
      *ts.scheduler, profiles, static_cast<int32_t>(ts.supernet->base().config.bos_token_id), lo);
  ASSERT_EQ(m.size(), profiles.size());
  // The fitted line is ordered by construction (its slope is at least 0; LatencyLine* test the
  // fit): what can fail here is a fit far from the measurements (a least-squares line strays
  // past them by a fraction at the ends, never 2x), or none at all.
  double hi = 0;
  for (const auto& x : m) hi = std::max(hi, x.ms_per_token);
  for (size_t i = 0; i < m.size(); ++i) {
    EXPECT_EQ(m[i].rounds.size(), 3u) << m[i].shape.ToString();
    EXPECT_GT(m[i].ms_per_token, 0);
    EXPECT_GT(m[i].predicted_ms, 0);
    EXPECT_GT(m[i].fitted_ms, 0) << m[i].shape.ToString();
    EXPECT_LE(m[i].fitted_ms, 2 * hi) << m[i].shape.ToString();
  }
  const SchedulerStats st = ts.scheduler->stats();
  EXPECT_EQ(st.cache_hits + st.cache_misses, 0);
  EXPECT_EQ(st.merges_built, 0);
  EXPECT_EQ(st.merged_lanes, 0);
}

TEST(ServerTrustTest, LatencyLineSmoothsOneNoisyShape) {
  std::vector<ShapeLatency> p(4);
  for (int i = 0; i < 4; ++i) {
    p[i].decode_weight_bytes = (i + 1) * 1000000;
    p[i].ms_per_token = 0.5 + 0.25 * (i + 1);
  }
  p[2].ms_per_token = 0.6;  // noise: looks faster than two smaller shapes
  FitLatencyLine(p);
  for (int i = 1; i < 4; ++i)
    EXPECT_GT(p[i].fitted_ms,
              p[i - 1].fitted_ms);  // Measurements that fall with size (all noise): the line is
                                    // flat at their mean, never falling.
  for (int i = 0; i < 4; ++i) p[i].ms_per_token = 2.0 - 0.25 * i;
  FitLatencyLine(p);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(p[i].fitted_ms, 1.625, 1e-9) << i;
}

}  // namespace server_trust_test
}  // namespace amoeba
