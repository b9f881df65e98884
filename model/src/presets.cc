#include "model/presets.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "model/file_util.h"

namespace amoeba {

std::vector<std::string> PresetNames() {
  return {"tiny", "quality", "quality-small", "quality-mini", "100m", "tinyllama"};
}

absl::StatusOr<ModelConfig> PresetConfig(const std::string& name) {
  ModelConfig c;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  if (name == "tiny") {
    c.hidden_size = 64;
    c.intermediate_size = 176;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.vocab_size = 512;
    c.max_position_embeddings = 512;
  } else if (name == "quality") {
    // bench/quality's model worth pruning: 12 layers, ~16M parameters with a 3000-token vocabulary,
    // pretrainable on 2 cores in under an hour.
    c.hidden_size = 320;
    c.intermediate_size = 896;
    c.num_hidden_layers = 12;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 4;
    c.vocab_size = 3000;
    c.max_position_embeddings = 512;
  } else if (name == "quality-small" || name == "quality-mini") {
    // bench/quality's trained models. quality-small: 2.3M parameters, so that an hour on one core
    // sees ~5 tokens per parameter (the quality preset sees 0.13); a model far from trained keeps
    // redundancy a real checkpoint does not have. quality-mini: the same with 4 layers (1.56M
    // parameters, ~1.7x the steps per second), so two hours of two cores reach ~58 tokens per
    // parameter, where held-out perplexity has stopped improving (scripts/quality-model).
    c.hidden_size = 128;
    c.intermediate_size = 384;
    c.num_hidden_layers = name == "quality-mini" ? 4 : 8;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.vocab_size = 3000;
    c.max_position_embeddings = 512;
  } else if (name == "100m") {
    c.hidden_size = 768;
    c.intermediate_size = 2048;
    c.num_hidden_layers = 12;
    c.num_attention_heads = 12;
    c.num_key_value_heads = 12;
    c.vocab_size = 32000;
    c.max_position_embeddings = 2048;
  } else if (name == "tinyllama") {
    c.hidden_size = 2048;
    c.intermediate_size = 5632;
    c.num_hidden_layers = 22;
    c.num_attention_heads = 32;
    c.num_key_value_heads = 4;
    c.vocab_size = 32000;
    c.max_position_embeddings = 2048;
    c.rms_norm_eps = 1e-5;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown preset '", name,
                     "' (tiny, quality, quality-small, quality-mini, 100m, tinyllama)"));
  }
  c.head_dim = c.hidden_size / c.num_attention_heads;
  return c;
}

absl::Status WriteByteTokenizer(const std::string& dir) {
  using nlohmann::json;
  // GPT-2's byte→code point map, so the vocabulary is a standard byte-level BPE vocabulary.
  json vocab = json::object();
  vocab["<unk>"] = 0;
  vocab["<s>"] = 1;
  vocab["</s>"] = 2;
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    const int cp = keep ? b : 256 + n++;
    std::string s;
    if (cp < 0x80) {
      s.push_back(static_cast<char>(cp));
    } else {
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    vocab[s] = 3 + b;
  }
  json j = {
      {"version", "1.0"},
      {"added_tokens",
       {{{"id", 0}, {"content", "<unk>"}, {"special", true}},
        {{"id", 1}, {"content", "<s>"}, {"special", true}},
        {{"id", 2}, {"content", "</s>"}, {"special", true}}}},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}}}};
  std::filesystem::create_directories(dir);
  return WriteFileAtomic((std::filesystem::path(dir) / "tokenizer.json").string(), j.dump() + "\n");
}

}  // namespace amoeba
