// Sampling and generation: greedy equals the reference argmax chain, seeds are deterministic,
// stop strings / EOS / length end the stream correctly.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <memory>

#include "model/engine.h"
#include "model/generation.h"
#include "model/kernels.h"
#include "model/presets.h"
#include "model/sampler.h"
#include "model/torch_forward.h"
#include "tests/test_util.h"

namespace amoeba {
namespace generation_test {  // named: a unity build joins test files
using testing::TempDir;

struct Fixture {
  TempDir dir;
  std::unique_ptr<Tokenizer> tok;
  std::shared_ptr<const Model> model;
  Fixture() {
    EXPECT_TRUE(WriteByteTokenizer(dir.path()).ok());
    tok = std::move(LoadTokenizer(dir.path()).value());
    Model m = RandomModel(testing::TinyConfig(), 3, 0.3);
    m.config.vocab_size = 259;
    m = RandomModel(m.config, 3, 0.3);
    model = std::make_shared<const Model>(std::move(m));
  }
};

TEST(GenerationTest, GreedyEqualsReferenceArgmaxChain) {
  at::InferenceMode guard;
  Fixture f;
  Engine engine(f.model, {.max_len = 64});
  KVCache cache = engine.NewCache(1);
  std::vector<int32_t> prompt = {1, 50, 60, 70};
  GenerationOptions o;
  o.max_new_tokens = 12;
  o.stop_at_eos = false;
  auto r = Generate(engine, cache, 0, *f.tok, prompt, o);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->tokens.size(), 12u);
  EXPECT_EQ(r->finish_reason, FinishReason::kLength);
  std::vector<int64_t> seq(prompt.begin(), prompt.end());
  for (int i = 0; i < 12; ++i) {
    at::Tensor logits = TorchForward(*f.model, at::tensor(seq).unsqueeze(0))[0][-1];
    const int64_t next = logits.argmax().item<int64_t>();
    EXPECT_EQ(r->tokens[i], next) << "step " << i;
    seq.push_back(next);
  }
}

TEST(GenerationTest, SeedsAreDeterministicAndStreamingMatchesText) {
  at::InferenceMode guard;
  Fixture f;
  Engine engine(f.model, {.max_len = 64});
  KVCache cache = engine.NewCache(1);
  std::vector<int32_t> prompt = {1, 80, 90};
  GenerationOptions o;
  o.max_new_tokens = 24;
  o.stop_at_eos = false;
  o.sampling = {.temperature = 1.5f, .top_k = 50, .top_p = 0.95f, .seed = 42};
  std::string streamed;
  auto a = Generate(engine, cache, 0, *f.tok, prompt, o, [&](int32_t, std::string_view t) {
    streamed += t;
    return true;
  });
  auto b = Generate(engine, cache, 0, *f.tok, prompt, o);
  o.sampling.seed = 43;
  auto c = Generate(engine, cache, 0, *f.tok, prompt, o);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(a->tokens, b->tokens);
  EXPECT_NE(a->tokens, c->tokens);
  EXPECT_EQ(streamed, a->text);
  EXPECT_EQ(a->text, f.tok->Decode(a->tokens));
}

TEST(GenerationTest, CallbackCancels) {
  at::InferenceMode guard;
  Fixture f;
  Engine engine(f.model, {.max_len = 64});
  KVCache cache = engine.NewCache(1);
  std::vector<int32_t> prompt = {1, 2 + 'a'};
  GenerationOptions o;
  o.max_new_tokens = 30;
  o.stop_at_eos = false;
  int calls = 0;
  auto r = Generate(engine, cache, 0, *f.tok, prompt, o,
                    [&](int32_t, std::string_view) { return ++calls < 3; });
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->finish_reason, FinishReason::kCancelled);
  EXPECT_EQ(r->tokens.size(), 3u);
}

// Drives a TokenStream with logits that force a chosen token sequence.
struct Forced {
  Fixture f;
  std::vector<float> logits;
  Forced() : logits(259) {}
  float* For(int32_t id) {
    std::fill(logits.begin(), logits.end(), 0.f);
    logits[id] = 10.f;
    return logits.data();
  }
};

TEST(TokenStreamTest, StopStringIsCutAndNeverStreamed) {
  Forced x;
  GenerationOptions o;
  o.max_new_tokens = 100;
  o.stop = {"STOP"};
  TokenStream s(*x.f.tok, x.f.model->config, o, {});
  std::string streamed;
  const std::string text = "abSTxSTOPdef";
  TokenStream::Step step;
  for (char ch : text) {
    step = s.Next(x.For(3 + static_cast<unsigned char>(ch)));
    streamed += step.text;
    if (step.done) break;
  }
  EXPECT_TRUE(step.done);
  EXPECT_EQ(s.finish_reason(), FinishReason::kStopSequence);
  EXPECT_EQ(s.text(), "abSTx");
  EXPECT_EQ(streamed, "abSTx");
}

