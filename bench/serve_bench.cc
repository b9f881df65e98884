// bench/serve: load generator against a running amoeba-server. For 1, 4 and 16 concurrent streams
// on one shape, and for mixed shapes, it reports aggregate tokens/s and client-side TTFT and
// inter-token latency percentiles; then the cold-shape switch cost (TTFT of a never-seen shape vs
// a cached one). Bounded in requests and time; loopback only.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "bench/bench_flags.h"
#include "client/amoeba_client.h"

namespace {
using Clock = std::chrono::steady_clock;
using namespace amoeba;

struct Sample {
  std::vector<double> ttft_ms, itl_ms;
  std::map<std::string, std::vector<double>> itl_by_shape;  // "depth,width" -> ITL ms
  int64_t tokens = 0;
  double seconds = 0;
  int errors = 0;
};

double Pct(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

std::string ShapeKey(const v1::Shape& s) {
  char b[64];
  std::snprintf(b, sizeof(b), "%d,%g", s.depth(), s.width());
  return b;
}

// How the streams sample: temperature 0 is greedy; top_p 1 is off.
struct Sampling {
  double temperature = 1.0, top_p = 1.0;
  std::string Describe() const {
    if (temperature <= 0) return "greedy";
    char b[64];
    std::snprintf(b, sizeof(b), top_p < 1 ? "temperature %g, top_p %g" : "temperature %g",
                  temperature, top_p);
    return b;
  }
};
constexpr Sampling kGreedy{0.0, 1.0};

// `streams` clients, each sending `per_stream` requests back to back.
Sample Load(const client::ClientOptions& co, int streams, int per_stream, int tokens,
            const std::vector<v1::Shape>& shapes, const Sampling& sampling = {}) {
  Sample s;
  std::mutex mu;
  const auto t0 = Clock::now();
  std::vector<std::thread> th;
  for (int i = 0; i < streams; ++i) {
    th.emplace_back([&, i] {
      client::Client c(co);
      for (int r = 0; r < per_stream; ++r) {
        v1::GenerateRequest req;
        req.set_text("Once upon a time there was");
        *req.mutable_shape() = shapes[(i + r) % shapes.size()];
        req.set_max_new_tokens(tokens);
        req.mutable_sampling()->set_temperature(sampling.temperature);
        req.mutable_sampling()->set_top_p(sampling.top_p);
        req.mutable_sampling()->set_seed(i * 1000 + r);
        req.add_stop("\x01\x02\x03");
        const auto start = Clock::now();
        auto last = start;
        bool first = true;
        std::vector<double> itl;
        double ttft = 0;
        int64_t n = 0;
        grpc::Status st = c.Generate(req, [&](const v1::GenerateResponse& m) {
          const auto now = Clock::now();
          if (m.token_ids_size() == 0) return;
          if (first) {
            ttft = std::chrono::duration<double, std::milli>(now - start).count();
            first = false;
          } else {
            itl.push_back(std::chrono::duration<double, std::milli>(now - last).count());
          }
          last = now;
          n += m.token_ids_size();
        });
        std::lock_guard<std::mutex> l(mu);
        if (!st.ok()) {
          ++s.errors;
          continue;
        }
        s.ttft_ms.push_back(ttft);
        s.itl_ms.insert(s.itl_ms.end(), itl.begin(), itl.end());
        auto& by = s.itl_by_shape[ShapeKey(req.shape())];
        by.insert(by.end(), itl.begin(), itl.end());
        s.tokens += n;
      }
    });
  }
  for (auto& t : th) t.join();
  s.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return s;
}

// Client options for every (label, address) target, and the first one's model facts; false when
// it cannot be reached.
bool Connect(const std::vector<std::pair<std::string, std::string>>& targets,
             std::vector<client::ClientOptions>* cos, v1::ModelInfo* info) {
  for (const auto& t : targets) {
    client::ClientOptions co;
    co.target = t.second;
    cos->push_back(co);
  }
  client::Client c(cos->front());
  if (!c.GetModelInfo(info).ok()) {
    std::fprintf(stderr, "cannot reach %s\n", cos->front().target.c_str());
    return false;
  }
  return true;
}

// The JSON and Markdown reports (folders made as needed), and the Markdown on stdout.
void WriteReport(const nlohmann::json& out, const std::string& md, const std::string& out_json,
                 const std::string& out_md) {
  for (const std::string& p : {out_json, out_md})  // a bare file name has no parent to create
    if (const auto dir = std::filesystem::path(p).parent_path(); !dir.empty())
      std::filesystem::create_directories(dir);
  std::ofstream(out_json) << out.dump(2) << "\n";
  std::ofstream(out_md) << md;
  std::printf("%s", md.c_str());
}

double Median(std::vector<double> v) {
  return Pct(std::move(v), 0.5);
}

// Many shapes at once: 16 streams (greedy unless `sampling` says otherwise) whose shapes cycle
// over k distinct grid shapes (k = 1, 2, 4, 8; the full shape first, the smallest among the 8),
// on `targets` (label, address): servers of one supernet started with different flags (or
// different builds), measured in interleaved rounds.
int ShapeMix(const std::vector<std::pair<std::string, std::string>>& targets, int rounds,
             int tokens, int requests, const Sampling& sampling, const std::string& out_json,
             const std::string& out_md, const std::string& machine) {
  std::vector<client::ClientOptions> cos;
  v1::ModelInfo info;
  if (!Connect(targets, &cos, &info)) return 1;
  auto shape = [](int d, double w) {
    v1::Shape s;
    s.set_depth(d);
    s.set_width(w);
    return s;
  };
  const int nd = info.depths_size(), nw = info.widths_size();
  const int dmax = info.depths(nd - 1), dmin = info.depths(0), dmid = info.depths(nd / 2);
  const double w0 = info.widths(0), wlast = info.widths(nw - 1), wmid = info.widths(nw / 2);
  const double w1 = info.widths(std::min(1, nw - 1));
  // Eight distinct shapes spread over the grid; the first k are used.
  std::vector<v1::Shape> pool = {shape(dmax, w0), shape(dmin, wlast), shape(dmax, wmid),
                                 shape(dmid, w1), shape(dmax, wlast), shape(dmid, wmid),
                                 shape(dmin, w0), shape(dmid, wlast)};
  for (auto& co : cos)
    for (const auto& s : pool) Load(co, 1, 1, 4, {s}, kGreedy);  // warm-up: every lane built
  const std::vector<int> ks = {1, 2, 4, 8};
  // rate[target][k] over rounds; ITL per shape key (last round's k = 8 run, all rounds pooled).
  std::vector<std::map<int, std::vector<double>>> rate(targets.size());
  std::vector<std::map<std::string, std::vector<double>>> itl8(targets.size());
  for (int r = 0; r < rounds; ++r)
    for (int k : ks)
      for (size_t t = 0; t < targets.size(); ++t) {
        std::vector<v1::Shape> shapes(pool.begin(), pool.begin() + k);
        Sample s = Load(cos[t], 16, requests, tokens, shapes, sampling);
        const double tps = s.errors ? 0.0 : s.tokens / s.seconds;
        rate[t][k].push_back(tps);
        if (k == 8)
          for (auto& [key, v] : s.itl_by_shape)
            itl8[t][key].insert(itl8[t][key].end(), v.begin(), v.end());
        std::fprintf(stderr, "round %d, %d shapes, %s: %.1f tok/s (%d errors)\n", r + 1, k,
                     targets[t].first.c_str(), tps, s.errors);
      }
  nlohmann::json out = {{"machine", machine},
                        {"streams", 16},
                        {"sampling", sampling.Describe()},
                        {"tokens_per_request", tokens},
                        {"requests_per_stream", requests},
                        {"rounds", rounds},
                        {"shapes", nlohmann::json::array()},
                        {"targets", nlohmann::json::array()}};
  for (const auto& s : pool) out["shapes"].push_back(ShapeKey(s));
  std::string md = "# bench/serve: many shapes at once\n\n" + machine + "\n\n16 streams (" +
                   sampling.Describe() +
                   "), shapes cycling over k distinct grid shapes; aggregate "
                   "completion tokens/s, median of " +
                   std::to_string(rounds) +
                   " interleaved rounds; k shapes against one: the median over rounds of each "
                   "round's ratio (the machine's speed drifts between rounds; all rounds in the "
                   "JSON).\n\n";
  md +=
      "| server | 1 shape tok/s | 2 shapes | 4 shapes | 8 shapes | 8 shapes: ITL p50 full / "
      "smallest ms | p99 full / smallest ms |\n|---|---|---|---|---|---|---|\n";
  const std::string full_key = ShapeKey(pool[0]), small_key = ShapeKey(pool[1]);
  for (size_t t = 0; t < targets.size(); ++t) {
    const double base = Median(rate[t][1]);
    nlohmann::json tj = {{"label", targets[t].first}, {"rounds", nlohmann::json::object()}};
    char line[512];
    std::snprintf(line, sizeof(line), "| %s | %.1f |", targets[t].first.c_str(), base);
    md += line;
    for (int k : ks) {
      tj["rounds"][std::to_string(k)] = rate[t][k];
      tj["median_tokens_per_s"][std::to_string(k)] = Median(rate[t][k]);
      if (k == 1) continue;
      std::vector<double> ratios;
      for (size_t r = 0; r < rate[t][k].size(); ++r)
        if (rate[t][1][r] > 0) ratios.push_back(rate[t][k][r] / rate[t][1][r]);
      const double ratio = ratios.empty() ? 0.0 : Median(ratios);
      tj["ratio_to_one_shape"][std::to_string(k)] = ratio;
      std::snprintf(line, sizeof(line), " %.2fx |", ratio);
      md += line;
    }
    for (auto& [key, v] : itl8[t]) {
      tj["itl8_p50_ms"][key] = Pct(v, 0.5);
      tj["itl8_p99_ms"][key] = Pct(v, 0.99);
    }
    std::snprintf(line, sizeof(line), " %.1f / %.1f | %.1f / %.1f |\n", Pct(itl8[t][full_key], 0.5),
                  Pct(itl8[t][small_key], 0.5), Pct(itl8[t][full_key], 0.99),
                  Pct(itl8[t][small_key], 0.99));
    md += line;
    out["targets"].push_back(tj);
  }
  WriteReport(out, md, out_json, out_md);
  return 0;
}

// Overload: the full shape's capacity first (16 closed-loop greedy streams: requests/s and the
// inter-token p50), then open-loop arrivals at `factor` x that rate for `seconds`: every other
// request explicit (the full shape), the rest a budget whose decode target is 1.5x the
// capacity run's inter-token p50. Per server (label, address), in interleaved rounds: the share
// of budget requests that kept their target, refusals, the shapes the planner chose, and the
// explicit requests' latency.
struct Arrival {
  bool budget = false;
  grpc::StatusCode code = grpc::StatusCode::OK;
  double decode_ms = 0, total_ms = 0;  // decode: ms per token after the first
  int64_t tokens = 0;
  std::string shape;
  bool load_changed = false;
};

std::vector<Arrival> OpenLoop(const client::ClientOptions& co, double rate, double seconds,
                              int tokens, const v1::Shape& full, double target_ms) {
  const int n = std::max(1, static_cast<int>(rate * seconds));
  std::vector<Arrival> out(n);
  std::vector<std::thread> th;
  const auto t0 = Clock::now();
  for (int i = 0; i < n; ++i) {
    std::this_thread::sleep_until(t0 + std::chrono::duration<double>(i / rate));
    th.emplace_back([&, i] {
      Arrival& a = out[i];
      a.budget = i % 2 == 1;
      client::Client c(co);
      v1::GenerateRequest req;
      req.set_text("Once upon a time there was");
      if (a.budget) {
        req.mutable_budget()->set_max_decode_ms_per_token(target_ms);
      } else {
        *req.mutable_shape() = full;
      }
      req.set_max_new_tokens(tokens);
      req.mutable_sampling()->set_temperature(0.0);
      req.add_stop("\x01\x02\x03");
      const auto start = Clock::now();
      Clock::time_point first, last;
      int64_t got = 0;
      grpc::Status st = c.Generate(req, [&](const v1::GenerateResponse& m) {
        if (m.has_shape()) a.shape = ShapeKey(m.shape());
        if (m.has_load_plan()) a.load_changed = m.load_plan().load_changed_choice();
        if (m.token_ids_size() == 0) return;
        last = Clock::now();
        if (got == 0) first = last;
        got += m.token_ids_size();
      });
      a.code = st.error_code();
      a.total_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
      a.tokens = got;
      if (got > 1)
        a.decode_ms = std::chrono::duration<double, std::milli>(last - first).count() / (got - 1);
    });
  }
  for (auto& t : th) t.join();
  return out;
}

int Overload(const std::vector<std::pair<std::string, std::string>>& targets, int rounds,
             double factor, double seconds, int tokens, const std::string& out_json,
             const std::string& out_md, const std::string& machine) {
  std::vector<client::ClientOptions> cos;
  v1::ModelInfo info;
  if (!Connect(targets, &cos, &info)) return 1;
  v1::Shape full;
  full.set_depth(info.depths(info.depths_size() - 1));
  full.set_width(info.widths(0));
  for (auto& co : cos) Load(co, 2, 1, 4, {full}, kGreedy);  // warm-up
  // Capacity on the first server (all run the same engine with one shape in flight).
  Sample cap = Load(cos[0], 16, 2, tokens, {full}, kGreedy);
  const double req_per_s = (16.0 * 2) / cap.seconds;
  const double target_ms = 1.5 * Pct(cap.itl_ms, 0.5);
  std::fprintf(stderr, "capacity: %.1f requests/s, ITL p50 %.1f ms; budget target %.1f ms/token\n",
               req_per_s, Pct(cap.itl_ms, 0.5), target_ms);
  std::vector<std::vector<Arrival>> all(targets.size());
  for (int r = 0; r < rounds; ++r)
    for (size_t t = 0; t < targets.size(); ++t) {
      auto a = OpenLoop(cos[t], factor * req_per_s, seconds, tokens, full, target_ms);
      all[t].insert(all[t].end(), a.begin(), a.end());
      std::fprintf(stderr, "round %d, %s: %zu arrivals\n", r + 1, targets[t].first.c_str(),
                   a.size());
    }
  nlohmann::json out = {{"machine", machine},
                        {"capacity_requests_per_s", req_per_s},
                        {"capacity_itl_p50_ms", Pct(cap.itl_ms, 0.5)},
                        {"budget_target_ms", target_ms},
                        {"overload_factor", factor},
                        {"seconds", seconds},
                        {"rounds", rounds},
                        {"tokens_per_request", tokens},
                        {"servers", nlohmann::json::array()}};
  char line[768];
  std::snprintf(
      line, sizeof(line),
      "# bench/serve: overload\n\n%s\n\nCapacity (16 greedy streams, full shape): %.1f "
      "requests/s of %d tokens, inter-token p50 %.1f ms. Then open-loop arrivals at %.1fx "
      "that rate for %.0f s per round (%d rounds, servers interleaved): every other "
      "request names the full shape, the rest carry a budget of %.1f ms/token "
      "(1.5x the capacity run's inter-token p50).\n\n",
      machine.c_str(), req_per_s, tokens, Pct(cap.itl_ms, 0.5), factor, seconds, rounds, target_ms);
  std::string md = line;
  md +=
      "| server | budget: kept target (decode) | whole request within target x tokens | refused | "
      "shapes chosen (load changed the choice) | explicit: done / refused | explicit total p50 / "
      "p99 ms | explicit ms/token p50 / p99 |\n|---|---|---|---|---|---|---|---|\n";
  for (size_t t = 0; t < targets.size(); ++t) {
    int b_total = 0, b_ok = 0, b_met = 0, b_met_whole = 0, b_refused = 0, changed = 0, e_ok = 0,
        e_refused = 0;
    std::map<std::string, int> chosen;
    std::vector<double> e_total, e_decode;
    for (const Arrival& a : all[t]) {
      const bool refused = a.code == grpc::StatusCode::RESOURCE_EXHAUSTED;
      if (a.budget) {
        ++b_total;
        if (refused) ++b_refused;
        if (a.code != grpc::StatusCode::OK) continue;
        ++b_ok;
        b_met += a.decode_ms <= target_ms;
        // The whole request, queue and prefill included, within the target per token.
        b_met_whole += a.tokens > 0 && a.total_ms <= target_ms * static_cast<double>(a.tokens);
        ++chosen[a.shape];
        changed += a.load_changed;
      } else {
        if (refused) ++e_refused;
        if (a.code != grpc::StatusCode::OK) continue;
        ++e_ok;
        e_total.push_back(a.total_ms);
        e_decode.push_back(a.decode_ms);
      }
    }
    std::string shapes;
    for (const auto& [k, v] : chosen)
      shapes += (shapes.empty() ? "" : ", ") + k + ": " + std::to_string(v);
    std::snprintf(line, sizeof(line),
                  "| %s | %d of %d served (%.0f%%) | %d (%.0f%%) | %d of %d | %s (%d) | %d / %d | "
                  "%.0f / %.0f | %.1f / %.1f |\n",
                  targets[t].first.c_str(), b_met, b_ok, b_ok ? 100.0 * b_met / b_ok : 0.0,
                  b_met_whole, b_ok ? 100.0 * b_met_whole / b_ok : 0.0, b_refused, b_total,
                  shapes.c_str(), changed, e_ok, e_refused, Pct(e_total, 0.5), Pct(e_total, 0.99),
                  Pct(e_decode, 0.5), Pct(e_decode, 0.99));
    md += line;
    out["servers"].push_back({{"label", targets[t].first},
                              {"budget_requests", b_total},
                              {"budget_served", b_ok},
                              {"budget_kept_target", b_met},
                              {"budget_whole_request_within_target", b_met_whole},
                              {"budget_refused", b_refused},
                              {"budget_shapes", chosen},
                              {"budget_load_changed_choice", changed},
                              {"explicit_served", e_ok},
                              {"explicit_refused", e_refused},
                              {"explicit_total_p50_ms", Pct(e_total, 0.5)},
                              {"explicit_total_p99_ms", Pct(e_total, 0.99)},
                              {"explicit_decode_p50_ms", Pct(e_decode, 0.5)},
                              {"explicit_decode_p99_ms", Pct(e_decode, 0.99)}});
  }
  WriteReport(out, md, out_json, out_md);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  client::ClientOptions co;
  int tokens = 32, requests = 4;
  std::string out_json = "bench/results/serve.json", out_md = "bench/results/serve.md";
  CLI::App app{"bench/serve: load generator for amoeba-server"};
  app.add_option("--target", co.target)->capture_default_str();
  app.add_option("--tokens", tokens, "New tokens per request")->capture_default_str();
  app.add_option("--requests", requests, "Requests per stream")->capture_default_str();
  app.add_option("--json", out_json)->capture_default_str();
  app.add_option("--md", out_md)->capture_default_str();
  // Many shapes at once (ShapeMix): LABEL=ADDRESS per server, measured in interleaved rounds.
  std::vector<std::string> mix_targets;
  int rounds = 3;
  std::string machine;
  app.add_option("--shape-mix", mix_targets,
                 "Run the many-shapes benchmark against these servers (LABEL=HOST:PORT ...)");
  app.add_option("--rounds", rounds, "Interleaved rounds (--shape-mix)")->capture_default_str();
  app.add_option("--machine", machine, "The machine, for the report")->capture_default_str();
  std::vector<std::string> overload_targets;
  double factor = 2.0, seconds = 15.0;
  app.add_option("--overload", overload_targets,
                 "Run the overload benchmark against these servers (LABEL=HOST:PORT ...)");
  app.add_option("--factor", factor, "Arrival rate over capacity (--overload)")
      ->capture_default_str();
  app.add_option("--seconds", seconds, "Arrival window per round (--overload)")
      ->capture_default_str();
  double temperature = -1, top_p = 1.0;
  app.add_option("--temperature", temperature,
                 "Sampling temperature of the streams (0 = greedy; default: greedy for "
                 "--shape-mix, 1 for the basic run)");
  app.add_option("--top-p", top_p, "Nucleus sampling's top_p of the streams (1 = off)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  if (const std::optional<int> exit_code = amoeba::bench::ParseFlags(app, argc, argv))
    return *exit_code;
  auto sampling_or = [&](double default_temperature) {
    return Sampling{temperature < 0 ? default_temperature : temperature, top_p};
  };
  auto parse_targets = [](const std::vector<std::string>& in,
                          std::vector<std::pair<std::string, std::string>>* out) {
    for (const std::string& t : in) {
      const size_t eq = t.find('=');
      if (eq == std::string::npos) {
        std::fprintf(stderr, "expected LABEL=HOST:PORT, got %s\n", t.c_str());
        return false;
      }
      out->emplace_back(t.substr(0, eq), t.substr(eq + 1));
    }
    return true;
  };
  if (!overload_targets.empty()) {
    std::vector<std::pair<std::string, std::string>> targets;
    if (!parse_targets(overload_targets, &targets)) return 2;
    return Overload(targets, rounds, factor, seconds, tokens, out_json, out_md, machine);
  }
  if (!mix_targets.empty()) {
    std::vector<std::pair<std::string, std::string>> targets;
    if (!parse_targets(mix_targets, &targets)) return 2;
    return ShapeMix(targets, rounds, tokens, requests, sampling_or(0.0), out_json, out_md, machine);
  }

  client::Client c(co);
  v1::ModelInfo info;
  if (!c.GetModelInfo(&info).ok()) {
    std::fprintf(stderr, "cannot reach %s\n", co.target.c_str());
    return 1;
  }
  v1::Shape full;
  full.set_depth(info.depths(info.depths_size() - 1));
  full.set_width(info.widths(0));
  std::vector<v1::Shape> mixed;
  for (int d :
       {info.depths(0), info.depths(info.depths_size() / 2), info.depths(info.depths_size() - 1)}) {
    v1::Shape s;
    s.set_depth(d);
    s.set_width(info.widths(info.widths_size() - 1));
    mixed.push_back(s);
  }
  const Sampling sampling = sampling_or(1.0);
  Load(co, 1, 1, 4, {full});  // warm-up: build the lane
  nlohmann::json out = {{"target", co.target},
                        {"tokens_per_request", tokens},
                        {"sampling", sampling.Describe()},
                        {"runs", nlohmann::json::array()}};
  std::string md = "# bench/serve\n\nStreams sample with " + sampling.Describe() +
                   ".\n\n| scenario | streams | aggregate tok/s | TTFT p50 ms | TTFT p99 ms | ITL "
                   "p50 ms | ITL p99 ms | errors |\n|---|---|---|---|---|---|---|---|\n";
  double single = 0;
  for (auto [name, streams, shapes] : {std::tuple{"one shape", 1, std::vector<v1::Shape>{full}},
                                       std::tuple{"one shape", 4, std::vector<v1::Shape>{full}},
                                       std::tuple{"one shape", 16, std::vector<v1::Shape>{full}},
                                       std::tuple{"mixed shapes", 16, mixed}}) {
    Sample s = Load(co, streams, requests, tokens, shapes, sampling);
    const double rate = s.tokens / s.seconds;
    if (streams == 1) single = rate;
    out["runs"].push_back({{"scenario", name},
                           {"streams", streams},
                           {"tokens_per_s", rate},
                           {"ttft_p50_ms", Pct(s.ttft_ms, 0.5)},
                           {"ttft_p99_ms", Pct(s.ttft_ms, 0.99)},
                           {"itl_p50_ms", Pct(s.itl_ms, 0.5)},
                           {"itl_p99_ms", Pct(s.itl_ms, 0.99)},
                           {"errors", s.errors}});
    char line[256];
    std::snprintf(line, sizeof(line), "| %s | %d | %.1f | %.1f | %.1f | %.2f | %.2f | %d |\n", name,
                  streams, rate, Pct(s.ttft_ms, 0.5), Pct(s.ttft_ms, 0.99), Pct(s.itl_ms, 0.5),
                  Pct(s.itl_ms, 0.99), s.errors);
    md += line;
    std::fprintf(stderr, "%s", line);
  }
  // Cold vs cached shape: TTFT of the first request on a shape never used, then the same again.
  std::vector<double> cold, warm;
  for (int d : info.depths()) {
    for (double w : info.widths()) {
      if (d == full.depth() && w == full.width()) continue;
      v1::Shape s;
      s.set_depth(d);
      s.set_width(w);
      Sample a = Load(co, 1, 1, 2, {s});
      Sample b = Load(co, 1, 1, 2, {s});
      if (!a.ttft_ms.empty() && !b.ttft_ms.empty()) {
        cold.push_back(a.ttft_ms[0]);
        warm.push_back(b.ttft_ms[0]);
      }
    }
  }
  const double cold50 = Pct(cold, 0.5), warm50 = Pct(warm, 0.5);
  out["cold_ttft_p50_ms"] = cold50;
  out["cached_ttft_p50_ms"] = warm50;
  char tail[512];
  const double agg16 = out["runs"][2]["tokens_per_s"].get<double>();
  std::snprintf(tail, sizeof(tail),
                "\nAggregate at 16 streams / 1 stream (one shape): %.2fx. Never-seen shape TTFT "
                "p50 %.1f ms vs cached "
                "%.1f ms (%.2fx) over %zu shapes.\n",
                agg16 / single, cold50, warm50, warm50 > 0 ? cold50 / warm50 : 0.0, cold.size());
  md += tail;
  out["aggregate_16_over_1"] = agg16 / single;
  WriteReport(out, md, out_json, out_md);
  return 0;
}
