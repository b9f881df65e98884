// Log-probabilities: what a client gets for each new token (gRPC) is the log-softmax of the served
// shape's logits at that position, before any sampling transform, with the most likely
// alternatives in order; out-of-range requests are refused.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>

#include "tests/server_fixture.h"

namespace amoeba {
namespace logprobs_test {  // named: a unity build joins test files
using testing::BatchInvariantKernels;
using testing::Req;
using testing::Stream;
using testing::TestServer;

// log-softmax rows of the shape's forward over prompt + generated: row i scores generated[i].
at::Tensor ReferenceLogprobs(const Supernet& s, const Shape& shape, std::vector<int32_t> ids,
                             size_t prompt_len) {
  at::InferenceMode g;
  auto m = std::make_shared<const Model>(testing::MustOk(BuildSubnet(s, nullptr, shape), "build"));
  Engine e(m, {.max_len = 128});
  KVCache c = e.NewCache(1);
  SeqInput in{0, ids};
  at::Tensor logits = testing::MustOk(e.Forward(c, {&in, 1}, /*all_logits=*/true), "forward");
  return at::log_softmax(logits.narrow(0, static_cast<int64_t>(prompt_len) - 1,
                                       static_cast<int64_t>(ids.size() - prompt_len)),
                         1);
}

TEST(LogprobsTest, EachNewTokensLogprobIsTheModelsLogSoftmax) {
  BatchInvariantKernels invariant;
  TestServer ts;
  const Supernet& s = *ts.supernet;
  auto client = ts.Client();
  const Shape small = s.SmallestShape();
  for (const Shape& shape : {s.FullShape(), small}) {
    for (bool sampled : {false, true}) {
      v1::GenerateRequest r =
          Req("log probabilities", static_cast<int>(shape.depth), shape.width, 9);
      r.set_logprobs(3);
      if (sampled) {  // values are the model's, not the transformed distribution's
        r.mutable_sampling()->set_temperature(1.7f);
        r.mutable_sampling()->set_top_k(4);
        r.mutable_sampling()->set_repetition_penalty(1.3f);
        r.mutable_sampling()->set_seed(5);
      }
      std::vector<v1::TokenLogprob> got;
      std::vector<int32_t> tokens;
      grpc::Status st = client.Generate(r, [&](const v1::GenerateResponse& m) {
        for (const auto& lp : m.logprobs()) got.push_back(lp);
        for (int32_t t : m.token_ids()) tokens.push_back(t);
      });
      const std::string what = absl::StrCat(shape.ToString(), sampled ? " sampled" : " greedy");
      ASSERT_TRUE(st.ok()) << st.error_message();
      // Nine tokens, or fewer ending with EOS (whose logprob comes too, in the last message).
      ASSERT_GE(got.size(), 1u) << what;
      ASSERT_LE(got.size(), 9u) << what;
      const auto& eos = s.base().config.eos_token_ids;
      if (got.size() < 9) {
        EXPECT_NE(std::find(eos.begin(), eos.end(), got.back().token_id()), eos.end()) << what;
      }
      EXPECT_LE(tokens.size(), got.size()) << what;
      std::vector<int32_t> ids = {static_cast<int32_t>(s.base().config.bos_token_id)};
      for (int32_t t : s.tokenizer()->Encode("log probabilities")) ids.push_back(t);
      const size_t prompt_len = ids.size();
      for (const auto& lp : got) ids.push_back(lp.token_id());
      // Tokens with text come with their ids; the order is the same.
      for (size_t i = 0; i < tokens.size(); ++i) EXPECT_EQ(tokens[i], got[i].token_id()) << what;
      const at::Tensor ref = ReferenceLogprobs(s, shape, ids, prompt_len);
      for (size_t i = 0; i < got.size(); ++i) {
        const auto row = ref[static_cast<int64_t>(i)];
        EXPECT_NEAR(got[i].logprob(), row[got[i].token_id()].item<float>(), 1e-4) << what << i;
        ASSERT_EQ(got[i].top_size(), 3) << what;
        const auto [vals, idx] = at::topk(row, 3);
        for (int k = 0; k < 3; ++k) {
          EXPECT_EQ(got[i].top(k).token_id(), idx[k].item<int64_t>()) << what << i;
          EXPECT_NEAR(got[i].top(k).logprob(), vals[k].item<float>(), 1e-4) << what << i;
        }
        if (!sampled) {
          EXPECT_EQ(got[i].top(0).token_id(), got[i].token_id()) << what;
        }
      }
    }
  }
  // Without the field: none.
  bool any = false;
  ASSERT_TRUE(client
                  .Generate(Req("no log probabilities", 5, 1.0, 4),
                            [&](const v1::GenerateResponse& m) { any |= m.logprobs_size() > 0; })
                  .ok());
  EXPECT_FALSE(any);
  for (int bad : {-1, 21}) {
    v1::GenerateRequest r = Req("x", 5, 1.0, 2);
    r.set_logprobs(bad);
    const testing::Streamed out = Stream(client, r);
    EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_NE(out.status.error_message().find("logprobs"), std::string::npos);
  }
}

// Scoring a prompt (what evaluation harnesses do with echo): every prompt token after the first
// gets its log-probability given the ones before it, equal to a forward pass's; with no new token
// at all, or with some; twice the same (the prompt cache never stands in for the logits).
TEST(LogprobsTest, PromptTokensAreScoredLikeAForwardPass) {
  BatchInvariantKernels invariant;
  SchedulerOptions so;
  so.prefill_chunk = 8;  // the prompt spans several chunks
  TestServer ts(so);
  const Supernet& s = *ts.supernet;
  auto client = ts.Client();
  const std::string text = "score every token of this prompt, one chunk after another";
  std::vector<int32_t> ids = {static_cast<int32_t>(s.base().config.bos_token_id)};
  for (int32_t t : s.tokenizer()->Encode(text)) ids.push_back(t);
  ASSERT_GT(ids.size(), 17u);
  const at::Tensor ref = at::log_softmax(
      [&] {
        at::InferenceMode g;
        auto m = std::make_shared<const Model>(
            testing::MustOk(BuildSubnet(s, nullptr, s.FullShape()), "build"));
        Engine e(m, {.max_len = 128});
        KVCache c = e.NewCache(1);
        SeqInput in{0, ids};
        return testing::MustOk(e.Forward(c, {&in, 1}, true), "forward").clone();
      }(),
      1);
  for (int new_tokens : {0, 3, 0}) {
    v1::GenerateRequest r = Req(text, 5, 1.0, new_tokens);
    r.set_logprobs(2);
    r.set_prompt_logprobs(true);
    std::vector<v1::TokenLogprob> prompt, generated;
    v1::GenerateResponse last;
    ASSERT_TRUE(client
                    .Generate(r,
                              [&](const v1::GenerateResponse& m) {
                                for (const auto& lp : m.prompt_logprobs()) prompt.push_back(lp);
                                for (const auto& lp : m.logprobs()) generated.push_back(lp);
                                last = m;
                              })
                    .ok());
    ASSERT_EQ(prompt.size(), ids.size() - 1) << new_tokens;
    for (size_t i = 0; i < prompt.size(); ++i) {
      EXPECT_EQ(prompt[i].token_id(), ids[i + 1]);
      EXPECT_NEAR(prompt[i].logprob(), ref[static_cast<int64_t>(i)][ids[i + 1]].item<float>(), 1e-4)
          << "position " << i + 1;
      ASSERT_EQ(prompt[i].top_size(), 2);
      EXPECT_GE(prompt[i].top(0).logprob(), prompt[i].top(1).logprob());
    }
    EXPECT_EQ(static_cast<int>(generated.size()), new_tokens);
    EXPECT_EQ(last.usage().completion_tokens(), new_tokens);
    EXPECT_EQ(last.usage().cached_prompt_tokens(), 0);
  }
  // No new token is for scoring only.
  v1::GenerateRequest r = Req(text, 5, 1.0, 0);
  const testing::Streamed out = Stream(client, r);
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(out.status.error_message().find("max_new_tokens"), std::string::npos);
}

}  // namespace logprobs_test
}  // namespace amoeba