TEST(TokenStreamTest, EosAndLength) {
  Forced x;
  GenerationOptions o;
  o.max_new_tokens = 3;
  TokenStream s(*x.f.tok, x.f.model->config, o, {});
  EXPECT_FALSE(s.Next(x.For(3 + 'a')).done);
  EXPECT_TRUE(s.Next(x.For(2)).done);  // </s>
  EXPECT_EQ(s.finish_reason(), FinishReason::kEos);
  TokenStream l(*x.f.tok, x.f.model->config, o, {});
  l.Next(x.For(3 + 'a'));
  l.Next(x.For(3 + 'b'));
  EXPECT_TRUE(l.Next(x.For(3 + 'c')).done);
  EXPECT_EQ(l.finish_reason(), FinishReason::kLength);
  EXPECT_EQ(l.text(), "abc");
}

// A server lane can swap its model (a merged copy) under running streams: a stream must not
// depend on the config it was built from staying alive.
TEST(TokenStreamTest, OutlivesTheConfigItWasBuiltFrom) {
  Forced x;
  GenerationOptions o;
  o.max_new_tokens = 8;
  auto config = std::make_unique<ModelConfig>(x.f.model->config);
  config->eos_token_ids = {7, 9};
  TokenStream s(*x.f.tok, *config, o, {});
  config->eos_token_ids.assign(64, 3 + 'a');  // reallocated, then freed: stale data if retained
  config.reset();
  EXPECT_FALSE(s.Next(x.For(3 + 'a')).done);
  EXPECT_TRUE(s.Next(x.For(9)).done);
  EXPECT_EQ(s.finish_reason(), FinishReason::kEos);
}

TEST(SamplerTest, RepetitionPenaltyTopKAndTopP) {
  // Repetition penalty: positive logits divided, negative multiplied (HF semantics).
  Sampler s({.temperature = 0.f, .repetition_penalty = 2.0f}, 3);
  s.Observe(0);
  s.Observe(1);
  float l[3] = {3.0f, -1.0f, 1.6f};
  EXPECT_EQ(s.Sample(l), 2);  // 3/2 = 1.5 < 1.6
  EXPECT_FLOAT_EQ(l[0], 1.5f);
  EXPECT_FLOAT_EQ(l[1], -2.0f);
  // top_k = 1 is greedy whatever the temperature.
  Sampler k1({.temperature = 5.f, .top_k = 1, .seed = 1}, 4);
  for (int i = 0; i < 20; ++i) {
    float m[4] = {0.1f, 0.3f, 0.2f, 0.25f};
    EXPECT_EQ(k1.Sample(m), 1);
  }
  // top_p keeps only the dominant token when it holds more than p of the mass.
  Sampler p({.temperature = 1.f, .top_p = 0.5f, .seed = 3}, 4);
  for (int i = 0; i < 20; ++i) {
    float m[4] = {0.f, 5.f, 0.f, 0.f};
    EXPECT_EQ(p.Sample(m), 1);
  }
  // Sampling with temperature visits more than one token.
  Sampler t({.temperature = 1.f, .seed = 5}, 4);
  std::set<int> seen;
  for (int i = 0; i < 100; ++i) {
    float m[4] = {0.f, 0.f, 0.f, 0.f};
    seen.insert(t.Sample(m));
  }
  EXPECT_EQ(seen.size(), 4u);
}

double ChiSquare(const std::vector<int64_t>& counts, const std::vector<float>& p, int64_t n,
                 int64_t* df) {
  // Tokens expected at least 5 times each get a bin; the rest share one.
  double chi = 0, rest_obs = 0, rest_exp = 0;
  *df = -1;
  for (size_t t = 0; t < p.size(); ++t) {
    const double e = p[t] * static_cast<double>(n);
    if (e >= 5) {
      chi += (counts[t] - e) * (counts[t] - e) / e;
      ++*df;
    } else {
      rest_obs += counts[t];
      rest_exp += e;
    }
  }
  if (rest_exp > 0) {
    chi += (rest_obs - rest_exp) * (rest_obs - rest_exp) / rest_exp;
    ++*df;
  }
  return chi;
}

