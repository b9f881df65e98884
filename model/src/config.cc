#include "model/config.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "model/file_util.h"
#include "model/status_macros.h"

namespace amoeba {
using nlohmann::json;

int64_t ModelConfig::kv_heads(int64_t layer) const {
  return layer_kv_heads.empty() ? num_key_value_heads : layer_kv_heads.at(layer);
}

int64_t ModelConfig::intermediate(int64_t layer) const {
  return layer_intermediate.empty() ? intermediate_size : layer_intermediate.at(layer);
}

int64_t ModelConfig::ParameterCount() const {
  int64_t n = vocab_size * hidden_size * (tie_word_embeddings ? 1 : 2) + hidden_size;
  for (int64_t l = 0; l < num_hidden_layers; ++l) {
    const int64_t q = q_heads(l) * head_dim, kv = kv_heads(l) * head_dim;
    n += 2 * hidden_size;                               // norms
    n += hidden_size * (q + 2 * kv) + q * hidden_size;  // q,k,v,o
    n += 3 * hidden_size * intermediate(l);             // gate, up, down
    if (attention_bias) n += q + 2 * kv + hidden_size;
    if (mlp_bias) n += 2 * intermediate(l) + hidden_size;
  }
  return n;
}

namespace {

template <typename T>
absl::Status Get(const json& j, const char* key, T* out, bool required) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required)
      return absl::InvalidArgumentError(absl::StrCat("config.json: missing '", key, "'"));
    return absl::OkStatus();
  }
  try {
    *out = it->get<T>();
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("config.json: bad '", key, "': ", e.what()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(const json& j) {
  if (!j.is_object()) return absl::InvalidArgumentError("config.json: not a JSON object");
  ModelConfig c;
  RETURN_IF_ERROR(Get(j, "hidden_size", &c.hidden_size, true));
  RETURN_IF_ERROR(Get(j, "intermediate_size", &c.intermediate_size, true));
  RETURN_IF_ERROR(Get(j, "num_hidden_layers", &c.num_hidden_layers, true));
  RETURN_IF_ERROR(Get(j, "num_attention_heads", &c.num_attention_heads, true));
  c.num_key_value_heads = c.num_attention_heads;
  RETURN_IF_ERROR(Get(j, "num_key_value_heads", &c.num_key_value_heads, false));
  RETURN_IF_ERROR(Get(j, "vocab_size", &c.vocab_size, true));
  if (c.num_attention_heads > 0) c.head_dim = c.hidden_size / c.num_attention_heads;
  RETURN_IF_ERROR(Get(j, "head_dim", &c.head_dim, false));
  RETURN_IF_ERROR(Get(j, "max_position_embeddings", &c.max_position_embeddings, false));
  RETURN_IF_ERROR(Get(j, "rms_norm_eps", &c.rms_norm_eps, false));
  RETURN_IF_ERROR(Get(j, "rope_theta", &c.rope_theta, false));
  RETURN_IF_ERROR(Get(j, "tie_word_embeddings", &c.tie_word_embeddings, false));
  RETURN_IF_ERROR(Get(j, "attention_bias", &c.attention_bias, false));
  RETURN_IF_ERROR(Get(j, "mlp_bias", &c.mlp_bias, false));
  RETURN_IF_ERROR(Get(j, "bos_token_id", &c.bos_token_id, false));
  RETURN_IF_ERROR(Get(j, "torch_dtype", &c.torch_dtype, false));
  if (auto it = j.find("eos_token_id"); it != j.end() && !it->is_null()) {
    if (it->is_array()) {
      c.eos_token_ids = it->get<std::vector<int64_t>>();
    } else if (it->is_number_integer()) {
      c.eos_token_ids = {it->get<int64_t>()};
    } else {
      return absl::InvalidArgumentError("config.json: 'eos_token_id' must be an int or a list");
    }
  }
  if (auto it = j.find("rope_scaling"); it != j.end() && it->is_object()) {
    std::string type;
    if (it->contains("rope_type"))
      type = (*it)["rope_type"].get<std::string>();
    else if (it->contains("type"))
      type = (*it)["type"].get<std::string>();
    RETURN_IF_ERROR(Get(*it, "factor", &c.rope_scaling.factor, type != "default"));
    if (type == "linear") {
      c.rope_scaling.type = RopeScaling::Type::kLinear;
    } else if (type == "llama3") {
      c.rope_scaling.type = RopeScaling::Type::kLlama3;
      RETURN_IF_ERROR(Get(*it, "low_freq_factor", &c.rope_scaling.low_freq_factor, true));
      RETURN_IF_ERROR(Get(*it, "high_freq_factor", &c.rope_scaling.high_freq_factor, true));
      RETURN_IF_ERROR(Get(*it, "original_max_position_embeddings",
                          &c.rope_scaling.original_max_position_embeddings, true));
    } else if (type != "default") {
      return absl::UnimplementedError(absl::StrCat("config.json: rope_scaling type '", type,
                                                   "' is not supported (linear, llama3)"));
    }
  }
  RETURN_IF_ERROR(Get(j, "amoeba_layer_num_key_value_heads", &c.layer_kv_heads, false));
  RETURN_IF_ERROR(Get(j, "amoeba_layer_intermediate_size", &c.layer_intermediate, false));
  RETURN_IF_ERROR(ValidateModelConfig(c));
  return c;
}

absl::Status ValidateModelConfig(const ModelConfig& c) {
  auto bad = [](const std::string& m) { return absl::InvalidArgumentError("config: " + m); };
  if (c.hidden_size <= 0 || c.intermediate_size <= 0 || c.num_hidden_layers <= 0 ||
      c.num_attention_heads <= 0 || c.num_key_value_heads <= 0 || c.vocab_size <= 0 ||
      c.head_dim <= 0) {
    return bad("sizes must be positive");
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return bad("num_attention_heads must be a multiple of num_key_value_heads");
  }
  if (c.head_dim % 2 != 0) return bad("head_dim must be even (rotary embedding)");
  // Bounds that keep every size product far from int64 overflow.
  constexpr int64_t kMaxDim = int64_t{1} << 24;
  for (int64_t v : {c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                    c.vocab_size, c.head_dim})
    if (v > kMaxDim) return bad("a size exceeds 2^24");
  if (c.max_position_embeddings <= 0) return bad("max_position_embeddings must be positive");
  if (!(c.rope_theta > 0 && std::isfinite(c.rope_theta))) return bad("rope_theta must be > 0");
  if (!(c.rms_norm_eps > 0 && c.rms_norm_eps < 1)) return bad("rms_norm_eps must be in (0, 1)");
  if (!(c.rope_scaling.factor > 0 && std::isfinite(c.rope_scaling.factor)))
    return bad("rope_scaling.factor must be > 0");
  if (c.bos_token_id < 0 || c.bos_token_id >= c.vocab_size)
    return bad(absl::StrCat("bos_token_id ", c.bos_token_id, " outside [0, vocab_size)"));
  for (int64_t e : c.eos_token_ids)
    if (e < 0 || e >= c.vocab_size)
      return bad(absl::StrCat("eos_token_id ", e, " outside [0, vocab_size)"));
  if (!c.layer_kv_heads.empty() &&
      static_cast<int64_t>(c.layer_kv_heads.size()) != c.num_hidden_layers) {
    return bad("amoeba_layer_num_key_value_heads must have num_hidden_layers entries");
  }
  if (!c.layer_intermediate.empty() &&
      static_cast<int64_t>(c.layer_intermediate.size()) != c.num_hidden_layers) {
    return bad("amoeba_layer_intermediate_size must have num_hidden_layers entries");
  }
  for (int64_t v : c.layer_kv_heads)
    if (v < 1 || v > c.num_key_value_heads) return bad("per-layer kv heads out of [1, kv heads]");
  for (int64_t v : c.layer_intermediate)
    if (v < 1 || v > c.intermediate_size)
      return bad("per-layer intermediate size out of [1, intermediate_size]");
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": invalid JSON"));
  auto c = ParseModelConfig(j);
  if (!c.ok())
    return absl::Status(c.status().code(), absl::StrCat(path, ": ", c.status().message()));
  return c;
}

