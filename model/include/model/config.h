// LlamaForCausalLM config.json, plus optional per-layer widths so that a pruned subnet is an
// ordinary model (the layer list simply has fewer entries and narrower matrices).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"

namespace amoeba {

struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3 };
  Type type = Type::kNone;
  double factor = 1.0;
  // llama3 only.
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;  // hidden_size / num_attention_heads when absent from the file.
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  bool mlp_bias = false;
  int64_t bos_token_id = 1;
  std::vector<int64_t> eos_token_ids = {2};
  std::string torch_dtype = "float32";

  // Per-layer widths; empty means every layer has the full width. Stored in config.json as
  // "amoeba_layer_num_key_value_heads" and "amoeba_layer_intermediate_size".
  std::vector<int64_t> layer_kv_heads;
  std::vector<int64_t> layer_intermediate;

  int64_t group_size() const { return num_attention_heads / num_key_value_heads; }
  int64_t kv_heads(int64_t layer) const;
  int64_t q_heads(int64_t layer) const { return kv_heads(layer) * group_size(); }
  int64_t intermediate(int64_t layer) const;
  bool uniform_width() const { return layer_kv_heads.empty() && layer_intermediate.empty(); }

  // Parameter count of all weights (embedding, layers, norms, head).
  int64_t ParameterCount() const;
};

absl::StatusOr<ModelConfig> ParseModelConfig(const nlohmann::json& j);
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path);
nlohmann::json ModelConfigToJson(const ModelConfig& c);
absl::Status ValidateModelConfig(const ModelConfig& c);

}  // namespace amoeba
