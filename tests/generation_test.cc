// Sampling and generation: greedy equals the reference argmax chain, seeds are deterministic,
// stop strings / EOS / length end the stream correctly.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "model/engine.h"
#include "model/generation.h"
#include "model/kernels.h"
#include "model/presets.h"
#include "model/sampler.h"
#include "model/src/sampling_kernels.h"
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

// Choose is Next's draw done ahead, on any thread: streams that each Choose on their own thread
// and then take the chosen tokens in Next (as the server's steps do) produce exactly the tokens,
// text and log-probabilities of streams that draw inside Next. A Next on another row than the
// chosen one draws that row.
TEST(TokenStreamTest, ChoosingOnThreadsGivesTheTokensOfNext) {
  Forced x;
  const int64_t vocab = 259;
  constexpr int kStreams = 4, kSteps = 20;
  std::vector<GenerationOptions> opts(kStreams);
  for (int i = 0; i < kStreams; ++i) {
    opts[i].max_new_tokens = kSteps;
    opts[i].stop_at_eos = false;
    opts[i].sampling = {.temperature = 0.7f + 0.2f * static_cast<float>(i),
                        .top_k = i == 1 ? 20 : 0,
                        .top_p = i == 2 ? 0.8f : 1.0f,
                        .seed = static_cast<uint64_t>(100 + i)};
    if (i == 3) opts[i].logprobs = 2;
  }
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.f, 2.f);
  std::vector<std::vector<float>> rows(kSteps * kStreams, std::vector<float>(vocab));
  for (auto& r : rows)
    for (float& v : r) v = normal(rng);
  struct Run {
    std::vector<int32_t> tokens;
    std::string text;
    std::vector<float> logprobs;
  };
  auto drive = [&](bool choose_ahead) {
    std::vector<std::unique_ptr<TokenStream>> streams;
    for (int i = 0; i < kStreams; ++i)
      streams.push_back(std::make_unique<TokenStream>(*x.f.tok, x.f.model->config, opts[i],
                                                      std::span<const int32_t>{}));
    std::vector<Run> runs(kStreams);
    for (int step = 0; step < kSteps; ++step) {
      std::vector<std::vector<float>> logits(rows.begin() + step * kStreams,
                                             rows.begin() + (step + 1) * kStreams);
      if (choose_ahead) {
        std::vector<std::thread> threads;
        for (int i = 0; i < kStreams; ++i)
          threads.emplace_back([&, i] { streams[i]->Choose(logits[i].data()); });
        for (auto& t : threads) t.join();
      }
      for (int i = 0; i < kStreams; ++i) {
        const TokenStream::Step st = streams[i]->Next(logits[i].data());
        runs[i].tokens.push_back(st.token);
        runs[i].text += st.text;
        if (st.logprobs) runs[i].logprobs.push_back(st.logprobs->logprob);
      }
    }
    return runs;
  };
  const std::vector<Run> inside = drive(false), ahead = drive(true);
  for (int i = 0; i < kStreams; ++i) {
    EXPECT_EQ(ahead[i].tokens, inside[i].tokens) << "stream " << i;
    EXPECT_EQ(ahead[i].text, inside[i].text) << "stream " << i;
    EXPECT_EQ(ahead[i].logprobs, inside[i].logprobs) << "stream " << i;
  }
  EXPECT_EQ(inside[3].logprobs.size(), static_cast<size_t>(kSteps));
  // Distinct seeds and options: the streams really differ.
  EXPECT_NE(inside[0].tokens, inside[1].tokens);

  GenerationOptions greedy;
  greedy.stop_at_eos = false;
  TokenStream s(*x.f.tok, x.f.model->config, greedy, {});
  std::vector<float> other(vocab, 0.f);
  other[3 + 'q'] = 10.f;
  s.Choose(x.For(3 + 'p'));
  EXPECT_EQ(s.Next(other.data()).token, 3 + 'q');  // not the row chosen from
  s.Choose(x.For(3 + 'r'));
  EXPECT_EQ(s.Next(x.logits.data()).token, 3 + 'r');
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

std::vector<KernelIsa> SamplingIsas() {
  std::vector<KernelIsa> isas = {KernelIsa::kScalar};
  if (CpuHasAvx2Fma()) isas.push_back(KernelIsa::kAvx2);
  if (CpuHasAvx512()) isas.push_back(KernelIsa::kAvx512);
  return isas;
}

