// A supernet directory (docs/supernet-format.md): permuted HF weights + amoeba.json (shape grid,
// depth table, width table, provenance, profile) + width.safetensors (activation means and
// compensation biases). From it any grid shape becomes an ordinary Model whose matrices are prefix
// views of the supernet's (no weight copies).
#pragma once
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "model/tokenizer.h"
#include "model/weight_format.h"
#include "model/weights.h"
#include "subnet/shape.h"
#include "subnet/width_importance.h"

namespace amoeba {

struct DepthEntry {
  int64_t depth = 0;
  std::vector<int> layers;  // active layers, ascending
  double metric = 0;        // calibration metric of this layer set at full width
  // Baselines at the same depth: name → (layers, metric).
  std::map<std::string, std::pair<std::vector<int>, double>> baselines;
};

struct WidthEntry {
  double ratio = 1.0;
  WidthAllocation alloc;
};

// One row of amoeba.json's "profile": what was measured for one grid shape. Sizes and bytes are
// not stored: they follow from the model and the dtype it is served in.
struct ShapeRecord {
  Shape shape;
  int64_t params = 0;
  std::optional<double> heldout_perplexity;   // `amoeba-admin eval` on held-out text
  std::optional<double> decode_ms_per_token;  // on the host that ran eval
  std::optional<double> mc_accuracy;          // multiple-choice accuracy, in [0, 1]
  bool adapters = false;                      // measured with the SMoL adapters
  // Speculative decoding with this shape as the target (eval, held-out text): per draft shape
  // (its ToString), P(r) that r = 0..8 of its guesses in a row agree (subnet/speculation.h).
  std::map<std::string, std::vector<double>> draft_runs;
  // Checking k drafted tokens in one step costs a decode step plus k times this (eval host).
  std::optional<double> check_ms_per_extra_token;
  // Decode ms per token from panels of other formats (`eval --draft-weights-dtype`: what a draft
  // of this shape costs when it reads its own copy in that format), by format name.
  std::map<std::string, double> decode_ms_by_dtype;
};

struct SupernetSpec {
  std::vector<int64_t> depths;  // ascending
  std::vector<double> widths;   // descending, widths[0] == 1
  std::string metric = "perplexity";
  std::vector<DepthEntry> depth_table;
  std::vector<WidthEntry> width_table;
  nlohmann::json calibration = nlohmann::json::object();  // provenance
  std::vector<ShapeRecord> profile;                       // per-shape figures
  nlohmann::json smol;                                    // adapters config, null when untuned

  const DepthEntry* FindDepth(int64_t d) const;
  const WidthEntry* FindWidth(double w) const;
  ShapeRecord* FindRecord(const Shape& s);
  const ShapeRecord* FindRecord(const Shape& s) const;
  nlohmann::json ToJson() const;
  static absl::StatusOr<SupernetSpec> FromJson(const nlohmann::json& j, int64_t num_layers);
};

enum class ExtractMode {
  kSliced,  // narrowed views: the real, fast subnet
  kMasked,  // full-width copies with removed units zeroed: only to check equivalence
};

class Supernet {
 public:
  // Loads a finished supernet directory; errors name the missing or corrupt piece.
  static absl::StatusOr<std::unique_ptr<Supernet>> Load(const std::string& dir);
  // Builds one in memory (calibration, tests, benchmarks).
  Supernet(Model permuted, SupernetSpec spec, std::vector<at::Tensor> o_mean,
           std::vector<at::Tensor> down_mean);

  const Model& base() const { return base_; }
  const SupernetSpec& spec() const { return spec_; }
  const std::string& dir() const { return dir_; }
  const Tokenizer* tokenizer() const { return tokenizer_.get(); }

  // Checks that `shape` is on the grid (the message names the field).
  absl::Status Validate(const Shape& s) const;
  absl::StatusOr<Model> Extract(const Shape& s, ExtractMode mode = ExtractMode::kSliced) const;
  // Any allocation (e.g. uniform widths), with the layers of `depth`.
  absl::StatusOr<Model> ExtractWith(int64_t depth, const WidthAllocation& alloc,
                                    ExtractMode mode) const;
  // Shapes of the grid, largest first.
  std::vector<Shape> GridShapes() const;
  // Index of grid width `w` in spec().widths (-1 if not on the grid).
  int64_t WidthIndex(double w) const;
  Shape FullShape() const { return {base_.config.num_hidden_layers, 1.0}; }
  Shape SmallestShape() const { return {spec_.depths.front(), spec_.widths.back()}; }

  // Packs the supernet's projections and LM head into decode panels of format `f` (f16 halves
  // decode bytes, q8_0 and q4_0 quarter and eighth them), once, so that every subnet view shares
  // them, and releases the row-major pages (they stay readable from the file for merging adapters
  // and export). Call before serving.
  void PackBaseWeights(WeightFormat f);

  // Writes amoeba.json and width.safetensors into `dir` (the HF files are written separately).
  absl::Status SaveMetadata(const std::string& dir) const;
  void set_spec(SupernetSpec s) { spec_ = std::move(s); }

 private:
  at::Tensor Bias(int64_t layer, bool attention, int64_t kept) const;

  std::string dir_;
  Model base_;
  SupernetSpec spec_;
  std::vector<at::Tensor> o_mean_, down_mean_;
  std::unique_ptr<Tokenizer> tokenizer_;
  mutable std::mutex bias_mu_;
  mutable std::map<std::tuple<int64_t, bool, int64_t>, at::Tensor> bias_cache_;
};

}  // namespace amoeba
