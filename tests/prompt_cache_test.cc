// The scheduler's prompt cache: a request that starts like an earlier one (a later turn of a chat,
// a shared system prompt) restores the cached prefix and prefills only the rest, and its output is
// what it is without the cache, whatever the shape, weight format, drafts, cancellations, failures
// or evictions around it.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <filesystem>

#include "tests/server_fixture.h"

namespace amoeba {
namespace prompt_cache_test {  // named: a unity build joins test files
using testing::BatchInvariantKernels;
using testing::NewJob;
using testing::Outcome;
using testing::RunAll;
using testing::RunOne;
using testing::TestServer;

// Another scheduler on `ts`'s supernet with `ts`'s options (adapters, context).
std::unique_ptr<Scheduler> Another(const TestServer& ts, SchedulerOptions so) {
  so.smol = ts.smol.get();
  so.max_context = 128;  // as TestServer's
  return std::make_unique<Scheduler>(*ts.supernet, so);
}

// The same without a prompt cache: the reference.
std::unique_ptr<Scheduler> Uncached(const TestServer& ts, SchedulerOptions so) {
  so.prompt_cache_bytes = 0;
  return Another(ts, so);
}

std::shared_ptr<Job> TokenJob(const Shape& shape, std::vector<int32_t> prompt, int n,
                              std::optional<Shape> draft = std::nullopt, int64_t k = 0) {
  auto job = std::make_shared<Job>();
  job->request_id = "cache-test";
  job->shape = shape;
  job->prompt = std::move(prompt);
  job->gen.max_new_tokens = n;
  job->draft = draft;
  job->draft_tokens = k;
  return job;
}

std::vector<int32_t> Concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Token ids that are neither BOS nor EOS.
std::vector<int32_t> Ids(int64_t n, int32_t first, const ModelConfig& c) {
  std::vector<int32_t> ids;
  for (int64_t i = 0; i < n; ++i) {
    int32_t t = static_cast<int32_t>((first + i * 7) % c.vocab_size);
    auto special = [&](int32_t x) {
      return x == c.bos_token_id ||
             std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), x) != c.eos_token_ids.end();
    };
    while (special(t)) t = static_cast<int32_t>((t + 1) % c.vocab_size);
    ids.push_back(t);
  }
  return ids;
}

// Three turns of a conversation on several shapes, with and without a draft, in f32 and q8_0:
// every turn's tokens equal the uncached scheduler's, and turns 2 and 3 restore all of the
// conversation the cache holds (the previous prompt and reply, in whole blocks) and prefill only
// the rest.
TEST(PromptCacheTest, LaterTurnsPrefillOnlyTheirNewTokensAndOutputsDoNotChange) {
  BatchInvariantKernels invariant;
  for (WeightFormat f : {WeightFormat::kF32, WeightFormat::kQ8_0}) {
    SchedulerOptions so;
    so.weights_format = f;
    so.merge_after_requests = 0;  // adapters stay deltas (a merged copy is another cache key)
    so.prompt_cache_block = 8;
    so.prefill_chunk = 16;
    TestServer ts(so, "", /*adapters=*/true);
    auto off = Uncached(ts, so);
    const Supernet& s = *ts.supernet;
    const Shape middle{s.spec().depths.back(), s.spec().widths[s.spec().widths.size() / 2]};
    struct Case {
      Shape shape;
      std::optional<Shape> draft;
    };
    for (const Case& c : {Case{s.FullShape(), {}}, Case{s.SmallestShape(), {}}, Case{middle, {}},
                          Case{s.FullShape(), s.SmallestShape()}}) {
      const std::string what =
          absl::StrCat(WeightFormatName(f), " ", c.shape.ToString(), c.draft ? " drafted" : "");
      const int64_t k = c.draft ? 3 : 0;
      auto first = NewJob(s, c.shape, "a conversation starts here", 12, c.draft, k);
      std::vector<int32_t> prompt = first->prompt;
      // A different first turn per case: each case starts cold.
      prompt.insert(prompt.begin() + 1,
                    Ids(1, static_cast<int32_t>(7 + c.shape.depth * 3 + (c.draft ? 1 : 0)),
                        s.base().config)[0]);
      int64_t held = 0;  // positions the cache holds from the last turn
      for (int turn = 1; turn <= 3; ++turn) {
        const SchedulerStats before = ts.scheduler->stats();
        // Replies run to their length (a random model may sample EOS on some CPUs' rounding).
        auto turn_job = [&] {
          auto job = TokenJob(c.shape, prompt, 12, c.draft, k);
          job->gen.stop_at_eos = false;
          return job;
        };
        const Outcome cached = RunOne(*ts.scheduler, turn_job());
        const Outcome plain = RunOne(*off, turn_job());
        const SchedulerStats after = ts.scheduler->stats();
        const std::string at = absl::StrCat(what, " turn ", turn);
        ASSERT_EQ(cached.result.reason, plain.result.reason) << at;
        EXPECT_EQ(cached.tokens, plain.tokens) << at;
        EXPECT_EQ(plain.result.cached_tokens, 0) << at;
        const int64_t p = static_cast<int64_t>(prompt.size());
        if (turn == 1) {
          EXPECT_LT(cached.result.cached_tokens, 8) << at;  // BOS, from the cases before
        } else {
          EXPECT_EQ(cached.result.cached_tokens, held / 8 * 8) << at;
        }
        EXPECT_EQ(after.prompt_tokens_prefilled - before.prompt_tokens_prefilled,
                  p - cached.result.cached_tokens)
            << at;
        // The next turn: this prompt, the reply, and five new tokens. The cache holds the prompt
        // and the reply but its last token (sampled, never fed), when the reply ran to its length.
        ASSERT_EQ(cached.result.reason, FinishReason::kLength) << at;
        held = p + static_cast<int64_t>(cached.tokens.size()) - 1;
        prompt = Concat(Concat(prompt, cached.tokens), Ids(5, 11 * turn, s.base().config));
      }
    }
    EXPECT_GT(ts.scheduler->stats().prompt_cache_hits, 0);
    EXPECT_EQ(off->stats().prompt_cache_blocks, 0);
  }
}

