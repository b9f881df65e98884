// bench/speculative: what self-speculation buys. Through the server's scheduler (merged lanes,
// continuous batching), greedy decode of a target shape with and without a smaller shape of the
// same supernet drafting for it: batch-1 and 4-stream tokens/s, the drafted tokens kept per check,
// and whether the output is identical. Run on the tuned supernet and on the same supernet without
// its adapters (untuned), where in-place distillation has not taught the small shapes to agree.
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <nlohmann/json.hpp>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/bench_flags.h"
#include "bench/bench_util.h"
#include "model/kernels.h"
#include "model/runtime.h"
#include "server/scheduler.h"
#include "subnet/calibration_data.h"
#include "subnet/latency_profile.h"
#include "subnet/speculation.h"
#include "subnet/subnet_builder.h"

namespace amoeba::bench {
namespace {
namespace fs = std::filesystem;
using SteadyClock = std::chrono::steady_clock;

struct Options {
  std::string supernet;  // default: the demo supernet
  std::string data;      // held-out text for prompts; default: next to the demo supernet
  int prompts = 6;
  int prompt_tokens = 16;
  int new_tokens = 64;
  int rounds = 3;
  int threads = 0;
  std::string weights_dtype = "f32";
  std::string draft_weights_dtype;  // "" = weights_dtype (drafts on the shape's lane)
  std::string out_json = "bench/results/speculative.json";
  std::string out_md = "bench/results/speculative.md";
};

struct Run {
  double tokens_per_s = 0;
  int64_t tokens = 0, drafted = 0, accepted = 0, checks = 0;
  std::vector<std::vector<int32_t>> outputs;
};

// Greedy generations of every prompt, `streams` at a time; tokens/s over the decode phase of
// each wave (first token to last), summed over the waves.
Run Generate(Scheduler& sched, const Shape& target, const std::optional<Shape>& draft, int64_t k,
             const std::vector<std::vector<int32_t>>& prompts, int new_tokens, int streams) {
  Run run;
  run.outputs.resize(prompts.size());
  double seconds = 0;
  for (size_t first = 0; first < prompts.size(); first += streams) {
    const size_t n = std::min(prompts.size() - first, static_cast<size_t>(streams));
    std::vector<std::promise<JobResult>> done(n);
    std::vector<std::shared_ptr<Job>> jobs;
    std::vector<SteadyClock::time_point> first_token(n);
    for (size_t i = 0; i < n; ++i) {
      auto job = std::make_shared<Job>();
      job->request_id = absl::StrCat("bench-", first + i);
      job->shape = target;
      job->prompt = prompts[first + i];
      job->gen.max_new_tokens = new_tokens;
      job->gen.stop_at_eos = false;  // every run decodes the same number of tokens
      job->draft = draft;
      job->draft_tokens = draft ? k : 0;
      auto* out = &run.outputs[first + i];
      auto* ft = &first_token[i];
      job->on_token = [out, ft](int32_t t, std::string_view) {
        if (out->empty()) *ft = SteadyClock::now();
        if (t >= 0) out->push_back(t);
      };
      job->on_done = [&done, i](const JobResult& r) { done[i].set_value(r); };
      jobs.push_back(job);
    }
    for (auto& j : jobs) (void)sched.Submit(j);
    std::vector<JobResult> results;
    for (auto& d : done) results.push_back(d.get_future().get());
    const auto end = SteadyClock::now();
    SteadyClock::time_point start = first_token[0];
    for (size_t i = 0; i < n; ++i) {
      start = std::min(start, first_token[i]);
      run.tokens += results[i].completion_tokens - 1;  // after the first (prefill) token
      run.drafted += results[i].drafted_tokens;
      run.accepted += results[i].accepted_tokens;
      run.checks += results[i].draft_rounds;
    }
    seconds += std::chrono::duration<double>(end - start).count();
  }
  run.tokens_per_s = seconds > 0 ? static_cast<double>(run.tokens) / seconds : 0;
  return run;
}

int RunBench(const Options& o_in) {
  Options o = o_in;
  InitRuntime(o.threads);
  at::InferenceMode guard;
  if (o.supernet.empty()) {
    const char* cache = std::getenv("AMOEBA_CACHE");
    const char* home = std::getenv("HOME");
    o.supernet = cache ? fs::path(cache) / "demo-supernet"
                       : fs::path(home ? home : ".") / ".cache/amoeba/demo-supernet";
  }
  if (o.data.empty()) o.data = (fs::path(o.supernet).parent_path() / "heldout.txt").string();
  const auto format = ParseWeightFormat(o.weights_dtype);
  if (!format.ok()) {
    spdlog::error("--{}", std::string(format.status().message()));
    return 2;
  }
  const auto draft_parsed = ParseDraftFormat(o.draft_weights_dtype, *format);
  if (!draft_parsed.ok()) {
    spdlog::error("--{}", std::string(draft_parsed.status().message()));
    return 2;
  }
  const std::optional<WeightFormat> draft_format = *draft_parsed;
  const std::string draft_dtype = draft_format ? WeightFormatName(*draft_format) : o.weights_dtype;
  auto loaded = Supernet::Load(o.supernet);
  if (!loaded.ok()) {
    spdlog::error("bench/speculative: {} (run scripts/demo once to build the demo supernet)",
                  loaded.status().ToString());
    return 2;
  }
  Supernet& s = **loaded;
  auto smol = LoadAdapters(s);
  if (!smol.ok() || !*smol) {
    spdlog::error("bench/speculative: {} has no tuned adapters", o.supernet);
    return 2;
  }
  auto text = ReadCorpus(o.data);
  if (!text.ok()) {
    spdlog::error("bench/speculative: {}", text.status().ToString());
    return 2;
  }
  // Prompts: BOS + the first tokens of held-out lines that have enough of them.
  std::vector<std::vector<int32_t>> prompts;
  for (auto line : absl::StrSplit(*text, '\n')) {
    auto ids = s.tokenizer()->Encode(std::string(line));
    if (static_cast<int>(ids.size()) < o.prompt_tokens) continue;
    std::vector<int32_t> p = {static_cast<int32_t>(s.base().config.bos_token_id)};
    p.insert(p.end(), ids.begin(), ids.begin() + o.prompt_tokens);
    prompts.push_back(p);
    if (static_cast<int>(prompts.size()) == o.prompts) break;
  }
  if (prompts.empty()) {
    spdlog::error("bench/speculative: no line of {} has {} tokens", o.data, o.prompt_tokens);
    return 2;
  }
  s.PackBaseWeights(*format);
  // Targets: the full shape and the middle of the grid; drafts as `auto` would choose them from
  // the profile (eval's timings), else the smallest shape with 4 tokens per check.
  const SupernetSpec& spec = s.spec();
  const Shape full = s.FullShape();
  const Shape middle{spec.depths[spec.depths.size() / 2], spec.widths[spec.widths.size() / 2]};
  // A draft reading its own copy costs what eval timed for that format (--draft-weights-dtype).
  auto eval_costs = [&](const Shape& t, const Shape& d) -> std::optional<DraftCosts> {
    const ShapeRecord *tr = spec.FindRecord(t), *dr = spec.FindRecord(d);
    if (!tr || !dr || !tr->decode_ms_per_token || !dr->decode_ms_per_token) return std::nullopt;
    double draft_ms = *dr->decode_ms_per_token;
    if (draft_format) {
      auto it = dr->decode_ms_by_dtype.find(draft_dtype);
      if (it == dr->decode_ms_by_dtype.end()) return std::nullopt;
      draft_ms = it->second;
    }
    return DraftCosts{*tr->decode_ms_per_token, draft_ms, tr->check_ms_per_extra_token.value_or(0)};
  };
  if (draft_format) {
    bool timed = false;
    for (const ShapeRecord& r : spec.profile)
      timed = timed || r.decode_ms_by_dtype.count(draft_dtype);
    if (!timed) {
      spdlog::error(
          "bench/speculative: the profile has no {} draft timings (amoeba-admin eval "
          "--draft-weights-dtype {})",
          draft_dtype, draft_dtype);
      return 2;
    }
  }
  nlohmann::json results = nlohmann::json::array();
  std::string md = absl::StrFormat(
      "# bench/speculative\n\n%s, %s, %s weights, drafts reading %s, %zu prompts of %d tokens, "
      "%d new tokens, greedy, medians of %d interleaved rounds\n\n"
      "| supernet | target | draft | k | streams | tok/s off | tok/s on | speedup | expected | "
      "kept per check | kept / drafted | same output |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|\n",
      DescribeCpu(), o.supernet, o.weights_dtype,
      draft_format ? "their own " + draft_dtype + " copies" : "the target's panels", prompts.size(),
      o.prompt_tokens, o.new_tokens, o.rounds);
  for (const Shape& target : {full, middle}) {
    auto choice = ChooseDraft(spec, target, eval_costs, 0.0);
    const Shape draft = choice ? choice->draft : s.SmallestShape();
    const int64_t k = choice ? choice->tokens : 4;
    if (draft == target) continue;
    for (bool tuned : {true, false}) {
      SchedulerOptions so;
      so.slots_per_shape = 8;
      so.max_context = 512;
      so.weights_format = *format;
      so.draft_format = draft_format;
      so.smol = tuned ? smol->get() : nullptr;
      so.merge_after_requests = 1;
      // As amoeba-server does: the thread that packed the weights runs the decode loop (one
      // OpenMP team in the process); the measuring runs on `driver`.
      so.run_on_caller = true;
      Scheduler sched(s, so);
      std::thread driver([&] {
        // Warm-up: both shapes get their merged copies before anything is timed.
        (void)Generate(sched, target, draft, k, {prompts[0]}, 8, 1);
        auto ready = [&] {
          const SchedulerStats st = sched.stats();
          return (!tuned || st.merges_built >= 2) && (!draft_format || st.draft_copies >= 1);
        };
        for (int i = 0; i < 200 && !ready(); ++i)
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        (void)Generate(sched, target, draft, k, {prompts[0]}, 8, 1);  // on the copies now
        (void)Generate(sched, target, std::nullopt, 0, {prompts[0]}, 8, 1);
        for (int streams : {1, 4}) {
          std::vector<double> off_rates, on_rates;
          Run off, on;
          for (int r = 0; r < o.rounds; ++r) {
            // Alternate which goes first, so drift hits both alike.
            if (r % 2 == 0) {
              off = Generate(sched, target, std::nullopt, 0, prompts, o.new_tokens, streams);
              on = Generate(sched, target, draft, k, prompts, o.new_tokens, streams);
            } else {
              on = Generate(sched, target, draft, k, prompts, o.new_tokens, streams);
              off = Generate(sched, target, std::nullopt, 0, prompts, o.new_tokens, streams);
            }
            off_rates.push_back(off.tokens_per_s);
            on_rates.push_back(on.tokens_per_s);
          }
          const double a = MedianOf(off_rates), b = MedianOf(on_rates);
          const double kept = on.checks > 0 ? static_cast<double>(on.accepted) / on.checks : 0;
          const double rate = on.drafted > 0 ? static_cast<double>(on.accepted) / on.drafted : 0;
          const bool same = on.outputs == off.outputs;
          results.push_back({{"supernet", tuned ? "tuned" : "untuned"},
                             {"target", target.ToString()},
                             {"draft", draft.ToString()},
                             {"draft_tokens", k},
                             {"expected_speedup", choice ? choice->expected_speedup : 0.0},
                             {"streams", streams},
                             {"tokens_per_s_off", a},
                             {"tokens_per_s_on", b},
                             {"speedup", a > 0 ? b / a : 0},
                             {"rounds_off", off_rates},
                             {"rounds_on", on_rates},
                             {"kept_per_check", kept},
                             {"kept_fraction", rate},
                             {"identical_output", same}});
          md += absl::StrFormat(
              "| %s | %s | %s | %d | %d | %.1f | %.1f | %.2fx | %.2fx | %.2f | %.2f | %s |\n",
              tuned ? "tuned" : "untuned", target.ToString(), draft.ToString(), k, streams, a, b,
              a > 0 ? b / a : 0, choice ? choice->expected_speedup : 0.0, kept, rate,
              same ? "yes" : "NO");
          spdlog::info(
              "bench/speculative: {} {} streams={} off {:.1f} on {:.1f} tok/s, kept {:.2f}",
              tuned ? "tuned" : "untuned", target.ToString(), streams, a, b, kept);
        }
        sched.Stop();
      });
      sched.RunLoop();
      driver.join();
    }
  }
  nlohmann::json out = {{"bench", "speculative"},
                        {"supernet", o.supernet},
                        {"machine", DescribeCpu()},
                        {"threads", at::get_num_threads()},
                        {"kernel_isa", KernelIsaName(ActiveKernelIsa())},
                        {"weights_dtype", o.weights_dtype},
                        {"draft_weights_dtype", draft_dtype},
                        {"prompts", prompts.size()},
                        {"prompt_tokens", o.prompt_tokens},
                        {"new_tokens", o.new_tokens},
                        {"rounds", o.rounds},
                        {"results", results}};
  WriteReport(o.out_json, out.dump(2), o.out_md, md);
  return 0;
}

}  // namespace
}  // namespace amoeba::bench

int main(int argc, char** argv) {
  amoeba::InitLogging();
  amoeba::bench::Options o;
  CLI::App app{"bench/speculative: decode with a smaller shape of the supernet drafting"};
  app.add_option("--supernet", o.supernet, "Supernet directory (default: the demo supernet)");
  app.add_option("--data", o.data, "Held-out text for the prompts (default: next to it)");
  app.add_option("--prompts", o.prompts)->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--prompt-tokens", o.prompt_tokens)
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--new-tokens", o.new_tokens)->capture_default_str()->check(CLI::Range(2, 400));
  app.add_option("--rounds", o.rounds)->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--threads", o.threads, "Threads (0 = all cores)");
  app.add_option("--weights-dtype", o.weights_dtype, "f32 | f16 | q8_0 | q4_0")
      ->capture_default_str();
  app.add_option("--draft-weights-dtype", o.draft_weights_dtype,
                 "Drafts read their own copy in this format (default: --weights-dtype, no copy)");
  app.add_option("--json", o.out_json)->capture_default_str();
  app.add_option("--md", o.out_md)->capture_default_str();
  if (const std::optional<int> exit_code = amoeba::bench::ParseFlags(app, argc, argv))
    return *exit_code;
  return amoeba::bench::RunBench(o);
}
