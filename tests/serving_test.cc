// The serving core on its own: this binary links amoeba_serving and no protocol library, so a
// core that needed gRPC or cpp-httplib would not link. The checks both front ends rely on (ids,
// tokenising, exports, the error boundaries) are tested here once.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <omp.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <future>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <thread>

#include "absl/strings/str_format.h"
#include "file_digest.h"
#include "model/errors.h"
#include "server/export_job.h"
#include "server/metrics.h"
#include "server/scheduler.h"
#include "server/serving.h"
#include "tests/supernet_fixture.h"

namespace amoeba {
namespace serving_test {  // named: a unity build joins test files
using testing::MakeTestSupernet;
using testing::TempDir;

struct Core {
  TempDir dir;
  std::unique_ptr<Supernet> supernet = MakeTestSupernet(dir);
  std::unique_ptr<Scheduler> scheduler;
  Metrics metrics;
  std::unique_ptr<Serving> serving;
  std::atomic<int> fault{0};  // which site throws: 0 none
  std::string fault_site;

  explicit Core(ServiceOptions o = {}) {
    SchedulerOptions so;
    so.max_context = 128;
    scheduler = std::make_unique<Scheduler>(*supernet, so);
    o.fault_hook = [this](const char* site) {
      if (fault == 0 || fault_site != site) return;
      if (fault == 1) throw std::runtime_error("injected fault");
      if (fault == 2) throw std::bad_alloc();
      (void)at::empty({int64_t{1} << 50});  // libtorch's allocator fails: a c10::Error
    };
    o.export_tmp_dir = dir.file("exports");
    std::filesystem::create_directories(o.export_tmp_dir);
    serving = std::make_unique<Serving>(*supernet, nullptr, *scheduler, &metrics, o, HostSpeed{},
                                        ProfilesFromSupernet(*supernet));
  }

