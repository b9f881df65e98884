// Evaluation of a supernet's shapes, the one implementation `amoeba-admin eval` and
// bench/quality share: held-out perplexity, optional multiple-choice accuracy, the served
// format's KL divergence to fp32, decode latency as the server decodes, greedy agreement for
// speculative decoding; Evaluate also writes the figures into the supernet's per-shape profile
// and draws the quality-vs-latency frontier.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "lora/smol.h"
#include "model/weight_format.h"
#include "subnet/metrics.h"
#include "subnet/supernet.h"

namespace amoeba {

struct ShapeQualityOptions {
  std::vector<MultipleChoiceItem> mc;  // multiple-choice items (none: no accuracy)
  // Shapes that get the accuracy (empty: every shape, when there are items).
  std::vector<Shape> mc_shapes;
  // Also decode each shape from panels of this format and compare with fp32 (KL, perplexity).
  WeightFormat format = WeightFormat::kF32;
  bool greedy = false;         // keep each shape's greedy next token at every position
  std::string label = "eval";  // progress bar
};

// One row per shape: depth, width, params, heldout_perplexity, [mc_accuracy], [kl_to_fp32,
// engine_perplexity_fp32, engine_perplexity]. With `greedy`, `greedy_next` gets [N, T] per shape.
absl::StatusOr<nlohmann::json> EvaluateShapeQuality(const Supernet& s, const Smol* smol,
                                                    const std::vector<Shape>& shapes,
                                                    const at::Tensor& windows,
                                                    const ShapeQualityOptions& o,
                                                    std::vector<at::Tensor>* greedy_next = nullptr);

struct EvalOptions {
  std::string supernet, data, mc_data;
  std::vector<Shape> shapes;  // empty: the grid; depth 0 = full depth
  int64_t windows = 16, window_len = 128;
  uint64_t seed = 1;
  bool adapters = true;  // with smol.safetensors when there is one
  WeightFormat format = WeightFormat::kF32;
  std::optional<WeightFormat> draft_format;  // also time shapes as draft copies in this format
  std::string svg;                           // "" = SUPERNET/frontier.svg
};

struct EvalReport {
  nlohmann::json rows;  // EvaluateShapeQuality's, plus decode/predicted/fitted ms, frontier
  std::vector<Shape> shapes;
  SupernetSpec spec;  // as saved, with the profile and draft runs
  std::vector<double> decode_ms, draft_ms, check_extra_ms;  // per shape
  bool adapters = false;
  std::string svg;
};

// Evaluates, merges the figures into the supernet's profile (amoeba.json, atomically) and writes
// the frontier plot.
absl::StatusOr<EvalReport> Evaluate(const EvalOptions& o);

}  // namespace amoeba
