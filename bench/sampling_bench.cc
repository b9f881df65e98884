// bench/sampling: µs to pick one token from a row of logits with the sampler the server runs for
// every sequence after every decode step (model/sampler.h), per option set, vocabulary and
// instruction set, next to the sampler as it was before its vector passes (scalar exp, an
// nth_element for top-k and a sort for top-p over the vocabulary). The scheduler samples its
// sequences one after another, so 16 sequences cost 16x this per step. Rows: "flat" (logits ~ N(0,
// 1): a random-weight model, the nucleus holds most of the vocabulary) and "peaked" (N(0, 4): the
// nucleus is a few dozen tokens).
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_flags.h"
#include "bench/bench_util.h"
#include "model/kernels.h"
#include "model/runtime.h"
#include "model/sampler.h"
#include "subnet/latency_profile.h"

namespace amoeba::bench {
namespace {

struct Options {
  int rounds = 3;         // interleaved repetitions; the median is reported
  double seconds = 0.05;  // timing per cell and round
  std::string out_json = "bench/results/sampling.json";
  std::string out_md = "bench/results/sampling.md";
};

struct Case {
  const char* name;
  SamplingOptions options;
};

const std::vector<Case>& Cases() {
  static const std::vector<Case> cases = {
      {"greedy", {}},
      {"temperature 1", {.temperature = 1.0f}},
      {"temperature 0.8, top_p 0.95", {.temperature = 0.8f, .top_p = 0.95f}},
      {"temperature 0.8, top_k 40", {.temperature = 0.8f, .top_k = 40}},
      {"temperature 0.7, top_k 40, top_p 0.9", {.temperature = 0.7f, .top_k = 40, .top_p = 0.9f}},
      {"temperature 1, min_p 0.05", {.temperature = 1.0f, .min_p = 0.05f}},
  };
  return cases;
}

// The sampler before this bench's change (model/sampler.cc at e030d07), kept as the baseline:
// indices over the whole vocabulary, nth_element for top-k, a sort for top-p, scalar exp, a
// scalar walk.
class SamplerBefore {
 public:
  SamplerBefore(const SamplingOptions& o, int64_t vocab) : o_(o), idx_(vocab), p_(vocab) {}
  int32_t Sample(const float* logits) {
    const int64_t vocab = static_cast<int64_t>(idx_.size());
    if (o_.temperature <= 0) return static_cast<int32_t>(Argmax(logits, vocab));
    const float inv_t = 1.0f / o_.temperature;
    int64_t n = vocab;
    std::iota(idx_.begin(), idx_.end(), 0);
    auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b]; };
    if (o_.top_k > 0 && o_.top_k < n) {
      std::nth_element(idx_.begin(), idx_.begin() + o_.top_k, idx_.end(), by_logit);
      n = o_.top_k;
    }
    if (o_.top_p < 1.0f) std::sort(idx_.begin(), idx_.begin() + n, by_logit);
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, logits[idx_[i]]);
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += p_[i] = std::exp((logits[idx_[i]] - mx) * inv_t);
    if (o_.min_p > 0.0f) {
      int64_t kept = 0;
      sum = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (p_[i] < o_.min_p) continue;
        idx_[kept] = idx_[i];
        sum += p_[kept++] = p_[i];
      }
      n = kept;
    }
    if (o_.top_p < 1.0f) {
      double acc = 0;
      int64_t keep = 0;
      while (keep < n) {
        acc += p_[keep++] / sum;
        if (acc >= o_.top_p) break;
      }
      n = keep;
      sum = 0;
      for (int64_t i = 0; i < n; ++i) sum += p_[i];
    }
    double r = std::uniform_real_distribution<double>(0.0, sum)(rng_);
    for (int64_t i = 0; i < n; ++i)
      if ((r -= p_[i]) <= 0) return idx_[i];
    return idx_[n - 1];
  }

 private:
  SamplingOptions o_;
  std::vector<int32_t> idx_;
  std::vector<float> p_;
  std::mt19937_64 rng_{1};
};

template <typename S>
double MicrosPerToken(S& sampler, const std::vector<float>& row, double seconds) {
  std::vector<float> logits = row;
  int64_t iters = 0;
  const auto t0 = std::chrono::steady_clock::now();
  double s = 0;
  volatile int64_t sink = 0;
  do {
    logits = row;  // Sample may change the row (penalties); the copy is timed for both
    sink = sink + sampler.Sample(logits.data());
    ++iters;
    s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  } while (s < seconds);
  return s * 1e6 / static_cast<double>(iters);
}