// Eight clients arrive together with one long shared prefix: it is prefilled once (the others
// wait for its blocks), each client prefills only its own tail, and each output is its own.
TEST(PromptCacheTest, ConcurrentClientsSharingAPrefixPrefillItOnce) {
  BatchInvariantKernels invariant;
  SchedulerOptions so;
  so.weights_format = WeightFormat::kQ8_0;
  so.prompt_cache_block = 8;
  so.prefill_chunk = 16;
  TestServer ts(so);
  auto off = Uncached(ts, so);
  const ModelConfig& cfg = ts.supernet->base().config;
  const std::vector<int32_t> shared = Ids(60, 5, cfg);
  std::vector<std::shared_ptr<Job>> jobs, reference;
  for (int i = 0; i < 8; ++i) {
    auto prompt = Concat(shared, Ids(4, 100 + 13 * i, cfg));
    jobs.push_back(TokenJob(ts.supernet->FullShape(), prompt, 6));
    reference.push_back(TokenJob(ts.supernet->FullShape(), prompt, 6));
  }
  const std::vector<Outcome> out = RunAll(*ts.scheduler, jobs);
  const std::vector<Outcome> ref = RunAll(*off, reference);
  int64_t cached = 0;
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(out[i].tokens, ref[i].tokens) << "client " << i;
    cached += out[i].result.cached_tokens;
  }
  // One client computes 64 tokens; seven restore the 60 shared ones (7 whole blocks and the head
  // of the leader's eighth) and compute their own 4.
  EXPECT_EQ(cached, 7 * 60);
  EXPECT_EQ(ts.scheduler->stats().prompt_tokens_prefilled, 64 + 7 * 4);
  EXPECT_EQ(off->stats().prompt_tokens_prefilled, 8 * 64);
}

// A cap of three blocks: ten different prompts later the cache still holds at most three, the
// most recent prompt is the one cached, and outputs are unchanged.
TEST(PromptCacheTest, TheCapHoldsUnderEviction) {
  SchedulerOptions so;
  so.weights_format = WeightFormat::kQ8_0;
  so.prompt_cache_block = 8;
  int64_t block_bytes = 0;
  {
    TestServer probe(so);
    RunOne(*probe.scheduler,
           TokenJob(probe.supernet->FullShape(), Ids(9, 3, probe.supernet->base().config), 1));
    const SchedulerStats st = probe.scheduler->stats();
    ASSERT_GE(st.prompt_cache_blocks, 1);
    block_bytes = st.prompt_cache_bytes / st.prompt_cache_blocks;
  }
  so.prompt_cache_bytes = 3 * block_bytes;
  TestServer ts(so);
  auto off = Uncached(ts, so);
  const ModelConfig& cfg = ts.supernet->base().config;
  std::vector<int32_t> last;
  for (int i = 0; i < 10; ++i) {
    last = Ids(30, 17 * i + 2, cfg);
    const Outcome a = RunOne(*ts.scheduler, TokenJob(ts.supernet->FullShape(), last, 4));
    const Outcome b = RunOne(*off, TokenJob(ts.supernet->FullShape(), last, 4));
    EXPECT_EQ(a.tokens, b.tokens) << "prompt " << i;
    const SchedulerStats st = ts.scheduler->stats();
    EXPECT_LE(st.prompt_cache_bytes, so.prompt_cache_bytes) << "prompt " << i;
    EXPECT_LE(st.prompt_cache_blocks, 3) << "prompt " << i;
  }
  // The last prompt's first three blocks are what is left.
  const Outcome again = RunOne(*ts.scheduler, TokenJob(ts.supernet->FullShape(), last, 4));
  EXPECT_EQ(again.result.cached_tokens, 24);
}