  // Runs a generation to the end: its text and result.
  std::pair<std::string, JobResult> Run(const GenerationRequest& r) {
    auto g = serving->Prepare(r, {});
    EXPECT_TRUE(g.ok()) << g.status();
    if (!g.ok()) return {};
    auto text = std::make_shared<std::string>();
    std::promise<JobResult> done;
    GenerationCallbacks cb;
    cb.on_token = [text](int32_t, std::string_view t) { text->append(t); };
    cb.on_done = [&done](const JobResult& res) { done.set_value(res); };
    EXPECT_TRUE(serving->Start(*g, std::move(cb)).ok());
    const JobResult res = done.get_future().get();
    return {*text, res};
  }
};

GenerationRequest Prompt(const std::string& text, int n = 4) {
  GenerationRequest r;
  r.text = text;
  r.max_new_tokens = n;
  return r;
}

TEST(ServingTest, RequestIdsAreKeptAssignedOrRefusedInOnePlace) {
  Core c;
  EXPECT_EQ(*c.serving->AssignRequestId("client-7.a:b_c"), "client-7.a:b_c");
  const std::string a = *c.serving->AssignRequestId(""), b = *c.serving->AssignRequestId("");
  EXPECT_NE(a, b);
  EXPECT_EQ(a.rfind("req-", 0), 0u);
  EXPECT_EQ(c.serving->AssignRequestId("a/b").status().code(), absl::StatusCode::kInvalidArgument);
  GenerationRequest r = Prompt("hello");
  r.request_id = std::string(200, 'x');
  EXPECT_EQ(c.serving->Prepare(r, {}).status().code(), absl::StatusCode::kInvalidArgument);
  r.request_id = "mine";
  auto g = c.serving->Prepare(r, {});
  ASSERT_TRUE(g.ok());
  EXPECT_EQ((*g)->request_id(), "mine");
}

// Tokenize used to treat an unset add_bos as false while Generate treated it as true.
TEST(ServingTest, TokenizeAddsBosByDefaultAsGenerateDoes) {
  Core c;
  TokenizeRequest r;
  r.text = "abc";
  auto with = c.serving->Tokenize(r, {});
  ASSERT_TRUE(with.ok());
  ASSERT_EQ(with->ids.size(), 4u);
  EXPECT_EQ(with->ids[0], c.serving->info().bos_token_id);
  r.add_bos = false;
  auto without = c.serving->Tokenize(r, {});
  ASSERT_TRUE(without.ok());
  EXPECT_EQ(std::vector<int32_t>(with->ids.begin() + 1, with->ids.end()), without->ids);
  auto g = c.serving->Prepare(Prompt("abc"), {});
  ASSERT_TRUE(g.ok());
  EXPECT_EQ((*g)->prompt_tokens(), static_cast<int64_t>(with->ids.size()));
}

TEST(ServingTest, StatusFromExceptionMapsAllocationFailuresToResourceExhausted) {
  auto thrown = [](auto fn) {
    try {
      fn();
    } catch (...) {
      return StatusFromException(std::current_exception(), "work");
    }
    return absl::OkStatus();
  };
  EXPECT_EQ(thrown([] { throw std::bad_alloc(); }).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(thrown([] { (void)at::empty({int64_t{1} << 50}); }).code(),
            absl::StatusCode::kResourceExhausted);
  const absl::Status other = thrown([] { TORCH_CHECK(false, "bad shape"); });
  EXPECT_EQ(other.code(), absl::StatusCode::kInternal);
  EXPECT_NE(other.message().find("work: bad shape"), absl::string_view::npos) << other;
  EXPECT_EQ(thrown([] { throw 42; }).code(), absl::StatusCode::kInternal);
  EXPECT_EQ(StatusFromException(std::make_exception_ptr(std::runtime_error("x")), "rendezvous",
                                absl::StatusCode::kUnavailable)
                .code(),
            absl::StatusCode::kUnavailable);
}

// Every boundary of the core turns an exception into a status (never a crash), and the core
// keeps serving afterwards.
TEST(ServingTest, ExceptionsAtEveryBoundaryBecomeStatusesAndServingGoesOn) {
  ServiceOptions o;
  o.allow_unauthenticated_export = true;
  Core c(o);
  const auto [want, first] = c.Run(Prompt("boundary"));
  ASSERT_EQ(first.reason, FinishReason::kLength);
  for (int mode : {1, 2, 3}) {
    const absl::StatusCode expect =
        mode == 1 ? absl::StatusCode::kInternal : absl::StatusCode::kResourceExhausted;
    c.fault = mode;
    c.fault_site = "prepare";
    EXPECT_EQ(c.serving->Prepare(Prompt("x"), {}).status().code(), expect) << mode;
    c.fault_site = "tokenize";
    TokenizeRequest t;
    t.text = "x";
    EXPECT_EQ(c.serving->Tokenize(t, {}).status().code(), expect) << mode;
    for (const char* site : {"export", "export-stream"}) {
      c.fault_site = site;
      std::promise<absl::Status> outcome;
      ExportRequest e;
      e.format = "gguf";
      auto start = [&] {
        return c.serving->StartExport(e, {}, std::make_shared<std::atomic<bool>>(false),
                                      [&](absl::StatusOr<std::unique_ptr<ExportStream>> s) {
                                        if (!s.ok()) return outcome.set_value(s.status());
                                        ExportChunk chunk;
                                        absl::StatusOr<bool> more = true;
                                        while (more.ok() && *more) more = (*s)->Next(chunk);
                                        s->reset();  // its staging directory goes first
                                        outcome.set_value(more.status());
                                      });
      };
      // The one export worker may still be returning from the previous job.
      auto id = start();
      for (int i = 0; i < 200 && absl::IsResourceExhausted(id.status()); ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
        id = start();
      }
      ASSERT_TRUE(id.ok()) << id.status();
      EXPECT_EQ(outcome.get_future().get().code(), expect) << site << " " << mode;
    }
  }
  c.fault = 0;
  const auto [again, result] = c.Run(Prompt("boundary"));
  EXPECT_EQ(again, want);
  EXPECT_EQ(result.reason, FinishReason::kLength);
  // Failed exports leave no staging directory behind.
  EXPECT_TRUE(std::filesystem::is_empty(c.dir.file("exports")));
}

// An export is a bulk job: its worker runs only on cores the decode loop leaves idle (or at nice
// 10 where the system refuses that), with an OpenMP team of one.
TEST(ServingTest, ExportWorkersRunBelowTheDecodeLoop) {
  ExportWorkers workers(1);
  std::promise<std::array<int, 3>> seen;
  ASSERT_TRUE(workers
                  .TrySubmit([&]() -> ExportWorkers::Delivery {
                    seen.set_value({sched_getscheduler(0),
                                    getpriority(PRIO_PROCESS, static_cast<id_t>(gettid())),
                                    omp_get_max_threads()});
                    return nullptr;
                  })
                  .ok());
  const auto [policy, nice, threads] = seen.get_future().get();
  EXPECT_TRUE(policy == SCHED_IDLE || nice >= 10) << "policy " << policy << ", nice " << nice;
  EXPECT_EQ(threads, 1);
}

TEST(ServingTest, ExportsStreamTheirFilesWithDigestsAndCleanUp) {
  ServiceOptions o;
  o.allow_unauthenticated_export = true;
  Core c(o);
  ExportRequest e;
  e.shape = Shape{3, 0.625};
  std::promise<absl::StatusOr<std::unique_ptr<ExportStream>>> staged;
  ASSERT_TRUE(c.serving
                  ->StartExport(e, {}, std::make_shared<std::atomic<bool>>(false),
                                [&](auto s) { staged.set_value(std::move(s)); })
                  .ok());
  auto stream = staged.get_future().get();
  ASSERT_TRUE(stream.ok()) << stream.status();
  std::map<std::string, std::string> files, digests;
  ExportChunk chunk;
  for (;;) {
    auto more = (*stream)->Next(chunk);
    ASSERT_TRUE(more.ok());
    if (!*more) break;
    EXPECT_EQ(chunk.offset, files[chunk.path].size());
    files[chunk.path] += chunk.data;
    if (chunk.last_chunk) {
      EXPECT_EQ(files[chunk.path].size(), chunk.total_size);
      digests[chunk.path] = chunk.sha256;
    }
  }
  EXPECT_TRUE(files.count("config.json"));
  EXPECT_TRUE(files.count("model.safetensors"));
  for (const auto& [name, data] : files) {
    Sha256 h;
    h.Update(data);
    EXPECT_EQ(h.HexDigest(), digests[name]) << name;
  }
  stream->reset();
  EXPECT_TRUE(std::filesystem::is_empty(c.dir.file("exports")));
  // Checked before any work: a shape off the grid, a bad format.
  e.shape = Shape{2, 0.5};
  EXPECT_EQ(c.serving->StartExport(e, {}, std::make_shared<std::atomic<bool>>(false), [](auto) {})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  e.shape = {};
  e.format = "onnx";
  EXPECT_EQ(c.serving->StartExport(e, {}, std::make_shared<std::atomic<bool>>(false), [](auto) {})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// A tokenizer file that does not load used to be dropped: the server then said only "has no
// tokenizer". Loading now fails with the reason.
TEST(ServingTest, ABrokenTokenizerIsReportedNotDropped) {
  TempDir dir;
  auto supernet = MakeTestSupernet(dir);
  const std::string path = supernet->dir() + "/tokenizer.json";
  ASSERT_TRUE(std::filesystem::exists(path));
  std::ofstream(path) << "{ not json";
  auto loaded = Supernet::Load(supernet->dir());
  ASSERT_FALSE(loaded.ok());
  EXPECT_NE(loaded.status().message().find("tokenizer.json"), absl::string_view::npos)
      << loaded.status();
  std::filesystem::remove(path);
  loaded = Supernet::Load(supernet->dir());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ((*loaded)->tokenizer(), nullptr);
}

// The gauge of running requests came back to zero only when another step ran: a lane whose
// last sequences were cancelled left it above zero for good.
TEST(ServingTest, RunningGaugeReturnsToZeroAfterCancellation) {
  TempDir dir;
  auto supernet = MakeTestSupernet(dir);
  Metrics metrics;
  SchedulerOptions so;
  so.max_context = 128;
  so.on_lane_step = [&metrics](const Shape& s, int64_t n) { metrics.SetRunning(s.ToString(), n); };
  Scheduler scheduler(*supernet, so);
  Serving serving(*supernet, nullptr, scheduler, &metrics, {}, HostSpeed{},
                  ProfilesFromSupernet(*supernet));
  std::vector<std::shared_ptr<Generation>> gens;
  std::vector<std::promise<JobResult>> done(3);
  std::atomic<int> tokens{0};
  // The scheduler is held inside the first token's callback until every request is cancelled:
  // without it a fast machine finished the first request's 100 tokens (3 ms) before the cancel.
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  for (int i = 0; i < 3; ++i) {
    auto g = serving.Prepare(Prompt("cancel me", 100), {});
    ASSERT_TRUE(g.ok());
    GenerationCallbacks cb;
    cb.on_token = [&tokens, released](int32_t, std::string_view) {
      ++tokens;
      released.wait_for(std::chrono::seconds(30));
    };
    cb.on_done = [&done, i](const JobResult& r) { done[i].set_value(r); };
    ASSERT_TRUE(serving.Start(*g, std::move(cb)).ok());
    gens.push_back(*g);
  }
  while (tokens < 1) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  for (auto& g : gens) g->Cancel();
  release.set_value();
  for (auto& d : done) EXPECT_EQ(d.get_future().get().reason, FinishReason::kCancelled);
  const std::string gauge =
      "amoeba_running_requests{shape=\"" + supernet->FullShape().ToString() + "\"} ";
  std::string text;
  for (int i = 0; i < 200; ++i) {
    text = metrics.Render();
    if (text.find(gauge + "0") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_NE(text.find(gauge + "0"), std::string::npos) << text;
}

// Plan with a decode target names the shape a generate request with that budget gets: the best
// one within budget_headroom (80%) of the target, not the idle profile's; where no shape is, both
// refuse with the same RESOURCE_EXHAUSTED, which says what it compared.
TEST(LoadPlanningTest, PlanNamesTheShapeAGenerateRequestGets) {
  TempDir dir;
  auto supernet = MakeTestSupernet(dir);
  SchedulerOptions so;
  so.max_context = 128;
  Scheduler scheduler(*supernet, so);
  std::vector<ShapeProfile> profiles = ProfilesFromSupernet(*supernet);
  double full_ms = 0, smallest_ms = 1e9;
  for (ShapeProfile& p : profiles) {
    p.measured_decode_ms = 1e-6 * static_cast<double>(p.decode_weight_bytes);  // deterministic
    if (p.shape == supernet->FullShape()) full_ms = *p.measured_decode_ms;
    smallest_ms = std::min(smallest_ms, *p.measured_decode_ms);
  }
  Serving serving(*supernet, nullptr, scheduler, nullptr, ServiceOptions{}, HostSpeed{}, profiles);
  PlanBudget b;
  b.max_decode_ms_per_token = full_ms;
  // Idle, within the target itself, the full shape is the best.
  auto idle = PlanShape(profiles, b, HostSpeed{});
  ASSERT_TRUE(idle.ok()) << idle.status();
  EXPECT_TRUE(idle->chosen.profile.shape == supernet->FullShape());
  auto plan = serving.Plan(b, {});
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_FALSE(plan->chosen.profile.shape == supernet->FullShape());
  EXPECT_LE(plan->chosen.decode_ms, 0.8 * full_ms);
  EXPECT_NE(plan->explanation.find("within 80% of the"), std::string::npos) << plan->explanation;
  GenerationRequest r = Prompt("hello", 3);
  r.budget = b;
  auto g = serving.Prepare(r, {});
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_TRUE((*g)->shape() == plan->chosen.profile.shape)
      << (*g)->shape().ToString() << " served, " << plan->chosen.profile.shape.ToString()
      << " planned";
  // The smallest shape's own time: it fits idle, not within the margin.
  b.max_decode_ms_per_token = smallest_ms;
  r.budget = b;
  ASSERT_TRUE(PlanShape(profiles, b, HostSpeed{}).ok());
  auto refused_plan = serving.Plan(b, {});
  auto refused_generate = serving.Prepare(r, {});
  ASSERT_EQ(refused_plan.status().code(), absl::StatusCode::kResourceExhausted)
      << refused_plan.status();
  ASSERT_EQ(refused_generate.status().code(), absl::StatusCode::kResourceExhausted)
      << refused_generate.status();
  EXPECT_EQ(refused_plan.status().message(), refused_generate.status().message());
  const std::string why(refused_generate.status().message());
  EXPECT_NE(why.find("plans for 80% of a target"), std::string::npos) << why;
  EXPECT_NE(why.find(absl::StrFormat("is predicted at %.2f ms/token", smallest_ms)),
            std::string::npos)
      << why;
}

}  // namespace serving_test
}  // namespace amoeba

namespace amoeba {
namespace serving_test {

// Admission classes: with one slot, waiting requests start highest class first and in arrival
// order within a class (completion order is start order with one slot).
TEST(SchedulerPriorityTest, HigherClassesStartFirstFifoWithinAClass) {
  TempDir dir;
  auto supernet = MakeTestSupernet(dir);
  SchedulerOptions so;
  so.slots_per_shape = 1;
  so.max_context = 64;
  Scheduler scheduler(*supernet, so);
  std::mutex mu;
  std::vector<std::string> order;
  std::atomic<int> done{0};
  std::vector<std::shared_ptr<Job>> jobs;
  const std::vector<std::pair<std::string, int>> spec = {{"a", 0},  {"b", 0}, {"c", 5},
                                                         {"d", -3}, {"e", 5}, {"f", 0}};
  for (const auto& [id, priority] : spec) {
    auto j = std::make_shared<Job>();
    j->request_id = id;
    j->shape = supernet->FullShape();
    j->prompt = {1, 2, 3};
    j->gen.max_new_tokens = 3;
    j->priority = priority;
    j->on_token = [](int32_t, std::string_view) {};
    j->on_done = [&, id = id](const JobResult&) {
      std::lock_guard<std::mutex> l(mu);
      order.push_back(id);
      ++done;
    };
    jobs.push_back(j);
  }
  ASSERT_TRUE(scheduler.Submit(jobs).ok());
  for (int i = 0; i < 3000 && done < 6; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  std::lock_guard<std::mutex> l(mu);
  EXPECT_EQ(order, (std::vector<std::string>{"c", "e", "a", "b", "f", "d"}));
}

}  // namespace serving_test
}  // namespace amoeba

namespace amoeba {
namespace serving_test {

TEST(StepTimeModelTest, LearnsALinearStepTimeAndStartsFromItsPrior) {
  StepTimeModelOptions o;
  o.prior_ms = 0.7;
  StepTimeModel m(o);
  EXPECT_DOUBLE_EQ(m.Predict(0, 0), 0.7);  // nothing seen: the prior
  // Steps of varied batches from ms = 1 + 0.05 union + 0.002 rows (rows up to 16 x 130 MB).
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> u(20, 140), r(10, 2100), noise(-0.05, 0.05);
  for (int i = 0; i < 400; ++i) {
    const double um = u(rng), rm = r(rng);
    m.Observe(um, rm, 1 + 0.05 * um + 0.002 * rm + noise(rng));
  }
  m.Observe(std::nan(""), 1, 1);  // ignored
  for (auto [um, rm] : {std::pair{30.0, 100.0}, {130.0, 2000.0}, {80.0, 900.0}})
    EXPECT_NEAR(m.Predict(um, rm), 1 + 0.05 * um + 0.002 * rm, 0.02 * (1 + 0.05 * um + 0.002 * rm))
        << um << " " << rm;
  EXPECT_EQ(m.observed(), 400);
}

// When every step turns slower at once (other work on the cores), predictions follow within
// tens of steps: the least-squares fit alone, forgetting over ~200 steps, lagged for seconds.
TEST(StepTimeModelTest, FollowsASuddenSlowdownWithinTensOfSteps) {
  StepTimeModel m;
  auto time = [](double um, double rm) { return 1 + 0.05 * um + 0.002 * rm; };
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> u(20, 140), r(10, 2100);
  for (int i = 0; i < 2000; ++i) {
    const double um = u(rng), rm = r(rng);
    m.Observe(um, rm, time(um, rm));
  }
  EXPECT_NEAR(m.correction(), 1.0, 0.01);
  EXPECT_NEAR(m.Predict(116, 1862), time(116, 1862), 0.02 * time(116, 1862));
  // Now the same batches take 1.5x as long.
  for (int i = 0; i < 30; ++i) {
    const double um = u(rng), rm = r(rng);
    m.Observe(um, rm, 1.5 * time(um, rm));
  }
  EXPECT_NEAR(m.Predict(116, 1862), 1.5 * time(116, 1862), 0.1 * time(116, 1862));
  // It is the correction that follows: the fit alone still predicts under 1.4x.
  EXPECT_LT(m.Predict(116, 1862) / m.correction(), 1.4 * time(116, 1862));
  // And back: the correction does not overshoot once steps are as fitted again.
  for (int i = 0; i < 400; ++i) {
    const double um = u(rng), rm = r(rng);
    m.Observe(um, rm, time(um, rm));
  }
  EXPECT_NEAR(m.Predict(116, 1862), time(116, 1862), 0.05 * time(116, 1862));
}

// Budget requests under load: with every step slowed to 6 ms by the test hook, a decode target of
// 2 ms that the idle profile accepts cannot be kept while sequences run, so it is refused at once
// (RESOURCE_EXHAUSTED naming the budget); once the server is idle again it is served.
TEST(LoadPlanningTest, ABudgetNothingCanKeepUnderLoadIsRefusedAtOnce) {
  TempDir dir;
  auto supernet = MakeTestSupernet(dir);
  SchedulerOptions so;
  so.max_context = 128;
  so.fault_hook = [](const char* site, const Shape&) {
    if (std::string_view(site) == "step") std::this_thread::sleep_for(std::chrono::milliseconds(6));
  };
  Scheduler scheduler(*supernet, so);
  Serving serving(*supernet, nullptr, scheduler, nullptr, ServiceOptions{}, HostSpeed{},
                  ProfilesFromSupernet(*supernet));
  GenerationRequest budget = Prompt("hello", 3);
  budget.budget = PlanBudget{};
  budget.budget->max_decode_ms_per_token = 2.0;
  {  // idle: planned from the profile, served
    auto g = serving.Prepare(budget, {});
    ASSERT_TRUE(g.ok()) << g.status();
    ASSERT_TRUE((*g)->load_plan().has_value());
    EXPECT_FALSE((*g)->load_plan()->load_changed_choice);
    EXPECT_EQ((*g)->load_plan()->sequences_in_flight, 0);
  }
  // Load: four long requests on the full shape.
  std::atomic<int> done{0};
  std::vector<std::shared_ptr<Generation>> running;
  for (int i = 0; i < 4; ++i) {
    auto g = serving.Prepare(Prompt("load " + std::to_string(i), 60), {});
    ASSERT_TRUE(g.ok());
    GenerationCallbacks cb;
    cb.on_token = [](int32_t, std::string_view) {};
    cb.on_done = [&done](const JobResult&) { ++done; };
    ASSERT_TRUE(serving.Start(*g, std::move(cb)).ok());
    running.push_back(std::move(*g));
  }
  // The step-time model sees the slow steps; then the budget cannot be kept.
  absl::Status refused = absl::OkStatus();
  for (int i = 0; i < 200 && refused.ok() && done < 4; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    auto g = serving.Prepare(budget, {});
    if (!g.ok()) refused = g.status();
  }
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_NE(refused.message().find("budget.max_decode_ms_per_token"), std::string_view::npos)
      << refused;
  for (auto& g : running) g->Cancel();
  for (int i = 0; i < 500 && scheduler.stats().running > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the load snapshot catches up
  auto again = serving.Prepare(budget, {});
  EXPECT_TRUE(again.ok()) << again.status();
}

}  // namespace serving_test
}  // namespace amoeba