// The speculative sampling rule on real logits: a different model drafts a token from its own
// distribution q, the target checks it against its logits (one pass over [next, drafted], cache
// rolled back each time). The tokens that come out must follow the target's distribution p,
// not q: chi-square over 20000 draws, with the draft's own draws as the control that the test
// can tell the two apart. The acceptance rate is sum(min(p, q)).
// OpenAI's penalties count generated tokens only (the prompt's are seen, not counted), a logit
// bias moves the greedy choice, min-p drops what is far less likely than the best token, and a
// draft sampler copies the counts.
TEST(SamplerTest, PresenceFrequencyLogitBiasAndMinP) {
  Sampler s({.temperature = 0.f, .presence_penalty = 0.5f, .frequency_penalty = 0.25f}, 3);
  s.Observe(0);  // a prompt token: not penalised
  s.ObserveGenerated(1);
  s.ObserveGenerated(1);
  s.ObserveGenerated(2);
  float l[3] = {1.0f, 2.0f, 2.0f};
  EXPECT_EQ(s.Sample(l), 2);
  EXPECT_FLOAT_EQ(l[0], 1.0f);
  EXPECT_FLOAT_EQ(l[1], 2.0f - 0.5f - 2 * 0.25f);  // 1.0
  EXPECT_FLOAT_EQ(l[2], 2.0f - 0.5f - 0.25f);      // 1.25
  Sampler copy({.temperature = 0.f, .presence_penalty = 0.5f, .frequency_penalty = 0.25f}, 3);
  copy.CopyHistoryFrom(s);
  float m[3] = {1.0f, 2.0f, 2.0f};
  EXPECT_EQ(copy.Sample(m), 2);
  EXPECT_FLOAT_EQ(m[1], 1.0f);
  EXPECT_TRUE(copy.UsesHistory());
  EXPECT_FALSE(Sampler({.temperature = 1.f}, 3).UsesHistory());

  Sampler biased({.temperature = 0.f, .logit_bias = {{0, 5.0f}, {1, -100.0f}}}, 3);
  float b[3] = {0.0f, 4.0f, 4.5f};
  EXPECT_EQ(biased.Sample(b), 0);  // 0 + 5 > 4.5
  EXPECT_FLOAT_EQ(b[1], -96.0f);

  // min_p = 0.5 at temperature 1: p(1)/p(0) = e^-0.5 = 0.61 stays, e^-2 = 0.14 goes.
  Sampler mp({.temperature = 1.f, .seed = 11, .min_p = 0.5f}, 3);
  std::set<int> drawn;
  for (int i = 0; i < 200; ++i) {
    float x[3] = {2.0f, 1.5f, 0.0f};
    drawn.insert(mp.Sample(x));
  }
  EXPECT_EQ(drawn, (std::set<int>{0, 1}));
  std::vector<float> probs(3);
  float x[3] = {2.0f, 1.5f, 0.0f};
  mp.Sample(x, probs.data());
  EXPECT_FLOAT_EQ(probs[2], 0.0f);
  EXPECT_NEAR(probs[0] + probs[1], 1.0f, 1e-6);
  EXPECT_NEAR(probs[1] / probs[0], std::exp(-0.5f), 1e-5);
}