// Cancelled sequences, one cancelled while it waits for another's prefix, and a lane whose step
// fails: later requests of the same prefix still get the uncached output.
TEST(PromptCacheTest, CancellationAndFailuresNeverSpoilCachedBlocks) {
  BatchInvariantKernels invariant;
  std::atomic<int> fail_at_step{-1};
  std::atomic<int> steps{0};
  SchedulerOptions so;
  so.weights_format = WeightFormat::kQ8_0;
  so.prompt_cache_block = 8;
  so.prefill_chunk = 8;
  so.fault_hook = [&](const char* site, const Shape&) {
    if (std::string_view(site) != "step") return;
    if (steps.fetch_add(1) == fail_at_step.load()) throw std::runtime_error("injected step fault");
  };
  TestServer ts(so);
  SchedulerOptions plain = so;
  plain.fault_hook = nullptr;
  auto off = Uncached(ts, plain);
  const ModelConfig& cfg = ts.supernet->base().config;
  const Shape full = ts.supernet->FullShape();
  const std::vector<int32_t> prefix = Ids(48, 9, cfg);

  // A leader and a follower that is cancelled at once (it may be waiting for the leader's
  // blocks): the follower ends CANCELLED, the leader normally.
  auto leader = TokenJob(full, Concat(prefix, Ids(3, 1, cfg)), 8);
  auto follower = TokenJob(full, Concat(prefix, Ids(3, 2, cfg)), 8);
  follower->cancelled = true;
  const auto both = RunAll(*ts.scheduler, {leader, follower});
  EXPECT_EQ(both[1].result.reason, FinishReason::kCancelled);
  EXPECT_EQ(both[0].result.completion_tokens, 8);

  // A sequence cancelled after its first token.
  auto again = TokenJob(full, Concat(prefix, Ids(20, 3, cfg)), 30);
  Job* raw = again.get();
  std::vector<int32_t> got;
  std::promise<void> done;
  again->on_token = [&](int32_t t, std::string_view) {
    got.push_back(t);
    raw->cancelled = true;
  };
  again->on_done = [&](const JobResult& r) {
    EXPECT_EQ(r.reason, FinishReason::kCancelled);
    done.set_value();
  };
  ASSERT_TRUE(ts.scheduler->Submit(again).ok());
  done.get_future().wait();

  // A lane that fails mid-prefill of a prompt sharing the prefix.
  fail_at_step = steps.load() + 2;
  const Outcome failed = RunOne(*ts.scheduler, TokenJob(full, Concat(prefix, Ids(30, 4, cfg)), 4));
  EXPECT_EQ(failed.result.reason, FinishReason::kError);

  for (int i = 0; i < 3; ++i) {
    auto prompt = Concat(prefix, Ids(30, 4 + i, cfg));
    const Outcome a = RunOne(*ts.scheduler, TokenJob(full, prompt, 10));
    const Outcome b = RunOne(*off, TokenJob(full, prompt, 10));
    EXPECT_EQ(a.tokens, b.tokens) << "prompt " << i;
    EXPECT_GE(a.result.cached_tokens, 48) << "prompt " << i;
  }
}

// --prompt-cache-dir: a stopped scheduler saves its cache, a new one with the same tag reads it
// back when the shape's lane is made (and continues to the uncached output); another tag (other
// weights) reads nothing.
TEST(PromptCacheTest, ASavedCacheServesTheNextSchedulerOfTheSameWeights) {
  BatchInvariantKernels invariant;
  SchedulerOptions so;
  so.weights_format = WeightFormat::kQ8_0;
  so.prompt_cache_block = 8;
  TestServer ts(so);
  const std::string dir = ts.dir.file("prompt-cache");
  std::filesystem::create_directories(dir);
  so.prompt_cache_dir = dir;
  so.prompt_cache_tag = "weights-a";
  const Shape full = ts.supernet->FullShape(), small = ts.supernet->SmallestShape();
  const auto prompt = Ids(50, 4, ts.supernet->base().config);
  Outcome first;
  {
    auto a = Another(ts, so);
    first = RunOne(*a, TokenJob(full, prompt, 6));
    RunOne(*a, TokenJob(small, prompt, 6));
    EXPECT_EQ(first.result.cached_tokens, 0);
  }  // stops: saves
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    ++files;
    EXPECT_NE(e.path().filename().string().find("weights-a"), std::string::npos);
  }
  EXPECT_EQ(files, 2);  // one per shape
  {
    auto b = Another(ts, so);
    const Outcome again = RunOne(*b, TokenJob(full, prompt, 6));
    EXPECT_EQ(again.result.cached_tokens, 48);  // whole blocks of the 55 positions held
    EXPECT_EQ(again.tokens, first.tokens);
    EXPECT_GT(b->stats().prompt_cache_blocks, 0);
  }
  so.prompt_cache_tag = "weights-b";
  auto c = Another(ts, so);
  EXPECT_EQ(RunOne(*c, TokenJob(full, prompt, 6)).result.cached_tokens, 0);
}

}  // namespace prompt_cache_test
}  // namespace amoeba
