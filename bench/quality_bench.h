// bench/quality's shared state: flags, the stage bookkeeping (each stage's result is a JSON file
// under OUT/stages/) and the report writer's entry point (quality_report.cc).
#pragma once
#include <ATen/ATen.h>

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "distill/train_data.h"
#include "model/file_util.h"
#include "subnet/calibration_data.h"
#include "subnet/supernet.h"

namespace amoeba::bench {

struct Flags {
  std::string model;   // HF model directory (the quality preset by default, see bench/quality)
  std::string corpus;  // train.txt, calib.txt, heldout.txt, cloze.jsonl, cloze-calib.jsonl
  std::string out = "bench/results/quality";
  std::vector<uint64_t> seeds = {1, 2};
  int64_t tune_steps = 40;
  int64_t tune_batch = 4;
  int64_t seq_len = 128;
  double lr = 1e-3;  // the demo's tuning rate; fixed before any evaluation
  // Calibration as `amoeba-admin calibrate` does it: 128 windows (16k tokens) for the width
  // statistics, a prefix of 8 for the DP and the layer sensitivities, no BOS at window starts.
  int64_t calib_windows = 128, calib_window_len = 128, dp_windows = 8;
  bool calib_bos = false;
  // The width stage's rank correlations: every KV group and this many sampled MLP channels per
  // layer, each removed alone (compensated) on the first `width_unit_windows` calibration windows.
  int64_t width_units = 8, width_unit_windows = 32;
  std::vector<std::string> only_stages;  // empty = every stage
  int64_t eval_windows = 32, eval_window_len = 128;
  int64_t mc_items = 100;    // evaluation cloze items (held-out documents)
  int64_t dp_mc_items = 40;  // cloze items for the accuracy DP (calibration documents)
  int threads = 0;
  bool report_only = false;
};

// The depth tables compared: the DP (perplexity), its baselines, and the DP on cloze accuracy.
inline const std::vector<std::string> kDepthMethods = {"dp", "drop_last", "block_influence",
                                                       "dp_accuracy"};

struct Bench {
  Flags f;
  std::filesystem::path stages, work;
  std::unique_ptr<Supernet> supernet;  // the calibrated one (DP perplexity depth table)
  at::Tensor heldout;                  // evaluation windows
  std::vector<MultipleChoiceItem> mc, dp_mc;
  std::optional<TrainData> train;  // tokenized once for all tuning runs
  std::string host;

  std::optional<nlohmann::json> Done(const std::string& name) const {
    auto text = ReadFile((stages / (name + ".json")).string());
    if (!text.ok()) return std::nullopt;
    nlohmann::json j = nlohmann::json::parse(*text, nullptr, false);
    if (j.is_discarded()) return std::nullopt;
    return j;
  }
  absl::Status Finish(const std::string& name, nlohmann::json j) const {
    j["stage"] = name;
    return WriteFileAtomic((stages / (name + ".json")).string(), j.dump(1));
  }
};

// The grid's middle shape (the "alone_middle" baseline's).
Shape MiddleShape(const Supernet& s);

// Rewrites OUT/quality.json, OUT/quality.md and the figures from every finished stage.
absl::Status WriteQualityReport(const Bench& b);

}  // namespace amoeba::bench
