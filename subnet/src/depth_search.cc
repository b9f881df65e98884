#include "subnet/depth_search.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "model/file_util.h"
#include "model/progress.h"
#include "model/torch_forward.h"

namespace amoeba {
using nlohmann::json;

int64_t DpEvaluationCount(int64_t L, int64_t min_depth, int64_t keep_last) {
  const int64_t N = L - keep_last, M = L - min_depth;
  int64_t n_eval = 0;
  for (int64_t n = 1; n <= N; ++n) n_eval += std::min(n, M);
  return n_eval;
}

namespace {

std::vector<int> ActiveFromRemoved(int64_t L, const std::vector<int>& removed) {
  std::vector<int> active;
  for (int l = 0; l < L; ++l)
    if (std::find(removed.begin(), removed.end(), l) == removed.end()) active.push_back(l);
  return active;
}

// Evaluations cached by removed set, persisted after each one.
class EvalCache {
 public:
  EvalCache(std::string path, std::string fingerprint)
      : path_(std::move(path)), fp_(std::move(fingerprint)) {
    if (path_.empty() || !std::filesystem::exists(path_)) return;
    auto text = ReadFile(path_);
    if (!text.ok()) return;
    json j = json::parse(*text, nullptr, false);
    if (j.is_discarded() || j.value("fingerprint", "") != fp_) return;
    for (auto& [k, v] : j["evaluations"].items()) values_[k] = v.get<double>();
  }
  size_t size() const { return values_.size(); }
  std::optional<double> Get(const std::string& key) const {
    auto it = values_.find(key);
    if (it == values_.end()) return std::nullopt;
    return it->second;
  }
  absl::Status Put(const std::string& key, double v) {
    values_[key] = v;
    if (path_.empty()) return absl::OkStatus();
    json j = {{"fingerprint", fp_}, {"evaluations", values_}};
    return WriteFileAtomic(path_, j.dump());
  }

 private:
  std::string path_, fp_;
  std::map<std::string, double> values_;
};

}  // namespace

absl::StatusOr<std::vector<DepthEntry>> DpDepthSearch(const DepthSearchOptions& o,
                                                      const DepthMetric& metric) {
  const int64_t L = o.num_layers, K = o.keep_last;
  const int64_t N = L - K, M = L - o.min_depth;
  if (K < 0 || N < 0) return absl::InvalidArgumentError("depth search: keep_last out of range");
  if (o.min_depth < K || o.min_depth > L || M > N) {
    return absl::InvalidArgumentError(absl::StrCat("depth search: min depth ", o.min_depth,
                                                   " must be in [", std::max<int64_t>(K, 1), ", ",
                                                   L, "]"));
  }
  auto better = [&](double a, double b) { return metric.higher_is_better ? a > b : a < b; };
  EvalCache cache(o.state_path, o.fingerprint);
  const int64_t total = DpEvaluationCount(L, o.min_depth, K);
  std::unique_ptr<Progress> bar;
  if (o.show_progress) bar = std::make_unique<Progress>("depth DP", total, 0);

  // S[n][m]: removed set; D[n][m]: its metric. Row n-1 is all we need for row n.
  std::vector<std::optional<std::vector<int>>> S_prev(M + 1), S_cur(M + 1);
  std::vector<double> D_prev(M + 1, 0), D_cur(M + 1, 0);
  S_prev[0] = std::vector<int>{};
  for (int64_t n = 1; n <= N; ++n) {
    S_cur.assign(M + 1, std::nullopt);
    S_cur[0] = std::vector<int>{};
    for (int64_t m = 1; m <= std::min(n, M); ++m) {
      std::vector<int> cand = *S_prev[m - 1];
      cand.push_back(static_cast<int>(N - n));
      std::sort(cand.begin(), cand.end());
      const std::string key = absl::StrJoin(cand, ",");
      double v;
      if (auto cached = cache.Get(key)) {
        v = *cached;
      } else {
        v = metric.eval(ActiveFromRemoved(L, cand));
        auto st = cache.Put(key, v);
        if (!st.ok()) return st;
      }
      if (bar) bar->Advance(1, absl::StrCat("n=", n, " m=", m, " ", metric.name, "=", v));
      if (!S_prev[m] || better(v, D_prev[m])) {
        S_cur[m] = cand;
        D_cur[m] = v;
      } else {
        S_cur[m] = S_prev[m];
        D_cur[m] = D_prev[m];
      }
    }
    S_prev.swap(S_cur);
    D_prev.swap(D_cur);
  }
  if (bar) bar->Finish();
  std::vector<DepthEntry> out;
  for (int64_t d = o.min_depth; d <= L; ++d) {
    const int64_t m = L - d;
    DepthEntry e;
    e.depth = d;
    if (m == 0) {
      e.layers = ActiveFromRemoved(L, {});
      auto cached = cache.Get("");
      e.metric = cached ? *cached : metric.eval(e.layers);
      (void)cache.Put("", e.metric);
    } else {
      e.layers = ActiveFromRemoved(L, *S_prev[m]);
      e.metric = D_prev[m];
    }
    out.push_back(std::move(e));
  }
  return out;
}

std::vector<int> DropLastLayers(int64_t L, int64_t depth, int64_t keep_last) {
  std::vector<int> active;
  for (int l = 0; l < depth - keep_last; ++l) active.push_back(l);
  for (int64_t l = L - keep_last; l < L; ++l) active.push_back(static_cast<int>(l));
  return active;
}

std::vector<double> BlockInfluence(const Model& m, const at::Tensor& windows, int64_t batch) {
  at::InferenceMode guard;
  std::vector<double> sum(m.layers.size(), 0.0);
  int64_t count = 0;
  TorchForwardOptions opt;
  opt.on_layer = [&](int layer, const at::Tensor& in, const at::Tensor& out) {
    sum[layer] += (1 - at::cosine_similarity(in, out, -1)).sum().item<double>();
  };
  for (int64_t b = 0; b < windows.size(0); b += batch) {
    at::Tensor w = windows.narrow(0, b, std::min(batch, windows.size(0) - b));
    TorchHidden(m, w, opt);
    count += w.numel();
  }
  for (double& s : sum) s /= std::max<int64_t>(count, 1);
  return sum;
}

std::vector<int> BlockInfluenceLayers(const std::vector<double>& bi, int64_t depth,
                                      int64_t keep_last) {
  const int64_t L = static_cast<int64_t>(bi.size()), N = L - keep_last;
  std::vector<int> cand(N);
  std::iota(cand.begin(), cand.end(), 0);
  std::stable_sort(cand.begin(), cand.end(), [&](int a, int b) { return bi[a] < bi[b]; });
  std::vector<int> removed(cand.begin(), cand.begin() + (L - depth));
  std::vector<int> active;
  for (int l = 0; l < L; ++l)
    if (std::find(removed.begin(), removed.end(), l) == removed.end()) active.push_back(l);
  return active;
}

}  // namespace amoeba