// The vector passes a sampler makes over a row, per instruction set, against their scalar rules
// (sampling_kernels.h), on lengths around the vector widths and the 1024-element partial sums.
TEST(SamplingKernelTest, EveryIsaFollowsTheScalarRules) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 3.f);
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t n : {1, 7, 8, 9, 15, 16, 17, 1023, 1024, 1025, 2049, 32003}) {
    std::vector<float> x(n);
    for (float& v : x) v = normal(rng);
    if (n >= 3) x[n / 3] = -inf;  // a masked token
    const float mx = *std::max_element(x.begin(), x.end());
    // The scalar rules: the argument in float (as the kernels form it), exp in double.
    std::vector<double> w(n);
    double total = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float v = (x[i] - mx) * 1.25f;
      w[i] = v < -87.3365447504019f ? 0.0 : std::exp(static_cast<double>(v));
      total += w[i];
    }
    for (KernelIsa isa : SamplingIsas()) {
      ForceKernelIsa(isa);
      const std::string at = std::string(KernelIsaName(isa)) + " n=" + std::to_string(n);
      EXPECT_EQ(RowMax(x.data(), n), mx) << at;
      std::vector<float> p(n);
      EXPECT_NEAR(ExpScaled(x.data(), n, mx, 1.25f, p.data()), total, 1e-5 * total) << at;
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_NEAR(p[i], w[i], 1e-6 * w[i] + 1e-30) << at << " i=" << i;
        if (w[i] == 0) {
          ASSERT_EQ(p[i], 0.f) << at << " i=" << i;
        }
      }
      if (n >= 3) {
        EXPECT_EQ(p[n / 3], 0.f) << at << ": a -inf logit weighs exactly 0";
      }
      if (n >= 2) {  // NaN logits (mid-row, and last in the last whole vectors): never the
                     // maximum, and weigh 0
        std::vector<float> with_nan = x;
        const float nan = std::numeric_limits<float>::quiet_NaN();
        // The largest value a vector before a NaN in the same lane: a NaN taken into a running
        // maximum would drop it.
        for (int64_t i : {n / 16 * 16 - 17, n / 8 * 8 - 9})
          if (i >= 0) with_nan[i] = 100.f;
        for (int64_t i : {n / 2, n / 16 * 16 - 1, n / 8 * 8 - 1})
          if (i >= 0) with_nan[i] = nan;
        float m = -inf;
        for (float v : with_nan)
          if (!std::isnan(v)) m = std::max(m, v);
        EXPECT_EQ(RowMax(with_nan.data(), n), m) << at;
        std::vector<float> q(n);
        ExpScaled(with_nan.data(), n, m, 1.25f, q.data());
        for (int64_t i = 0; i < n; ++i) {
          if (std::isnan(with_nan[i])) {
            EXPECT_EQ(q[i], 0.f) << at << " i=" << i;
          }
        }
      }
      for (float cut : {0.f, 1e-3f, 0.05f, 0.5f, 1.0f, 2.0f}) {
        int64_t count = -1, ref_count = 0;
        double ref_mass = 0;
        std::vector<int32_t> ref_in;
        for (int64_t i = 0; i < n; ++i) {
          if (p[i] >= cut) ref_mass += p[i], ++ref_count;
          if (p[i] >= cut && p[i] < 2 * cut) ref_in.push_back(static_cast<int32_t>(i));
        }
        EXPECT_NEAR(MassAtLeast(p.data(), n, cut, &count), ref_mass, 1e-6 * ref_mass) << at;
        EXPECT_EQ(count, ref_count) << at << " cut " << cut;
        std::vector<int32_t> in(n);
        in.resize(IndicesInRange(p.data(), n, cut, 2 * cut, in.data()));
        EXPECT_EQ(in, ref_in) << at << " cut " << cut;
        std::vector<float> z = p;
        double ref_kept = 0;
        for (float v : p) ref_kept += v >= cut ? v : 0.0;
        EXPECT_NEAR(ZeroBelow(z.data(), n, cut), ref_kept, 1e-6 * ref_kept) << at;
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(z[i], p[i] >= cut ? p[i] : 0.f) << at;
      }
      // A draw reaches token i when r lands inside its share of the running sum; tokens of
      // weight 0 are never reached, and r past the total gives the last token of weight > 0.
      std::vector<float> q = p;
      for (int64_t i = 0; i < n; i += 5) q[i] = 0.f;
      double run = 0, q_total = 0;
      for (float v : q) q_total += v;
      for (int64_t i = 0; i < n; ++i) {
        // Tokens whose share is well above the partial sums' float rounding (~1e-7 of the total).
        if (q[i] > 1e-5 * q_total && (i % 97 == 1 || i == n - 1)) {
          EXPECT_EQ(FirstReachingMass(q.data(), n, run + 0.5 * q[i]), i) << at;
        }
        run += q[i];
      }
      int64_t last = n - 1;
      while (last > 0 && q[last] == 0) --last;
      EXPECT_EQ(FirstReachingMass(q.data(), n, run * 2 + 1), last) << at;
      std::vector<float> zeros(n, 0.f);
      EXPECT_EQ(FirstReachingMass(zeros.data(), n, 0.0), 0) << at;
    }
  }
  ForceKernelIsa(KernelIsa::kAuto);
}