TEST(SamplerTest, SpeculativeChecksKeepTheTargetsDistribution) {
  at::InferenceMode guard;
  auto target = std::make_shared<const Model>(testing::TinyModel(3));
  auto draft = std::make_shared<const Model>(testing::TinyModel(9));
  const int64_t V = target->config.vocab_size;
  const std::vector<int32_t> prompt = {5, 17, 60, 2, 33, 71};
  Engine te(target, {.max_len = 16}), de(draft, {.max_len = 16});
  KVCache tc = te.NewCache(1), dc = de.NewCache(1);
  SeqInput head{0, std::span<const int32_t>(prompt.data(), prompt.size() - 1)};
  ASSERT_TRUE(te.Forward(tc, {&head, 1}).ok());
  SeqInput all{0, prompt};
  const at::Tensor draft_logits = de.Forward(dc, {&all, 1}).value()[0].clone();
  for (const SamplingOptions& o :
       {SamplingOptions{.temperature = 1.0f},
        SamplingOptions{.temperature = 0.7f, .top_k = 12, .top_p = 0.9f}}) {
    // p: what the target samples from after the prompt (Sample's own distribution).
    std::vector<float> p(V), q(V);
    {
      SeqInput whole{0, prompt};
      KVCache fresh = te.NewCache(1);
      at::Tensor l = te.Forward(fresh, {&whole, 1}).value()[0].clone();
      Sampler(o, V).Sample(l.data_ptr<float>(), p.data());
    }
    const int64_t n = 20000;
    std::vector<int64_t> counts(V, 0), draft_counts(V, 0);
    int64_t accepted = 0;
    SamplingOptions od = o;
    od.seed = 99;
    Sampler checker({o.temperature, o.top_k, o.top_p, o.repetition_penalty, 7}, V), drafter(od, V);
    for (int64_t i = 0; i < n; ++i) {
      at::Tensor dl = draft_logits.clone();
      const int32_t d = drafter.Sample(dl.data_ptr<float>(), q.data());
      ++draft_counts[d];
      const int32_t check[2] = {prompt.back(), d};
      SeqInput in{0, check, /*all_logits=*/true};
      at::Tensor rows = te.Forward(tc, {&in, 1}).value();
      bool ok = false;
      ++counts[checker.Verify(rows[0].data_ptr<float>(), d, q.data(), &ok)];
      accepted += ok;
      tc.set_length(0, static_cast<int64_t>(prompt.size()) - 1);  // roll back both tokens
    }
    int64_t df = 0;
    const double chi = ChiSquare(counts, p, n, &df);
    // ~1e-5 upper tail of chi-square(df) (mean df, sd sqrt(2 df)).
    const double critical = df + 4.5 * std::sqrt(2.0 * df);
    EXPECT_GT(df, 3);
    EXPECT_LT(chi, critical) << "df " << df << " temperature " << o.temperature;
    int64_t df_q = 0;
    EXPECT_GT(ChiSquare(draft_counts, p, n, &df_q), critical) << "the draft's q is not p";
    double overlap = 0;
    for (int64_t t = 0; t < V; ++t) overlap += std::min(p[t], q[t]);
    const double rate = static_cast<double>(accepted) / n;
    EXPECT_NEAR(rate, overlap, 4 * std::sqrt(overlap * (1 - overlap) / n) + 1e-3);
  }
}

// Log-probabilities of a row: every instruction set's log Z matches log-softmax in double, the
// top k is topk's (ties to the lower id), for a vocabulary that is not a multiple of the vector.
TEST(LogprobRowTest, EveryInstructionSetMatchesLogSoftmax) {
  at::manual_seed(3);
  const int64_t vocab = 32003;
  // A row without a peak: log Z is a sum of many comparable terms (what the accumulation gets
  // wrong first).
  const at::Tensor flat = at::randn({vocab}) * 2;
  const at::Tensor flat_ref = at::log_softmax(flat.to(at::kDouble), 0);
  for (KernelIsa isa : {KernelIsa::kScalar, KernelIsa::kAvx2, KernelIsa::kAvx512}) {
    if (isa == KernelIsa::kAvx512 && !CpuHasAvx512()) continue;
    ForceKernelIsa(isa);
    LogprobRow row;
    row.Read(flat.data_ptr<float>(), vocab);
    for (int32_t id : {0, 999, 32002})
      EXPECT_NEAR(row.Of(id), flat_ref[id].item<double>(), 2e-5) << "isa " << static_cast<int>(isa);
  }
  at::Tensor logits = at::randn({vocab}) * 4;
  logits[17] = 40.f;  // a tie: the lower id comes first
  logits[4000] = 40.f;
  logits[32002] = 45.f;  // in the scalar tail
  const at::Tensor ref = at::log_softmax(logits.to(at::kDouble), 0);
  for (KernelIsa isa : {KernelIsa::kScalar, KernelIsa::kAvx2, KernelIsa::kAvx512}) {
    if (isa == KernelIsa::kAvx512 && !CpuHasAvx512()) continue;
    ForceKernelIsa(isa);
    LogprobRow row;
    row.Read(logits.data_ptr<float>(), vocab);
    for (int32_t id : {0, 17, 4000, 12345, 32002})
      EXPECT_NEAR(row.Of(id), ref[id].item<double>(), 2e-5) << "isa " << static_cast<int>(isa);
    std::vector<std::pair<int32_t, float>> top;
    row.Top(5, top);
    ASSERT_EQ(top.size(), 5u);
    EXPECT_EQ(top[0].first, 32002);
    EXPECT_EQ(top[1].first, 17);
    EXPECT_EQ(top[2].first, 4000);
    const auto [vals, idx] = at::topk(logits, 5);
    for (int k = 0; k < 5; ++k) {
      EXPECT_NEAR(top[k].second, ref[idx[k].item<int64_t>()].item<double>(), 2e-5);
      if (k >= 3) {
        EXPECT_EQ(top[k].first, idx[k].item<int64_t>());
      }
    }
  }
  ForceKernelIsa(KernelIsa::kAuto);
}

}  // namespace generation_test
}  // namespace amoeba
