// `amoeba-admin calibrate`: HF model + calibration text → supernet directory (docs/method.md §1-2).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "subnet/depth_search.h"
#include "subnet/supernet.h"

namespace amoeba {

struct CalibrateOptions {
  std::string model_dir;      // an HF model directory, or a llama .gguf file
  std::string tokenizer_dir;  // for a .gguf model (default: the file's directory)
  std::string data_path;      // .txt or .jsonl with "text"
  std::string out_dir;
  // Calibration windows: the width statistics see all of them (128 x 256 = 32k tokens; FLAP's
  // reference used 1024 x 128), the DP and the layer sensitivities a prefix of `dp_windows`.
  int64_t windows = 128;
  int64_t window_len = 256;
  // Windows are random spans of the text; a BOS at every window start is what a model sees only
  // at a document's start, so it is off unless the model was trained that way.
  bool window_bos = false;
  int64_t dp_windows = 8;  // windows per DP evaluation (a prefix of the above)
  uint64_t seed = 0;
  double min_depth_ratio = 0.6;  // d_min = ceil(ratio * L)
  std::vector<double> widths = {1.0, 0.875, 0.75, 0.625};
  int64_t keep_last = 1;
  bool uniform_width = false;
  // "removal" (the removal error times each layer's measured sensitivity), "flap" (the paper's
  // FLAP scores) or "magnitude". bench/quality: removal scores are at or below FLAP's held-out
  // perplexity at every grid width on both of its presets, by far on the trained one
  // (docs/method.md §1).
  std::string width_scores = "removal";
  std::string metric = "perplexity";  // or "accuracy" (needs mc_data)
  std::string mc_data;                // multiple-choice JSONL
  int64_t batch = 4;
  bool force = false;  // overwrite an existing supernet
};

// Shape grid, width table and depth table for a model already permuted by score. `depth_metric`
// drives the DP; `bi_windows` feed the block-influence baseline.
struct SupernetBuild {
  std::unique_ptr<Supernet> supernet;
  std::string table;  // human-readable DP vs baselines table
};

// In memory: statistics, permutation, width table, depth DP and baselines.
absl::StatusOr<SupernetBuild> BuildSupernet(Model model, const at::Tensor& windows,
                                            const at::Tensor& dp_windows, const CalibrateOptions& o,
                                            const DepthMetric* custom_metric = nullptr,
                                            const std::string& dp_state_path = "");

// Per-shape profile rows with the static figures (parameters); eval adds measurements.
std::vector<ShapeRecord> StaticProfile(const Supernet& s);

// The whole command: loads, builds, writes `out_dir`, prints the table.
absl::StatusOr<std::unique_ptr<Supernet>> Calibrate(const CalibrateOptions& o);

}  // namespace amoeba