// The distribution Sample draws from, for every combination of temperature, top-k, min-p and
// top-p and every instruction set, against the rules applied to the whole row in double: sort by
// logit (ties to the lower id), keep top_k, keep weights >= min_p of the best, keep the smallest
// prefix whose mass reaches top_p. Rows: flat and peaked, ties, masked (-inf) tokens, a
// vocabulary that is not a multiple of the vector width. The sampler only sorts and walks what
// it must (a band of weights around the top-p boundary), so this pins that the shortcuts keep
// the rules.
TEST(SamplerTest, DistributionFollowsTheSortedRulesUnderEveryIsa) {
  const float inf = std::numeric_limits<float>::infinity();
  std::mt19937 rng(21);
  std::vector<std::vector<float>> rows;
  for (int64_t vocab : {1003, 32003}) {
    for (float spread : {0.5f, 4.0f}) {
      std::normal_distribution<float> normal(0.f, spread);
      std::vector<float> row(vocab);
      for (float& v : row) v = normal(rng);
      for (int64_t i = 0; i < vocab; i += 7) row[i] = -inf;  // a grammar's mask
      rows.push_back(row);
    }
    std::uniform_int_distribution<int> small(-4, 4);  // many ties
    std::vector<float> ties(vocab);
    for (float& v : ties) v = static_cast<float>(small(rng));
    rows.push_back(ties);
  }
  const std::vector<SamplingOptions> options = {
      {.temperature = 1.0f},
      {.temperature = 0.7f, .top_p = 0.9f},
      {.temperature = 1.3f, .top_p = 0.5f},
      {.temperature = 1.0f, .top_p = 0.999f},
      {.temperature = 0.8f, .top_k = 40},
      {.temperature = 0.8f, .top_k = 40, .top_p = 0.9f},
      {.temperature = 2.0f, .top_k = 900},
      {.temperature = 1.0f, .min_p = 0.05f},
      {.temperature = 1.0f, .top_p = 0.8f, .min_p = 0.1f},
      {.temperature = 0.5f, .top_k = 1},
  };
  for (const std::vector<float>& row : rows) {
    const int64_t vocab = static_cast<int64_t>(row.size());
    for (const SamplingOptions& o : options) {
      // The rules in double.
      std::vector<int32_t> order(vocab);
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
        return row[a] > row[b] || (row[a] == row[b] && a < b);
      });
      const double mx = row[order[0]];
      int64_t n = o.top_k > 0 ? std::min<int64_t>(o.top_k, vocab) : vocab;
      std::vector<double> w(vocab, 0.0);
      std::vector<int32_t> kept;
      for (int64_t i = 0; i < n; ++i) {
        const double wi = std::exp((row[order[i]] - mx) / o.temperature);
        if (wi >= o.min_p && wi > 0) kept.push_back(order[i]), w[order[i]] = wi;
      }
      double sum = 0;
      for (int32_t t : kept) sum += w[t];
      const double candidates_mass = sum;  // top-p's 100%
      if (o.top_p < 1.0f) {
        double acc = 0;
        size_t keep = 0;
        while (keep < kept.size()) {
          acc += w[kept[keep++]] / sum;
          if (acc >= o.top_p) break;
        }
        for (size_t i = keep; i < kept.size(); ++i) w[kept[i]] = 0;
        kept.resize(keep);
        sum = 0;
        for (int32_t t : kept) sum += w[t];
      }
      for (KernelIsa isa : SamplingIsas()) {
        ForceKernelIsa(isa);
        std::vector<float> logits = row, probs(vocab);
        const int32_t tok = Sampler(o, vocab).Sample(logits.data(), probs.data());
        const std::string at = std::string(KernelIsaName(isa)) + " vocab " + std::to_string(vocab) +
                               " t " + std::to_string(o.temperature) + " top_k " +
                               std::to_string(o.top_k) + " top_p " + std::to_string(o.top_p) +
                               " min_p " + std::to_string(o.min_p);
        EXPECT_GT(w[tok], 0) << at << ": drew a token outside the candidates";
        // The nucleus may end one token earlier or later than in double where the mass before
        // the boundary is within float rounding (1e-5) of top_p; the rest must agree exactly.
        std::vector<double> ref_w = w;
        double ref_sum = sum;
        for (int64_t t = 0; t < vocab; ++t) {
          if ((probs[t] > 0) == (ref_w[t] > 0)) continue;
          const bool next = kept.size() < order.size() && t == order[kept.size()];
          const bool last = !kept.empty() && t == kept.back();
          ASSERT_TRUE(o.top_p < 1.0f && (next || last)) << at << " token " << t;
          double before = 0;  // the reference's mass before the boundary token
          for (size_t i = 0; i + 1 < kept.size(); ++i) before += w[kept[i]];
          if (next) before += w[kept.back()];
          ASSERT_NEAR(before / candidates_mass, o.top_p, 1e-5) << at << ": the boundary moved";
          const double wt = next ? std::exp((row[t] - mx) / o.temperature) : 0.0;
          ref_sum += wt - ref_w[t];
          ref_w[t] = wt;
        }
        for (int64_t t = 0; t < vocab; ++t) {
          const double ref = ref_w[t] / ref_sum;
          ASSERT_NEAR(probs[t], ref, 1e-6 + 1e-4 * ref) << at << " token " << t;
        }
      }
    }
  }
  ForceKernelIsa(KernelIsa::kAuto);
}

