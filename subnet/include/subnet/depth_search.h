// Depth selection (docs/method.md §2): the dynamic programme over removed layers, plus the two
// baselines (drop the last layers; block-influence ranking). The metric is a callback so that
// perplexity or multiple-choice accuracy plug in the same way.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/weights.h"
#include "subnet/supernet.h"

namespace amoeba {

struct DepthMetric {
  std::string name = "perplexity";
  bool higher_is_better = false;
  // Evaluates the model restricted to `active` layers (ascending).
  std::function<double(const std::vector<int>& active)> eval;
};

struct DepthSearchOptions {
  int64_t num_layers = 0;
  int64_t min_depth = 0;
  int64_t keep_last = 1;    // the last K layers are never removed
  std::string state_path;   // evaluations are cached here so an interrupted search resumes
  std::string fingerprint;  // a state file with another fingerprint is ignored
  bool show_progress = true;
};

// Number of metric evaluations the DP performs: Σ_{n=1..N} min(n, M).
int64_t DpEvaluationCount(int64_t num_layers, int64_t min_depth, int64_t keep_last);

// For every depth in [min_depth, num_layers], the DP's active layers and their metric.
absl::StatusOr<std::vector<DepthEntry>> DpDepthSearch(const DepthSearchOptions& o,
                                                      const DepthMetric& metric);

// Baseline layer sets: the first d-K candidates plus the last K layers.
std::vector<int> DropLastLayers(int64_t num_layers, int64_t depth, int64_t keep_last);
// Block influence 1 - cos(layer input, layer output), averaged over tokens, per layer.
std::vector<double> BlockInfluence(const Model& m, const at::Tensor& windows, int64_t batch = 4);
// Removes the candidates with the lowest influence.
std::vector<int> BlockInfluenceLayers(const std::vector<double>& influence, int64_t depth,
                                      int64_t keep_last);

}  // namespace amoeba