int Run(const Options& o) {
  InitRuntime(1);
  std::vector<KernelIsa> isas = {KernelIsa::kScalar};
  if (CpuHasAvx2Fma()) isas.push_back(KernelIsa::kAvx2);
  if (CpuHasAvx512()) isas.push_back(KernelIsa::kAvx512);
  struct Row {
    const char* name;
    int64_t vocab;
    float spread;
  };
  const std::vector<Row> rows = {
      {"flat", 32000, 1.0f}, {"peaked", 32000, 4.0f}, {"peaked", 128256, 4.0f}};
  // us[row][case][isa + 1]: [0] = the sampler before (best ISA), then the sampler per ISA.
  std::vector<std::vector<std::vector<std::vector<double>>>> us(
      rows.size(), std::vector<std::vector<std::vector<double>>>(
                       Cases().size(), std::vector<std::vector<double>>(isas.size() + 1)));
  std::vector<std::vector<float>> logits;
  for (const Row& r : rows) {
    std::mt19937 rng(17);
    std::normal_distribution<float> normal(0.f, r.spread);
    std::vector<float> row(r.vocab);
    for (float& v : row) v = normal(rng);
    logits.push_back(std::move(row));
  }
  for (int round = 0; round < o.rounds; ++round) {
    for (size_t r = 0; r < rows.size(); ++r) {
      for (size_t c = 0; c < Cases().size(); ++c) {
        ForceKernelIsa(KernelIsa::kAuto);
        SamplerBefore sorted(Cases()[c].options, rows[r].vocab);
        us[r][c][0].push_back(MicrosPerToken(sorted, logits[r], o.seconds));
        for (size_t i = 0; i < isas.size(); ++i) {
          ForceKernelIsa(isas[i]);
          Sampler sampler(Cases()[c].options, rows[r].vocab);
          us[r][c][i + 1].push_back(MicrosPerToken(sampler, logits[r], o.seconds));
        }
      }
    }
  }
  ForceKernelIsa(KernelIsa::kAuto);
  std::string md = "# bench/sampling\n\n" + DescribeCpu() +
                   ", one thread; µs per token, median of " + std::to_string(o.rounds) +
                   " interleaved rounds. before: the sampler before its vector passes (scalar exp, "
                   "nth_element for top-k, a sort for top-p); then the sampler per instruction "
                   "set; x: before / the sampler on this CPU's best.\n\n| row | vocab | options | "
                   "before |";
  for (KernelIsa isa : isas) md += fmt::format(" {} |", KernelIsaName(isa));
  md += " x |\n|---|---|---|---|";
  for (size_t i = 0; i <= isas.size(); ++i) md += "---|";
  md += "\n";
  nlohmann::json results = nlohmann::json::array();
  for (size_t r = 0; r < rows.size(); ++r) {
    for (size_t c = 0; c < Cases().size(); ++c) {
      const double sorted = MedianOf(us[r][c][0]);
      const double best = MedianOf(us[r][c][isas.size()]);
      md += fmt::format("| {} | {} | {} | {:.1f} |", rows[r].name, rows[r].vocab, Cases()[c].name,
                        sorted);
      nlohmann::json per_isa = nlohmann::json::object();
      for (size_t i = 0; i < isas.size(); ++i) {
        const double v = MedianOf(us[r][c][i + 1]);
        md += fmt::format(" {:.1f} |", v);
        per_isa[KernelIsaName(isas[i])] = v;
      }
      md += fmt::format(" {:.1f}x |\n", sorted / best);
      results.push_back({{"row", rows[r].name},
                         {"vocab", rows[r].vocab},
                         {"options", Cases()[c].name},
                         {"before_us", sorted},
                         {"sampler_us", per_isa}});
    }
  }
  const nlohmann::json out = {
      {"machine", DescribeCpu()}, {"rounds", o.rounds}, {"results", results}};
  WriteReport(o.out_json, out.dump(2), o.out_md, md);
  return 0;
}

}  // namespace
}  // namespace amoeba::bench

int main(int argc, char** argv) {
  amoeba::InitLogging();
  amoeba::bench::Options o;
  CLI::App app{"bench/sampling: µs per sampled token, the sampler against the sorted rules"};
  app.add_option("--rounds", o.rounds, "Interleaved repetitions (median reported)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--seconds", o.seconds, "Timing per cell and round")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--json", o.out_json, "JSON output")->capture_default_str();
  app.add_option("--md", o.out_md, "Markdown output")->capture_default_str();
  if (const std::optional<int> exit_code = amoeba::bench::ParseFlags(app, argc, argv))
    return *exit_code;
  return amoeba::bench::Run(o);
}