json ModelConfigToJson(const ModelConfig& c) {
  json j;
  j["architectures"] = {"LlamaForCausalLM"};
  j["model_type"] = "llama";
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.head_dim;
  j["vocab_size"] = c.vocab_size;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["attention_bias"] = c.attention_bias;
  j["mlp_bias"] = c.mlp_bias;
  j["hidden_act"] = "silu";
  j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_ids.size() == 1)
    j["eos_token_id"] = c.eos_token_ids[0];
  else
    j["eos_token_id"] = c.eos_token_ids;
  j["torch_dtype"] = c.torch_dtype;
  switch (c.rope_scaling.type) {
    case RopeScaling::Type::kNone:
      j["rope_scaling"] = nullptr;
      break;
    case RopeScaling::Type::kLinear:
      j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", c.rope_scaling.factor}};
      break;
    case RopeScaling::Type::kLlama3:
      j["rope_scaling"] = {
          {"rope_type", "llama3"},
          {"factor", c.rope_scaling.factor},
          {"low_freq_factor", c.rope_scaling.low_freq_factor},
          {"high_freq_factor", c.rope_scaling.high_freq_factor},
          {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings}};
      break;
  }
  if (!c.layer_kv_heads.empty()) j["amoeba_layer_num_key_value_heads"] = c.layer_kv_heads;
  if (!c.layer_intermediate.empty()) j["amoeba_layer_intermediate_size"] = c.layer_intermediate;
  return j;
}

}  // namespace amoeba