// Draws follow the distribution: chi-square of 20000 draws against Sample's own probabilities,
// for the every-token path (walked in vectors, across 1024-element partial sums) and top-p's;
// the same for speculative checks of a draft drawn deterministically.
TEST(SamplerTest, DrawsFollowTheDistribution) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.f, 2.5f);
  const int64_t vocab = 3001;
  std::vector<float> row(vocab);
  for (float& v : row) v = normal(rng);
  for (const SamplingOptions& o :
       {SamplingOptions{.temperature = 1.0f, .seed = 3},
        SamplingOptions{.temperature = 0.9f, .top_p = 0.7f, .seed = 4}}) {
    std::vector<float> logits = row, p(vocab);
    Sampler s(o, vocab);
    s.Sample(logits.data(), p.data());
    const int64_t n = 20000;
    std::vector<int64_t> counts(vocab, 0);
    for (int64_t i = 0; i < n; ++i) {
      logits = row;
      ++counts[s.Sample(logits.data())];
    }
    int64_t df = 0;
    const double chi = ChiSquare(counts, p, n, &df);
    EXPECT_GT(df, 10);
    EXPECT_LT(chi, df + 4.5 * std::sqrt(2.0 * df)) << "top_p " << o.top_p;
    // A check of a draft drawn deterministically (no draft distribution: q is one-hot on the
    // drafted token, here the likeliest) keeps the same distribution.
    const int32_t drafted = static_cast<int32_t>(std::max_element(p.begin(), p.end()) - p.begin());
    std::fill(counts.begin(), counts.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      logits = row;
      bool accepted = false;
      const int32_t t = s.Verify(logits.data(), drafted, nullptr, &accepted);
      EXPECT_EQ(accepted, t == drafted);
      ++counts[t];
    }
    EXPECT_LT(ChiSquare(counts, p, n, &df), df + 4.5 * std::sqrt(2.0 * df))
        << "checks of a deterministic draft, top_p " << o.top_p;
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
