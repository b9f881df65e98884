// amoeba-server's service on a loopback port, driven through the C++ client library: streaming
// generation by shape and budget, batching equivalence, cancellation, deadlines, back-pressure,
// validation, health, reflection, metrics and export.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <gtest/gtest.h>
#include <omp.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <regex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "client/amoeba_client.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "model/engine.h"
#include "model/generation.h"
#include "model/packed_linear.h"
#include "model/presets.h"
#include "model/torch_forward.h"
#include "server/grpc_service.h"
#include "server/metrics.h"
#include "subnet/calibrate.h"
#include "tests/server_fixture.h"

namespace amoeba {
namespace server_test {  // named: a unity build joins test files
using testing::LocalGreedy;
using testing::Req;
using testing::Stream;
using testing::Streamed;
using testing::TempDir;
using testing::TestServer;

TEST(ServerTest, StreamsAnExplicitShapeAndMatchesLocalGeneration) {
  TestServer ts;
  auto c = ts.Client();
  for (Shape sh : {Shape{5, 1.0}, Shape{3, 0.625}}) {
    Streamed s = Stream(c, Req("Hello there", static_cast<int>(sh.depth), sh.width, 12));
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    EXPECT_EQ(s.last.shape().depth(), sh.depth);
    EXPECT_DOUBLE_EQ(s.last.shape().width(), sh.width);
    EXPECT_GT(s.messages, 1);  // streamed, not one blob
    EXPECT_EQ(s.last.usage().completion_tokens(), static_cast<int>(s.tokens.size()));
    EXPECT_EQ(s.tokens, LocalGreedy(*ts.supernet, sh, "Hello there", 12)) << sh.ToString();
    EXPECT_EQ(s.text, ts.supernet->tokenizer()->Decode(s.tokens));
  }
}

// Cold shapes run on supernet views with the adapters unmerged; after `merge_after_requests` a
// merged copy is built in the background and swapped in. Both give the merged model's output.
TEST(ServerTest, TunedSupernetServesColdUnmergedThenHotMerged) {
  SchedulerOptions so;
  so.merge_after_requests = 2;
  TestServer ts(so, "", /*adapters=*/true);
  auto c = ts.Client();
  for (Shape sh : {Shape{5, 1.0}, Shape{3, 0.625}}) {
    const auto want = LocalGreedy(*ts.supernet, sh, "Hello there", 10, ts.smol.get());
    for (int round = 0; round < 2; ++round) {  // round 0: cold, round 1 starts the build
      Streamed s = Stream(c, Req("Hello there", static_cast<int>(sh.depth), sh.width, 10));
      ASSERT_TRUE(s.status.ok()) << s.status.error_message();
      EXPECT_EQ(s.tokens, want) << sh.ToString() << " round " << round;
    }
  }
  // Both shapes were asked for twice: their merged copies get built and swapped in.
  for (int i = 0; i < 200 && ts.scheduler->stats().merged_lanes < 2; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    Stream(c, Req("x", 5, 1.0, 1));  // keeps the worker stepping
  }
  EXPECT_EQ(ts.scheduler->stats().merged_lanes, 2);
  EXPECT_GT(ts.scheduler->stats().cache_bytes, 0);
  for (Shape sh : {Shape{5, 1.0}, Shape{3, 0.625}}) {
    Streamed s = Stream(c, Req("Hello there", static_cast<int>(sh.depth), sh.width, 10));
    EXPECT_EQ(s.tokens, LocalGreedy(*ts.supernet, sh, "Hello there", 10, ts.smol.get()))
        << sh.ToString() << " merged";
  }
  // The adapters matter: without them the output differs.
  Streamed s = Stream(c, Req("Hello there", 5, 1.0, 10));
  EXPECT_NE(s.tokens, LocalGreedy(*ts.supernet, {5, 1.0}, "Hello there", 10));
}

// Under a cap too small for any merged copy, hot shapes keep running unmerged (and correctly);
// their deltas stay unpacked (views of the adapters), so nothing needs evicting.
TEST(ServerTest, TinyCacheCapKeepsHotShapesUnmerged) {
  SchedulerOptions so;
  so.cache_bytes = 1;
  so.merge_after_requests = 1;
  TestServer ts(so, "", /*adapters=*/true);
  auto c = ts.Client();
  for (int round = 0; round < 2; ++round) {
    for (Shape sh : {Shape{5, 1.0}, Shape{4, 0.75}, Shape{3, 0.625}}) {
      Streamed s = Stream(c, Req("evict", static_cast<int>(sh.depth), sh.width, 4));
      ASSERT_TRUE(s.status.ok()) << sh.ToString() << ": " << s.status.error_message();
      EXPECT_EQ(s.tokens, LocalGreedy(*ts.supernet, sh, "evict", 4, ts.smol.get()))
          << sh.ToString();
    }
  }
  EXPECT_EQ(ts.scheduler->stats().merged_lanes, 0);
  EXPECT_EQ(ts.scheduler->stats().cache_bytes, 0);
}

// An unmerged shape's deltas are packed as panels when they fit under the cap (counted there,
// evicted when idle for another shape's), else left unpacked; either way a lane generates what a
// local engine on the same subnet (deltas packed or not) does.
TEST(ServerTest, PackedDeltasCountUnderTheCapAndIdleOnesAreEvicted) {
  SchedulerOptions so;
  so.weights_format = WeightFormat::kQ8_0;  // the supernet decodes from panels, as in the server
  so.merge_after_requests = 0;
  const Shape a{5, 1.0}, b{3, 0.625};
  auto subnet = [](const TestServer& t, const Shape& sh, bool pack) {
    return testing::MustOk(BuildSubnet(*t.supernet, t.smol.get(), sh,
                                       {.adapters = AdapterMode::kUnmerged, .pack_deltas = pack}),
                           "build subnet");
  };
  auto local = [&](const TestServer& t, const Shape& sh, bool pack) {
    at::InferenceMode g;
    return testing::GreedyOn(std::make_shared<const Model>(subnet(t, sh, pack)),
                             *t.supernet->tokenizer(), "pack", 8);
  };
  auto served = [](TestServer& t, const Shape& sh) {
    auto c = t.Client();
    Streamed s = Stream(c, Req("pack", static_cast<int>(sh.depth), sh.width, 8));
    EXPECT_TRUE(s.status.ok()) << s.status.error_message();
    return s.tokens;
  };
  int64_t bytes_a = 0, bytes_b = 0;
  {  // No room at all: unpacked.
    so.cache_bytes = 1;
    TestServer tiny(so, "", /*adapters=*/true);
    bytes_a = PackDeltasBytes(subnet(tiny, a, false));
    bytes_b = PackDeltasBytes(subnet(tiny, b, false));
    ASSERT_GT(bytes_a, 0);
    ASSERT_GT(bytes_b, 0);
    for (const Shape& sh : {a, b}) EXPECT_EQ(served(tiny, sh), local(tiny, sh, false));
    EXPECT_EQ(tiny.scheduler->stats().cache_bytes, 0);
    EXPECT_EQ(tiny.scheduler->stats().evictions, 0);
  }
  // Room for one shape's deltas, not both.
  so.cache_bytes = std::max(bytes_a, bytes_b);
  TestServer ts(so, "", /*adapters=*/true);
  EXPECT_EQ(served(ts, a), local(ts, a, true));
  EXPECT_EQ(ts.scheduler->stats().cache_bytes, bytes_a);
  EXPECT_EQ(served(ts, b), local(ts, b, true));
  EXPECT_EQ(ts.scheduler->stats().cache_bytes, bytes_b);
  EXPECT_EQ(ts.scheduler->stats().evictions, 1);
  EXPECT_EQ(ts.scheduler->stats().lanes, 1);
}

// Waits (bounded) until `pred` holds for the scheduler's stats.
bool WaitForStats(Scheduler& s, const std::function<bool(const SchedulerStats&)>& pred) {
  for (int i = 0; i < 500; ++i) {
    if (pred(s.stats())) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return pred(s.stats());
}

// Steps over more lanes than merged_copies_up_to_lanes run the merged lanes on their supernet
// views (adapters as low-rank deltas; one stream of the shared weights) with the same output.
TEST(ServerTest, StepsOverManyLanesRunMergedShapesOnTheirViews) {
  SchedulerOptions so;
  so.merge_after_requests = 1;
  so.merged_copies_up_to_lanes = 1;
  TestServer ts(so, "", /*adapters=*/true);
  auto c = ts.Client();
  const std::vector<Shape> shapes = {{5, 1.0}, {3, 0.625}};
  std::vector<std::vector<int32_t>> want;
  for (const Shape& sh : shapes) {
    want.push_back(LocalGreedy(*ts.supernet, sh, "Hello there", 12, ts.smol.get()));
    Streamed s = Stream(c, Req("Hello there", static_cast<int>(sh.depth), sh.width, 12));
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    EXPECT_EQ(s.tokens, want.back()) << sh.ToString() << " cold";
  }
  ASSERT_TRUE(
      WaitForStats(*ts.scheduler, [](const SchedulerStats& st) { return st.merged_lanes == 2; }));
  EXPECT_EQ(ts.scheduler->stats().merged_lane_steps_on_views, 0);
  // Both shapes at once (until their steps overlap: two lanes in a step, over the limit of one).
  for (int attempt = 0; attempt < 20 && ts.scheduler->stats().merged_lane_steps_on_views == 0;
       ++attempt) {
    std::vector<Streamed> got(shapes.size());
    std::vector<std::thread> threads;
    for (size_t i = 0; i < shapes.size(); ++i)
      threads.emplace_back([&, i] {
        auto client = ts.Client();
        got[i] = Stream(client,
                        Req("Hello there", static_cast<int>(shapes[i].depth), shapes[i].width, 12));
      });
    for (auto& t : threads) t.join();
    for (size_t i = 0; i < shapes.size(); ++i) {
      ASSERT_TRUE(got[i].status.ok()) << got[i].status.error_message();
      EXPECT_EQ(got[i].tokens, want[i]) << shapes[i].ToString() << " attempt " << attempt;
    }
  }
  EXPECT_GT(ts.scheduler->stats().merged_lane_steps_on_views, 0)
      << "two merged lanes never shared a step";
  EXPECT_EQ(ts.scheduler->stats().merged_lanes, 2);
  // /metrics shows both (the gauges are published every 500 ms).
  const std::regex on_views(
      R"(amoeba_lane_events_total\{kind="merged_lane_step_on_views"\} [1-9])");
  const std::regex merged(R"(amoeba_scheduler\{kind="merged_lanes"\} 2)");
  bool seen = false;
  for (int i = 0; i < 100 && !seen; ++i) {
    const std::string text = ts.metrics.Render();
    seen = std::regex_search(text, on_views) && std::regex_search(text, merged);
    if (!seen) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(seen) << ts.metrics.Render();
}

// A queued build waits while sequences run (it would slow their steps) and starts once none does;
// with build_defer_ms 0 it starts beside them at once (as one past its wait does under steady
// load). Observed from the builder thread: the most sequences running in the build's first 50 ms.
TEST(ServerTest, AMergedCopyBuildWaitsForTheRunningSequences) {
  for (const int64_t defer_ms : {int64_t{60000}, int64_t{0}}) {
    SchedulerOptions so;
    so.merge_after_requests = 1;
    so.build_defer_ms = defer_ms;
    std::atomic<Scheduler*> scheduler{nullptr};
    std::atomic<int64_t> running_at_build{-1};
    std::atomic<int> build_nice{0}, build_threads{0};
    std::atomic<bool> build_started{false};
    so.fault_hook = [&](const char* site, const Shape&) {
      // Steps take at least 1 ms until the build starts: the 64-token request alone ran in ~6
      // ms, and on a loaded machine (CI's parallel tests) a build told not to wait could start
      // only after it had ended.
      if (std::string(site) == "step" && !build_started) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        return;
      }
      if (std::string(site) != "build" || !scheduler) return;
      build_started = true;
      build_nice = getpriority(PRIO_PROCESS, static_cast<id_t>(gettid()));
      build_threads = omp_get_max_threads();
      int64_t most = 0;
      for (int i = 0; i < 50; ++i) {
        most = std::max(most, scheduler.load()->stats().running);
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      running_at_build = most;
    };
    TestServer ts(so, "", /*adapters=*/true);
    scheduler = ts.scheduler.get();
    auto c = ts.Client();
    Streamed s = Stream(c, Req("Hello there", 5, 1.0, 64));
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    EXPECT_EQ(s.tokens, LocalGreedy(*ts.supernet, {5, 1.0}, "Hello there", 64, ts.smol.get()));
    ASSERT_TRUE(
        WaitForStats(*ts.scheduler, [](const SchedulerStats& st) { return st.merges_built == 1; }))
        << "defer " << defer_ms << " ms: the merged copy was never built";
    if (defer_ms > 0)
      EXPECT_EQ(running_at_build, 0) << "the build ran beside the request that asked for it";
    else
      EXPECT_GE(running_at_build, 1) << "the build waited although told not to";
    // Below the decode loop, on one thread.
    EXPECT_EQ(build_nice, 10);
    EXPECT_EQ(build_threads, 1);
    scheduler = nullptr;
  }
}

// A request that arrives while a merged copy builds gets the cores back: the build pauses after
// the matrix it is on until the worker has had nothing to run for build_quiet_ms (within
// build_defer_ms of the build's queueing; with 0 it never pauses).
TEST(ServerTest, AStartedBuildPausesWhileARequestThatArrivedDuringItRuns) {
  for (const int64_t defer_ms : {int64_t{60000}, int64_t{0}}) {
    SchedulerOptions so;
    so.merge_after_requests = 1;
    so.build_defer_ms = defer_ms;
    so.build_quiet_ms = 300;
    std::mutex mu;
    std::condition_variable cv;
    bool in_build = false, release = false;
    so.fault_hook = [&](const char* site, const Shape&) {
      const std::string at = site;
      if (at == "step") {
        bool slow;
        {
          std::lock_guard<std::mutex> l(mu);
          slow = in_build;
        }
        if (slow) std::this_thread::sleep_for(std::chrono::milliseconds(2));  // a long request
      } else if (at == "build_piece") {
        std::unique_lock<std::mutex> l(mu);
        if (in_build) return;
        in_build = true;  // the build is past its first matrix: hold it there
        cv.notify_all();
        cv.wait(l, [&] { return release; });
      }
    };
    TestServer ts(so, "", /*adapters=*/true);
    const auto expected = LocalGreedy(*ts.supernet, {5, 1.0}, "Hello there", 100, ts.smol.get());
    auto c = ts.Client();
    Streamed first = Stream(c, Req("Hello there", 5, 1.0, 8));  // queues the shape's build
    ASSERT_TRUE(first.status.ok()) << first.status.error_message();
    {
      std::unique_lock<std::mutex> l(mu);
      ASSERT_TRUE(cv.wait_for(l, std::chrono::seconds(60), [&] { return in_build; }))
          << "the build never started";
    }
    Streamed during;
    std::thread request([&] { during = Stream(c, Req("Hello there", 5, 1.0, 100)); });
    ASSERT_TRUE(
        WaitForStats(*ts.scheduler, [](const SchedulerStats& st) { return st.running == 1; }));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a few of its steps
    {
      std::lock_guard<std::mutex> l(mu);
      release = true;
    }
    cv.notify_all();
    request.join();
    const SchedulerStats at_end = ts.scheduler->stats();
    ASSERT_TRUE(during.status.ok()) << during.status.error_message();
    EXPECT_EQ(during.tokens, expected);
    if (defer_ms > 0) {
      EXPECT_GE(at_end.build_pauses, 1) << "the build did not pause for the request";
      EXPECT_EQ(at_end.merges_built, 0) << "the build went on beside the request";
    } else {
      EXPECT_EQ(at_end.build_pauses, 0) << "the build paused although told not to wait";
    }
    EXPECT_TRUE(
        WaitForStats(*ts.scheduler, [](const SchedulerStats& st) { return st.merges_built == 1; }))
        << "defer " << defer_ms << " ms: the merged copy was never built";
  }
}

// An idle worker keeps its activations and finished sequences' KV arenas for idle_trim_ms, so a
// client that sends its next request as the last one ends finds them (no page faults back in);
// after that it hands them back, all but idle_kv_keep_bytes of the arenas.
TEST(ServerTest, IdleMemoryIsHandedBackOnlyAfterIdleTrimMs) {
  struct Case {
    int64_t trim_ms, keep_bytes;
  };
  for (const Case cs : {Case{60000, 0}, Case{0, 0}, Case{0, int64_t{64} << 20}}) {
    const int64_t trim_ms = cs.trim_ms;
    SchedulerOptions so;
    so.idle_trim_ms = trim_ms;
    so.idle_kv_keep_bytes = cs.keep_bytes;
    TestServer ts(so);
    // Before the server's requests: the local engine's KV arena goes to the same (process-wide)
    // pool, which the server's first request then takes.
    const auto expected = LocalGreedy(*ts.supernet, {5, 1.0}, "Hello there", 8);
    auto c = ts.Client();
    for (int round = 0; round < 2; ++round) {
      Streamed s = Stream(c, Req("Hello there", 5, 1.0, 8));
      ASSERT_TRUE(s.status.ok()) << s.status.error_message();
      EXPECT_EQ(s.tokens, expected);
      ASSERT_TRUE(WaitForStats(*ts.scheduler, [](const SchedulerStats& st) {
        return st.running == 0 && st.waiting == 0;
      }));
      std::this_thread::sleep_for(std::chrono::milliseconds(300));  // several idle loop turns
      const SchedulerStats st = ts.scheduler->stats();
      if (trim_ms > 0) {
        EXPECT_EQ(st.idle_trims, 0) << "trimmed after 300 ms idle with idle_trim_ms " << trim_ms;
        EXPECT_GT(KVCache::PooledArenaBytes(), 0)
            << "the finished sequence's KV arena was not kept";
      } else {
        EXPECT_EQ(st.idle_trims, round + 1) << "round " << round;
        if (cs.keep_bytes == 0) {
          EXPECT_EQ(KVCache::PooledArenaBytes(), 0) << "round " << round;
        } else {  // the test model's arenas are far below the 64 MB kept
          EXPECT_GT(KVCache::PooledArenaBytes(), 0) << "round " << round << ": nothing kept";
          EXPECT_LE(KVCache::PooledArenaBytes(), cs.keep_bytes) << "round " << round;
        }
      }
    }
  }
}

// Merged copies beyond the cap: idle ones are evicted least-recently-used, and an evicted shape
// is rebuilt (cold again, then merged again) on its next requests with the same output.
TEST(ServerTest, MergedCopiesAreEvictedUnderTheCapAndRebuilt) {
  SchedulerOptions so;
  so.merge_after_requests = 1;
  TestServer probe(so, "", /*adapters=*/true);
  // Room for one merged full-depth copy, not two.
  const auto full = probe.supernet->Extract({5, 1.0});
  const int64_t one = full->ProjectionBytes();
  so.cache_bytes = one + one / 2;
  TestServer ts(so, "", /*adapters=*/true);
  auto c = ts.Client();
  int64_t built = 0;
  for (int round = 0; round < 2; ++round) {
    for (Shape sh : {Shape{5, 1.0}, Shape{5, 0.875}}) {
      Streamed s = Stream(c, Req("evict", static_cast<int>(sh.depth), sh.width, 4));
      ASSERT_TRUE(s.status.ok()) << sh.ToString() << ": " << s.status.error_message();
      EXPECT_EQ(s.tokens, LocalGreedy(*ts.supernet, sh, "evict", 4, ts.smol.get()))
          << sh.ToString() << " round " << round;
      // The request started a build (the lane is new: the other shape's copy was evicted).
      ++built;
      ASSERT_TRUE(WaitForStats(*ts.scheduler,
                               [&](const SchedulerStats& st) { return st.merges_built == built; }))
          << "merged copy " << built << " never built";
      // Served by the merged copy now, with the same output.
      Streamed hot = Stream(c, Req("evict", static_cast<int>(sh.depth), sh.width, 4));
      EXPECT_EQ(hot.tokens, s.tokens) << sh.ToString() << " merged";
      const SchedulerStats st = ts.scheduler->stats();
      EXPECT_EQ(st.merged_lanes, 1);
      EXPECT_LE(st.cache_bytes, so.cache_bytes);
      EXPECT_GT(st.cache_bytes, 0);
    }
  }
  // Every shape change after the first evicted the other shape's copy.
  EXPECT_EQ(ts.scheduler->stats().evictions, 3);
  EXPECT_EQ(ts.scheduler->stats().merges_built, 4);
}

// --kv-dtype f16: the server's lanes keep an fp16 KV cache and generate what a local engine with
// the same cache does.
TEST(ServerTest, HalfKvCacheServesLikeALocalHalfCache) {
  SchedulerOptions so;
  so.kv_dtype = at::kHalf;
  TestServer ts(so);
  auto c = ts.Client();
  const Shape sh{5, 1.0};
  Streamed s = Stream(c, Req("Hello there", static_cast<int>(sh.depth), sh.width, 12));
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.tokens, LocalGreedy(*ts.supernet, sh, "Hello there", 12, nullptr, at::kHalf));
}

TEST(ServerTest, BudgetPicksThePlannedShape) {
  TestServer ts;
  auto c = ts.Client();
  v1::PlanRequest pr;
  pr.mutable_budget()->set_max_params(ts.supernet->base().config.ParameterCount() * 3 / 4);
  v1::PlanResponse plan;
  ASSERT_TRUE(c.Plan(pr, &plan).ok());
  EXPECT_LE(plan.chosen().params(), pr.budget().max_params());
  EXPECT_FALSE(plan.frontier().empty());
  v1::GenerateRequest r;
  r.set_text("Hi");
  *r.mutable_budget() = pr.budget();
  r.set_max_new_tokens(4);
  Streamed s = Stream(c, r);
  ASSERT_TRUE(s.status.ok());
  EXPECT_EQ(s.last.shape().depth(), plan.chosen().shape().depth());
  EXPECT_DOUBLE_EQ(s.last.shape().width(), plan.chosen().shape().width());
  // A budget nothing fits names the smallest shape's cost.
  v1::PlanRequest tiny;
  tiny.mutable_budget()->set_max_params(10);
  grpc::Status st = c.Plan(tiny, &plan);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(st.error_message().find("smallest"), std::string::npos);
}

TEST(ServerTest, ConcurrentShapesCompleteAndBatchingMatchesUnbatched) {
  // The first step waits until every request has arrived, so the full shape's three requests
  // share steps; the widest step is recorded (the test never checked that batching happened).
  std::atomic<int64_t> widest{0};
  std::atomic<Scheduler*> scheduler{nullptr};
  std::atomic<bool> released{false};
  SchedulerOptions so;
  so.on_lane_step = [&](const Shape& s, int64_t running) {
    if (s.depth == 5) widest = std::max<int64_t>(widest, running);
  };
  so.fault_hook = [&](const char* site, const Shape&) {
    if (std::string(site) != "step" || released) return;
    for (int i = 0; i < 500 && scheduler.load(); ++i) {
      const SchedulerStats st = scheduler.load()->stats();
      if (st.running + st.waiting >= 5) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    released = true;
  };
  TestServer ts(so);
  scheduler = ts.scheduler.get();
  std::vector<std::pair<std::string, Shape>> jobs = {{"alpha", {5, 1.0}},
                                                     {"beta", {5, 1.0}},
                                                     {"gamma", {5, 1.0}},
                                                     {"delta", {4, 0.75}},
                                                     {"eps", {3, 0.625}}};
  std::vector<Streamed> results(jobs.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < jobs.size(); ++i) {
    threads.emplace_back([&, i] {
      auto c = ts.Client();
      results[i] = Stream(
          c, Req(jobs[i].first, static_cast<int>(jobs[i].second.depth), jobs[i].second.width, 16));
    });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < jobs.size(); ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].tokens, LocalGreedy(*ts.supernet, jobs[i].second, jobs[i].first, 16))
        << jobs[i].first;
  }
  EXPECT_EQ(widest, 3) << "the full shape's three requests never shared a step";
}

// Sequences that share a step draw their tokens on every thread at once (TokenStream::Choose):
// each draws what it draws alone, with two shapes in one step, prompts chunked beside the draws,
// top-k / top-p and log-probabilities.
TEST(ServerTest, SampledSequencesSharingStepsDrawWhatTheyDrawAlone) {
  const int threads = at::get_num_threads();
  at::set_num_threads(std::max(threads, 2));  // a team of two, whatever the CPU count
  {
    SchedulerOptions so;
    so.prefill_chunk = 8;
    so.weights_format = WeightFormat::kQ8_0;  // exact on every instruction set
    TestServer ts(so);
    const Supernet& s = *ts.supernet;
    const std::vector<std::string> texts = {
        "one", "a second prompt, long enough to take several chunks of eight tokens", "three",
        "four four", "and the fifth, also longer than one chunk of the prompt"};
    auto job = [&](size_t i) {
      auto j = testing::NewJob(s, i % 2 ? s.SmallestShape() : s.FullShape(), texts[i], 12);
      j->gen.stop_at_eos = false;
      j->gen.sampling = {.temperature = 0.9f,
                         .top_k = i == 1 ? 30 : 0,
                         .top_p = i == 2 ? 0.9f : 1.0f,
                         .seed = 7 + i};
      if (i == 3) j->gen.logprobs = 3;
      return j;
    };
    std::vector<std::vector<int32_t>> alone;
    for (size_t i = 0; i < texts.size(); ++i)
      alone.push_back(testing::RunOne(*ts.scheduler, job(i)).tokens);
    const int64_t before = ts.scheduler->stats().tokens_chosen_in_parallel;
    std::vector<std::shared_ptr<Job>> jobs;
    for (size_t i = 0; i < texts.size(); ++i) jobs.push_back(job(i));
    const auto together = testing::RunAll(*ts.scheduler, jobs);
    for (size_t i = 0; i < texts.size(); ++i) {
      EXPECT_EQ(together[i].tokens, alone[i]) << texts[i];
      EXPECT_EQ(together[i].tokens.size(), 12u) << texts[i];
    }
    EXPECT_GT(ts.scheduler->stats().tokens_chosen_in_parallel, before);
    EXPECT_NE(alone[0], alone[2]);
  }
  at::set_num_threads(threads);
}

TEST(ServerTest, CancelFreesTheSlotAndDeadlinesAreReported) {
  SchedulerOptions so;
  so.slots_per_shape = 1;
  TestServer ts(so);
  auto c = ts.Client();
  {
    // Cancel after the first streamed message.
    grpc::ClientContext ctx;
    auto stub = v1::Amoeba::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", ts.port),
                                                        grpc::InsecureChannelCredentials()));
    auto req = Req("cancel me", 5, 1.0, 200);
    req.mutable_sampling()->set_temperature(1.0);
    req.add_stop("\x01\x02\x03");
    auto reader = stub->Generate(&ctx, req);
    v1::GenerateResponse m;
    ASSERT_TRUE(reader->Read(&m));
    ctx.TryCancel();
    while (reader->Read(&m)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  // The only slot is free again: the next request completes.
  Streamed s = Stream(c, Req("next", 5, 1.0, 4));
  EXPECT_TRUE(s.status.ok()) << s.status.error_message();
  // time_limit_ms ends the stream with TIME_LIMIT.
  auto tl = Req("slow", 5, 1.0, 200);
  tl.set_time_limit_ms(1);
  tl.mutable_sampling()->set_temperature(1.0);
  Streamed t = Stream(c, tl);
  ASSERT_TRUE(t.status.ok());
  EXPECT_EQ(t.last.finish_reason(), v1::TIME_LIMIT);
}

// The gRPC deadline reaches the server's deadline path: a slowed-down worker (5 ms a step) runs
// past a 300 ms deadline, the server ends the sequence as TIME_LIMIT and the client sees
// DEADLINE_EXCEEDED. The server-side finish is what the metrics record.
TEST(ServerTest, ClientDeadlineEndsTheSequenceOnTheServer) {
  SchedulerOptions so;
  so.fault_hook = [](const char*, const Shape&) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  };
  TestServer ts(so);
  auto quick = ts.Client("", 0.3);
  auto dl = Req("deadline", 5, 1.0, 200);
  dl.mutable_sampling()->set_temperature(1.0);
  Streamed d = Stream(quick, dl);
  EXPECT_EQ(d.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_GT(d.tokens.size(), 0u);  // it was running on the server when the deadline passed
  const std::regex finished(R"(amoeba_requests_total\{[^}]*status="time_limit"[^}]*\} 1)");
  bool seen = false;
  for (int i = 0; i < 100 && !seen; ++i) {
    seen = std::regex_search(ts.metrics.Render(), finished);
    if (!seen) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(seen) << ts.metrics.Render();
  for (int i = 0; i < 100 && ts.scheduler->stats().running != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(ts.scheduler->stats().running, 0);
}

TEST(ServerTest, FullQueueIsResourceExhausted) {
  SchedulerOptions so;
  so.slots_per_shape = 1;
  so.max_queue = 1;
  TestServer ts(so);
  // Occupy the slot and the queue with long requests, then one more must be refused.
  std::vector<std::thread> threads;
  std::atomic<int> exhausted{0}, ok{0};
  for (int i = 0; i < 6; ++i) {
    threads.emplace_back([&, i] {
      auto c = ts.Client();
      auto r = Req(absl::StrCat("busy ", i), 5, 1.0, 60);
      r.mutable_sampling()->set_temperature(1.0);
      r.add_stop("\x01\x02");
      Streamed s = Stream(c, r);
      if (s.status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) ++exhausted;
      if (s.status.ok()) ++ok;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_GE(exhausted.load(), 1);
  EXPECT_GE(ok.load(), 1);
  EXPECT_EQ(exhausted + ok, 6);
}

TEST(ServerTest, InvalidFieldsAreInvalidArgumentAndTheServerKeepsServing) {
  TestServer ts;
  auto c = ts.Client();
  struct Case {
    const char* field;
    std::function<void(v1::GenerateRequest&)> edit;
  };
  std::vector<Case> cases = {
      {"shape.depth", [](auto& r) { r.mutable_shape()->set_depth(99); }},
      {"shape.width", [](auto& r) { r.mutable_shape()->set_width(0.3); }},
      {"prompt", [](auto& r) { r.clear_text(); }},
      {"prompt.text", [](auto& r) { r.set_text(""); }},
      {"prompt", [](auto& r) { r.set_text(std::string(500, 'x')); }},
      {"prompt.tokens", [](auto& r) { r.mutable_tokens()->add_ids(100000); }},
      {"sampling.temperature", [](auto& r) { r.mutable_sampling()->set_temperature(-0.5f); }},
      {"sampling.top_p", [](auto& r) { r.mutable_sampling()->set_top_p(0.f); }},
      {"sampling.top_p", [](auto& r) { r.mutable_sampling()->set_top_p(1.5f); }},
      {"max_new_tokens", [](auto& r) { r.set_max_new_tokens(100000); }},
      {"max_new_tokens", [](auto& r) { r.set_max_new_tokens(0); }},
      {"stop",
       [](auto& r) {
         for (int i = 0; i < 20; ++i) *r.add_stop() = std::string(1, 's');
       }},
      {"budget.max_params", [](auto& r) { r.mutable_budget()->set_max_params(-1); }},
  };
  for (const auto& k : cases) {
    auto r = Req("ok", 5, 1.0, 4);
    k.edit(r);
    Streamed s = Stream(c, r);
    EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << k.field;
    EXPECT_NE(s.status.error_message().find(k.field), std::string::npos)
        << s.status.error_message();
  }
  EXPECT_TRUE(Stream(c, Req("still fine", 5, 1.0, 3)).status.ok());
}

// The scheduler's counts are cumulative; the counters follow them without counting twice.
TEST(ServerTest, LaneCountersFollowTheSchedulersTotals) {
  Metrics m;
  m.SetLanes({.merged_lanes = 1, .evictions = 3});
  m.SetLanes({.merged_lanes = 2, .evictions = 5, .merged_lane_steps_on_views = 7});
  m.SetLanes({.merged_lanes = 2, .evictions = 5, .merged_lane_steps_on_views = 7});
  const std::string text = m.Render();
  EXPECT_NE(text.find(R"(amoeba_lane_events_total{kind="eviction"} 5)"), std::string::npos) << text;
  EXPECT_NE(text.find(R"(amoeba_lane_events_total{kind="merged_lane_step_on_views"} 7)"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find(R"(amoeba_scheduler{kind="merged_lanes"} 2)"), std::string::npos) << text;
}

TEST(ServerTest, HealthReflectionAndMetrics) {
  TestServer ts;
  auto c = ts.Client();
  std::string st;
  ASSERT_TRUE(c.Health(&st).ok());
  EXPECT_EQ(st, "SERVING");
  ts.server->GetHealthCheckService()->SetServingStatus(false);
  ASSERT_TRUE(c.Health(&st).ok());
  EXPECT_EQ(st, "NOT_SERVING");
  ts.server->GetHealthCheckService()->SetServingStatus(true);
  // Reflection lists the service.
  auto channel =
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", ts.port), grpc::InsecureChannelCredentials());
  auto refl = grpc::reflection::v1alpha::ServerReflection::NewStub(channel);
  grpc::ClientContext ctx;
  auto stream = refl->ServerReflectionInfo(&ctx);
  grpc::reflection::v1alpha::ServerReflectionRequest rq;
  rq.set_list_services("");
  ASSERT_TRUE(stream->Write(rq));
  stream->WritesDone();
  grpc::reflection::v1alpha::ServerReflectionResponse rs;
  ASSERT_TRUE(stream->Read(&rs));
  std::vector<std::string> names;
  for (const auto& s : rs.list_services_response().service()) names.push_back(s.name());
  EXPECT_NE(std::find(names.begin(), names.end(), "amoeba.v1.Amoeba"), names.end());
  EXPECT_TRUE(stream->Finish().ok());
  // Metrics after a request parse as Prometheus text format and carry the shape label.
  ASSERT_TRUE(Stream(c, Req("metrics", 4, 0.875, 3)).status.ok());
  const std::string text = ts.metrics.Render();
  // name{labels} value, the value a number, +Inf, -Inf or NaN (grouped: an ungrouped
  // alternation let a bare "NaN" line pass and a "name NaN" sample fail).
  const std::regex sample(
      R"(^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? (-?[0-9.eE+\-]+|[-+]Inf|NaN)$)");
  EXPECT_TRUE(std::regex_match("a_b{shape=\"x\"} NaN", sample));
  EXPECT_TRUE(std::regex_match("a_b -Inf", sample));
  EXPECT_FALSE(std::regex_match("NaN", sample));
  EXPECT_FALSE(std::regex_match("+Inf", sample));
  int samples = 0;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') {
      if (!line.empty()) {
        EXPECT_TRUE(line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0) << line;
      }
      continue;
    }
    EXPECT_TRUE(std::regex_match(line, sample)) << line;
    ++samples;
  }
  EXPECT_GT(samples, 10);
  EXPECT_NE(text.find("amoeba_time_to_first_token_seconds_bucket{shape=\"depth=4,width=0.875\""),
            std::string::npos);
}

TEST(ServerTest, ExportOverGrpcMatchesTheServersSubnetAndNeedsTheToken) {
  TestServer ts({}, "s3cret");
  const std::string out = ts.dir.file("downloaded");
  v1::ExportSubnetRequest req;
  req.mutable_shape()->set_depth(4);
  req.mutable_shape()->set_width(0.75);
  auto anon = ts.Client();
  EXPECT_EQ(anon.Export(req, out).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_FALSE(std::filesystem::exists(out));
  auto wrong = ts.Client("nope");
  EXPECT_EQ(wrong.Export(req, out).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  auto c = ts.Client("s3cret");
  ASSERT_TRUE(c.Export(req, out).ok());
  EXPECT_EQ(client::VerifyModelDirectory(out), "");
  auto loaded = LoadModel(out);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  auto sub = ts.supernet->Extract({4, 0.75});
  at::Tensor tok = at::randint(259, {1, 10}, at::kLong);
  at::InferenceMode g;
  EXPECT_LT(testing::MaxAbsDiff(TorchForward(*loaded, tok), TorchForward(*sub, tok)), 1e-6);
  // Generation does not need the token unless --auth-all.
  EXPECT_TRUE(Stream(anon, Req("free", 5, 1.0, 2)).status.ok());
}

// Tokenize treated an unset add_bos as false where Generate treats it as true: the same text
// now gives the same ids, BOS first, unless the client says add_bos: false.
TEST(ServerTest, TokenizeAddsBosUnlessAskedNotToAsGenerateDoes) {
  TestServer ts;
  auto c = ts.Client();
  v1::TokenizeRequest r;
  r.set_text("abc");
  v1::TokenizeResponse unset, without;
  ASSERT_TRUE(c.Tokenize(r, &unset).ok());
  r.set_add_bos(false);
  ASSERT_TRUE(c.Tokenize(r, &without).ok());
  ASSERT_EQ(unset.ids_size(), without.ids_size() + 1);
  EXPECT_EQ(unset.ids(0), ts.supernet->base().config.bos_token_id);
  EXPECT_EQ(unset.pieces_size(), unset.ids_size());
  const Streamed g = Stream(c, Req("abc", 5, 1.0, 1));
  ASSERT_TRUE(g.status.ok());
  EXPECT_EQ(g.last.usage().prompt_tokens(), unset.ids_size());
}

}  // namespace server_test
}  // namespace amoeba
