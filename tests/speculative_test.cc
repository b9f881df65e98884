// Speculative decoding in the scheduler: a smaller shape of the supernet drafts, the request's
// shape checks the drafted tokens in one pass. Greedy output must be the tokens of decoding token
// by token, whatever the draft, the number of drafted tokens, the batch around the sequence, or
// where EOS, the token limit or a cancellation falls.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>

#include "model/kernels.h"
#include "tests/server_fixture.h"

namespace amoeba {
namespace speculative_test {  // named: a unity build joins test files
using testing::BatchInvariantKernels;
using testing::NewJob;
using testing::Outcome;
using testing::RunAll;
using testing::RunOne;
using testing::TestServer;

TEST(SpeculativeTest, GreedyOutputIsTokenByTokenDecodingForEveryDraftAndLength) {
  BatchInvariantKernels invariant;
  SchedulerOptions so;
  so.merge_after_requests = 0;  // the adapters stay low-rank deltas (a merged copy rounds apart)
  TestServer ts(so, "", /*adapters=*/true);
  const Supernet& s = *ts.supernet;
  const Shape target = s.FullShape(), small = s.SmallestShape();
  const Shape middle{s.spec().depths.back(), s.spec().widths[s.spec().widths.size() / 2]};
  const std::string text = "speculate on this";
  for (int n : {1, 2, 9, 23}) {
    const Outcome plain = RunOne(*ts.scheduler, NewJob(s, target, text, n));
    ASSERT_EQ(plain.tokens.size(), static_cast<size_t>(n));
    for (const Shape& draft : {small, middle})
      for (int64_t k : {1, 3, 7}) {
        const Outcome spec = RunOne(*ts.scheduler, NewJob(s, target, text, n, draft, k));
        const std::string what = absl::StrCat("n=", n, " draft ", draft.ToString(), " k=", k);
        EXPECT_EQ(spec.tokens, plain.tokens) << what;
        EXPECT_EQ(spec.result.reason, plain.result.reason) << what;
        EXPECT_EQ(spec.result.completion_tokens, n) << what;
        ASSERT_TRUE(spec.result.draft.has_value()) << what;
        EXPECT_EQ(*spec.result.draft, draft);
        EXPECT_LE(spec.result.accepted_tokens, spec.result.drafted_tokens) << what;
        // A check yields its kept tokens plus one; the first token comes from the prefill, and
        // the last one alone is decoded token by token (nothing left to draft for).
        EXPECT_LE(spec.result.draft_rounds + spec.result.accepted_tokens, n - 1) << what;
        if (n >= 3) {
          EXPECT_GT(spec.result.draft_rounds, 0) << what;
        }
      }
  }
}

// Several sequences in one lane, speculating with different drafts and k or not at all, with
// different prompt lengths (prefill chunks next to checks): each is what it is alone.
TEST(SpeculativeTest, SequencesSharingStepsEachMatchTheirOwnDecoding) {
  BatchInvariantKernels invariant;
  SchedulerOptions so;
  so.prefill_chunk = 8;  // long prompts take several steps, next to other sequences' checks
  so.weights_format = WeightFormat::kQ8_0;  // exact on every instruction set
  so.max_speculating_batch = 8;             // every step checks drafts
  TestServer ts(so);
  const Supernet& s = *ts.supernet;
  const Shape target = s.FullShape(), small = s.SmallestShape();
  const Shape narrow{s.spec().depths.back(), s.spec().widths.back()};
  const std::vector<std::string> texts = {"a", "a somewhat longer prompt than the first one",
                                          "third", "and a fourth prompt, longer again, to chunk"};
  std::vector<std::vector<int32_t>> alone;
  for (const auto& t : texts)
    alone.push_back(RunOne(*ts.scheduler, NewJob(s, target, t, 17)).tokens);
  std::vector<std::shared_ptr<Job>> jobs = {
      NewJob(s, target, texts[0], 17, small, 4), NewJob(s, target, texts[1], 17, narrow, 2),
      NewJob(s, target, texts[2], 17), NewJob(s, target, texts[3], 17, small, 6)};
  const auto out = RunAll(*ts.scheduler, jobs);
  for (size_t i = 0; i < jobs.size(); ++i) EXPECT_EQ(out[i].tokens, alone[i]) << texts[i];
  EXPECT_GT(out[0].result.draft_rounds, 0);
  EXPECT_FALSE(out[2].result.draft.has_value());
}

// Drafts of several lanes run together: each round of drafting is one pass for every draft with
// rows in it (the supernet's panels read once), and each sequence's output stays its own
// token-by-token decoding.
TEST(SpeculativeTest, DraftsOfDifferentLanesRunInOnePass) {
  BatchInvariantKernels invariant;
  SchedulerOptions so;
  so.weights_format = WeightFormat::kQ8_0;  // exact on every instruction set
  so.max_speculating_batch = 8;
  // The three jobs must run at once: their first step waits until all three are in the scheduler
  // (submitted one by one, the first could finish its 15 tokens before the others arrived on a
  // loaded machine, and then no draft pass was shared).
  std::mutex mu;
  std::condition_variable cv;
  bool hold = false;
  so.fault_hook = [&](const char* site, const Shape&) {
    if (std::string(site) != "step") return;
    std::unique_lock<std::mutex> l(mu);
    cv.wait(l, [&] { return !hold; });
  };
  TestServer ts(so);
  const Supernet& s = *ts.supernet;
  const Shape full = s.FullShape(), small = s.SmallestShape();
  const Shape narrow{s.spec().depths.back(), s.spec().widths.back()};
  const Shape shallow{s.spec().depths.front(), s.spec().widths.front()};
  const std::vector<std::string> texts = {"one lane", "another lane, another draft", "third"};
  const std::vector<Shape> targets = {full, narrow, full};
  std::vector<std::vector<int32_t>> alone;
  for (size_t i = 0; i < texts.size(); ++i)
    alone.push_back(RunOne(*ts.scheduler, NewJob(s, targets[i], texts[i], 15)).tokens);
  const int64_t before = ts.scheduler->stats().shared_draft_passes;
  std::vector<std::shared_ptr<Job>> jobs = {NewJob(s, full, texts[0], 15, small, 3),
                                            NewJob(s, narrow, texts[1], 15, shallow, 4),
                                            NewJob(s, full, texts[2], 15, shallow, 2)};
  {
    std::lock_guard<std::mutex> l(mu);
    hold = true;
  }
  std::thread release([&] {
    for (int i = 0; i < 1000; ++i) {  // bounded: 10 s
      const SchedulerStats st = ts.scheduler->stats();
      if (st.running + st.waiting == static_cast<int64_t>(jobs.size())) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    {
      std::lock_guard<std::mutex> l(mu);
      hold = false;
    }
    cv.notify_all();
  });
  const auto out = RunAll(*ts.scheduler, jobs);
  release.join();
  for (size_t i = 0; i < jobs.size(); ++i) {
    EXPECT_EQ(out[i].tokens, alone[i]) << texts[i];
    EXPECT_GT(out[i].result.draft_rounds, 0) << texts[i];
  }
  EXPECT_GT(ts.scheduler->stats().shared_draft_passes, before);
}

// EOS inside a drafted run ends the output exactly where token-by-token decoding ends it; a
// cancellation between the tokens of one check sends no more tokens.
TEST(SpeculativeTest, EosAndCancellationInsideACheck) {
  BatchInvariantKernels invariant;
  const std::string text = "stop somewhere";
  int32_t eos = -1;
  {
    TestServer first;  // what the model says without an EOS token
    const Outcome plain =
        RunOne(*first.scheduler, NewJob(*first.supernet, first.supernet->FullShape(), text, 20));
    ASSERT_EQ(plain.tokens.size(), 20u);
    // A token first said at position >= 4 becomes EOS.
    for (size_t i = 4; i < plain.tokens.size() && eos < 0; ++i)
      if (std::find(plain.tokens.begin(), plain.tokens.begin() + i, plain.tokens[i]) ==
          plain.tokens.begin() + i)
        eos = plain.tokens[i];
    if (eos < 0) GTEST_SKIP() << "the toy model repeats itself from the start";
  }
  // The same supernet (seeded), with that token EOS in its config.json.
  TestServer ts({}, "", false, nullptr, [eos](ModelConfig& c) { c.eos_token_ids = {eos}; });
  const Supernet& s = *ts.supernet;
  const Shape target = s.FullShape(), small = s.SmallestShape();
  const Outcome plain = RunOne(*ts.scheduler, NewJob(s, target, text, 20));
  EXPECT_EQ(plain.result.reason, FinishReason::kEos);
  EXPECT_GE(plain.tokens.size(), 4u);
  EXPECT_LT(plain.tokens.size(), 20u);
  for (int64_t k : {2, 5, 7}) {
    const Outcome b = RunOne(*ts.scheduler, NewJob(s, target, text, 20, small, k));
    EXPECT_EQ(b.tokens, plain.tokens) << "k=" << k;
    EXPECT_EQ(b.result.reason, FinishReason::kEos) << "k=" << k;
    EXPECT_EQ(b.result.completion_tokens, plain.result.completion_tokens) << "k=" << k;
  }
  // Cancel after the third token: no fourth.
  auto job = NewJob(s, target, text, 20, small, 7);
  std::vector<int32_t> got;
  std::promise<JobResult> done;
  Job* raw = job.get();
  job->on_token = [&](int32_t t, std::string_view) {
    if (t >= 0) got.push_back(t);
    if (got.size() == 3) raw->cancelled = true;
  };
  job->on_done = [&](const JobResult& r) { done.set_value(r); };
  ASSERT_TRUE(ts.scheduler->Submit(job).ok());
  const JobResult r = done.get_future().get();
  EXPECT_EQ(r.reason, FinishReason::kCancelled);
  EXPECT_EQ(got.size(), 3u);
  EXPECT_EQ(r.completion_tokens, 3);
  EXPECT_EQ(std::vector<int32_t>(plain.tokens.begin(), plain.tokens.begin() + 3), got);
}

// The protocol: speculate and draft_tokens on GenerateRequest, the draft's report on the last
// message, INVALID_ARGUMENT naming the field for bad values, auto from the profile's runs, and
// the metrics.
TEST(SpeculativeTest, GrpcRequestsChooseReportAndValidateTheDraft) {
  BatchInvariantKernels invariant;
  TestServer ts;
  auto c = ts.Client();
  const Supernet& s = *ts.supernet;
  const Shape full = s.FullShape(), small = s.SmallestShape();
  auto req = [&](const std::string& speculate, int draft_tokens) {
    v1::GenerateRequest r = testing::Req("over the wire", static_cast<int>(full.depth), 1.0, 12);
    if (!speculate.empty()) r.set_speculate(speculate);
    if (draft_tokens > 0) r.set_draft_tokens(draft_tokens);
    return r;
  };
  const testing::Streamed off = testing::Stream(c, req("off", 0));
  ASSERT_TRUE(off.status.ok()) << off.status.error_message();
  EXPECT_FALSE(off.last.has_speculation());
  const testing::Streamed on = testing::Stream(c, req(small.ToString(), 3));
  ASSERT_TRUE(on.status.ok()) << on.status.error_message();
  EXPECT_EQ(on.tokens, off.tokens);
  ASSERT_TRUE(on.last.has_speculation());
  const v1::Speculation& sp = on.last.speculation();
  EXPECT_EQ(sp.draft().depth(), small.depth);
  EXPECT_DOUBLE_EQ(sp.draft().width(), small.width);
  EXPECT_EQ(sp.draft_tokens(), 3);
  EXPECT_GT(sp.checks(), 0);
  EXPECT_LE(sp.accepted_tokens(), sp.drafted_tokens());
  EXPECT_LE(sp.drafted_tokens(), 3 * sp.checks());
  // No runs in the profile: auto does not draft.
  EXPECT_FALSE(testing::Stream(c, req("auto", 0)).last.has_speculation());
  // Runs that promise most guesses kept: auto drafts, with the profile's best draft.
  SupernetSpec spec = s.spec();
  if (!spec.FindRecord(full)) {  // one record per shape, as amoeba.json requires
    ShapeRecord rec;
    rec.shape = full;
    spec.profile.push_back(rec);
  }
  spec.FindRecord(full)->draft_runs[small.ToString()] = {0.05, 0.05, 0.05, 0.05, 0.05,
                                                         0.05, 0.05, 0.05, 0.6};
  ts.supernet->set_spec(spec);
  const testing::Streamed automatic = testing::Stream(c, req("auto", 0));
  ASSERT_TRUE(automatic.status.ok());
  ASSERT_TRUE(automatic.last.has_speculation());
  EXPECT_EQ(automatic.last.speculation().draft().depth(), small.depth);
  EXPECT_EQ(automatic.tokens, off.tokens);
  EXPECT_TRUE(testing::Stream(c, req("", 0)).last.has_speculation()) << "the default is auto";
  // Bad values name the field.
  for (const auto& [speculate, k] : std::vector<std::pair<std::string, int>>{
           {"bogus", 0}, {"depth=99", 0}, {full.ToString(), 0}, {small.ToString(), 9}}) {
    const testing::Streamed bad = testing::Stream(c, req(speculate, k));
    EXPECT_EQ(bad.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << speculate << k;
    EXPECT_NE(bad.status.error_message().find(k == 9 ? "draft_tokens" : "speculate"),
              std::string::npos)
        << bad.status.error_message();
  }
  const std::string m = ts.metrics.Render();
  EXPECT_NE(
      m.find("amoeba_draft_tokens_total{draft=\"" + small.ToString() + "\",kind=\"accepted\""),
      std::string::npos)
      << m;
  EXPECT_NE(m.find("amoeba_draft_accepted_tokens_bucket"), std::string::npos);
}

// Drafts reading their own q4_0 copy (SchedulerOptions::draft_format): the copy is built in the
// background and counted under the cache cap, the draft moves onto it, and the greedy output stays
// the target's, before and after the move.
TEST(SpeculativeTest, ADraftOnItsOwnQuantizedCopyKeepsTheOutput) {
  BatchInvariantKernels invariant;
  SchedulerOptions so;
  so.merge_after_requests = 0;  // the target keeps its low-rank deltas: only the draft copies
  so.draft_format = WeightFormat::kQ4_0;
  TestServer ts(so, "", /*adapters=*/true);
  const Supernet& s = *ts.supernet;
  const Shape target = s.FullShape(), small = s.SmallestShape();
  const std::string text = "draft from a copy";
  const Outcome plain = RunOne(*ts.scheduler, NewJob(s, target, text, 21));
  EXPECT_EQ(ts.scheduler->stats().draft_copies, 0);
  EXPECT_EQ(RunOne(*ts.scheduler, NewJob(s, target, text, 21, small, 3)).tokens, plain.tokens);
  for (int i = 0; i < 500 && ts.scheduler->stats().draft_copies == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  const SchedulerStats st = ts.scheduler->stats();
  ASSERT_EQ(st.draft_copies, 1);
  EXPECT_GT(st.cache_bytes, 0);
  EXPECT_EQ(st.merged_lanes, 0);
  for (int64_t k : {1, 4}) {
    const Outcome spec = RunOne(*ts.scheduler, NewJob(s, target, text, 21, small, k));
    EXPECT_EQ(spec.tokens, plain.tokens) << "k=" << k;
    EXPECT_GT(spec.result.draft_rounds, 0);
  }
  EXPECT_EQ(ts.scheduler->stats().draft_copies, 1) << "one copy per draft shape";
}

// auto with drafts in another format prices them by the profile's timing for that format
// (eval --draft-weights-dtype), else by bytes per weight.
TEST(SpeculativeTest, AutoPricesDraftsInTheirOwnFormat) {
  const auto choose = [](const std::string& draft_dtype, std::optional<double> q4_ratio) {
    TestServer ts({}, "", false, [&](ServiceOptions& o) {
      if (!draft_dtype.empty()) o.draft_format = *ParseWeightFormat(draft_dtype);
      o.speculate_min_speedup = 1.3;
    });
    const Shape full = ts.supernet->FullShape(), small = ts.supernet->SmallestShape();
    SupernetSpec spec = ts.supernet->spec();
    for (const Shape& sh : {full, small}) {
      if (!spec.FindRecord(sh)) {
        ShapeRecord rec;
        rec.shape = sh;
        spec.profile.push_back(rec);
      }
      spec.FindRecord(sh)->decode_ms_per_token = 1.0;
      if (q4_ratio && sh == small) spec.FindRecord(sh)->decode_ms_by_dtype["q4_0"] = *q4_ratio;
    }
    // Half of the first guesses kept, never two in a row.
    spec.FindRecord(full)->draft_runs[small.ToString()] = {0.5, 0.5, 0, 0, 0, 0, 0, 0, 0};
    ts.supernet->set_spec(spec);
    auto d = ts.serving->ResolveDraft(full, "auto", std::nullopt);
    EXPECT_TRUE(d.ok());
    return d.ok() && d->has_value();
  };
  EXPECT_FALSE(choose("", std::nullopt)) << "an f32 draft costs too much for 1.3x";
  EXPECT_TRUE(choose("q4_0", std::nullopt)) << "q4_0 reads ~1/7 of the bytes";
  EXPECT_TRUE(choose("q4_0", 0.05));
  EXPECT_FALSE(choose("q4_0", 1.0)) << "the profile's timing wins over the bytes estimate";
}

// The draft shape's own lane fails (its step throws) and is dropped while another lane keeps a
// draft of that shape: the next speculating request gets a fresh lane for it, not a crash.
TEST(SpeculativeTest, ADraftShapesFailedLaneIsMadeAgain) {
  BatchInvariantKernels invariant;
  std::atomic<bool> fail_small{false};
  SchedulerOptions so;
  Shape small_shape;
  so.fault_hook = [&](const char* site, const Shape& s) {
    if (fail_small && std::string(site) == "step" && s == small_shape)
      throw std::runtime_error("injected");
  };
  TestServer ts(so);
  const Supernet& s = *ts.supernet;
  const Shape target = s.FullShape(), small = s.SmallestShape();
  small_shape = small;
  const std::string text = "fail the draft";
  const Outcome plain = RunOne(*ts.scheduler, NewJob(s, target, text, 12));
  EXPECT_EQ(RunOne(*ts.scheduler, NewJob(s, target, text, 12, small, 3)).tokens, plain.tokens);
  fail_small = true;
  const Outcome failed = RunOne(*ts.scheduler, NewJob(s, small, text, 12));
  EXPECT_EQ(failed.result.reason, FinishReason::kError);
  fail_small = false;
  EXPECT_EQ(RunOne(*ts.scheduler, NewJob(s, target, text, 12, small, 3)).tokens, plain.tokens);
  EXPECT_GE(ts.scheduler->stats().lane_failures, 1);
}

// A draft that failed (its model threw) used to fail every sequence of the target's lane as
// INTERNAL. A draft only proposes: its sequences now go on token by token, with the target's
// output, and the lane keeps serving.
TEST(SpeculativeTest, AFailingDraftLeavesItsTargetDecodingTokenByToken) {
  BatchInvariantKernels invariant;
  std::atomic<int> draft_faults{0};
  SchedulerOptions so;
  so.fault_hook = [&](const char* site, const Shape&) {
    if (std::string(site) == "draft") {
      ++draft_faults;
      throw std::runtime_error("injected draft fault");
    }
  };
  TestServer ts(so);
  const Supernet& s = *ts.supernet;
  const Shape target = s.FullShape(), small = s.SmallestShape();
  const Outcome plain = RunOne(*ts.scheduler, NewJob(s, target, "draft fails", 12));
  const auto outs = RunAll(*ts.scheduler, {NewJob(s, target, "draft fails", 12, small, 4),
                                           NewJob(s, target, "draft fails", 12, small, 3)});
  EXPECT_GT(draft_faults, 0);
  for (const Outcome& o : outs) {
    EXPECT_EQ(o.result.reason, FinishReason::kLength) << o.result.error;
    EXPECT_EQ(o.tokens, plain.tokens);
  }
  EXPECT_EQ(ts.scheduler->stats().lane_failures, 0);
  EXPECT_EQ(RunOne(*ts.scheduler, NewJob(s, target, "draft fails", 12)).tokens, plain.tokens);
}

}  // namespace speculative_test
}  // namespace amoeba
