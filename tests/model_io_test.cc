// Model files: safetensors round trips, dtypes, sharding, config parsing, and every bad-file case.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/config.h"
#include "model/file_util.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "tests/test_util.h"

namespace amoeba {
namespace model_io_test {  // named: a unity build joins test files
namespace fs = std::filesystem;
using testing::TempDir;

void WriteRaw(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

std::string RawFile(const std::string& header, const std::string& data) {
  std::string s(8, '\0');
  uint64_t n = header.size();
  std::memcpy(s.data(), &n, 8);
  return s + header + data;
}

TEST(SafetensorsTest, SaveLoadModelIsBitExact) {
  TempDir dir;
  Model m = testing::TinyModel();
  m.layers[1].o_bias = at::randn({m.config.hidden_size});  // optional bias round-trips too
  ASSERT_TRUE(SaveModel(m, dir.path()).ok());
  auto loaded = LoadModel(dir.path());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  auto a = NamedWeights(m), b = NamedWeights(*loaded);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].first, b[i].first);
    EXPECT_TRUE(at::equal(a[i].second, b[i].second)) << a[i].first;
  }
  EXPECT_EQ(loaded->config.hidden_size, m.config.hidden_size);
  EXPECT_EQ(loaded->config.num_key_value_heads, 2);
}

TEST(SafetensorsTest, F16AndBF16LoadToExpectedF32) {
  TempDir dir;
  // Values exactly representable in both formats, plus one that rounds.
  at::Tensor t = at::tensor({1.0f, -2.5f, 0.125f, 65504.0f, 3.14159f});
  ASSERT_TRUE(WriteSafetensors(dir.file("h.safetensors"), {{"t", t}}, {}, at::kHalf).ok());
  ASSERT_TRUE(WriteSafetensors(dir.file("b.safetensors"), {{"t", t}}, {}, at::kBFloat16).ok());
  auto h = SafetensorsFile::Open(dir.file("h.safetensors"));
  auto b = SafetensorsFile::Open(dir.file("b.safetensors"));
  ASSERT_TRUE(h.ok() && b.ok());
  EXPECT_EQ((*h)->info("t")->dtype, "F16");
  EXPECT_EQ((*b)->info("t")->dtype, "BF16");
  at::Tensor hf = *(*h)->GetF32("t"), bf = *(*b)->GetF32("t");
  EXPECT_EQ(hf.scalar_type(), at::kFloat);
  EXPECT_FLOAT_EQ(hf[1].item<float>(), -2.5f);
  EXPECT_FLOAT_EQ(hf[3].item<float>(), 65504.0f);
  EXPECT_FLOAT_EQ(hf[4].item<float>(), 3.140625f);  // nearest half
  EXPECT_FLOAT_EQ(bf[2].item<float>(), 0.125f);
  EXPECT_FLOAT_EQ(bf[4].item<float>(), 3.140625f);  // nearest bfloat16
  // Hand-written F16 bytes: 0x3C00 = 1.0, 0xC000 = -2.0.
  std::string data("\x00\x3C\x00\xC0", 4);
  WriteRaw(dir.file("raw.safetensors"),
           RawFile(R"({"x":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})", data));
  auto r = SafetensorsFile::Open(dir.file("raw.safetensors"));
  ASSERT_TRUE(r.ok()) << r.status();
  at::Tensor x = *(*r)->GetF32("x");
  EXPECT_FLOAT_EQ(x[0].item<float>(), 1.0f);
  EXPECT_FLOAT_EQ(x[1].item<float>(), -2.0f);
}

TEST(SafetensorsTest, ShardedCheckpointLoads) {
  TempDir dir;
  Model m = testing::TinyModel();
  auto named = NamedWeights(m);
  NamedTensors s1(named.begin(), named.begin() + named.size() / 2);
  NamedTensors s2(named.begin() + named.size() / 2, named.end());
  ASSERT_TRUE(WriteSafetensors(dir.file("model-00001-of-00002.safetensors"), s1).ok());
  ASSERT_TRUE(WriteSafetensors(dir.file("model-00002-of-00002.safetensors"), s2).ok());
  nlohmann::json idx;
  for (auto& [n, t] : s1) idx["weight_map"][n] = "model-00001-of-00002.safetensors";
  for (auto& [n, t] : s2) idx["weight_map"][n] = "model-00002-of-00002.safetensors";
  ASSERT_TRUE(WriteFileAtomic(dir.file("model.safetensors.index.json"), idx.dump()).ok());
  ASSERT_TRUE(WriteFileAtomic(dir.file("config.json"), ModelConfigToJson(m.config).dump()).ok());
  auto loaded = LoadModel(dir.path());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_TRUE(at::equal(loaded->layers[2].down, m.layers[2].down));
  EXPECT_TRUE(at::equal(loaded->lm_head, m.lm_head));
}

struct BadCase {
  const char* name;
  std::string bytes;
  const char* expect;  // substring of the error message
};

TEST(SafetensorsTest, BadFilesGiveClearErrors) {
  TempDir dir;
  const std::string ok_header = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  std::string len_too_big(8, '\0');
  uint64_t huge = 1ull << 40;
  std::memcpy(len_too_big.data(), &huge, 8);
  std::vector<BadCase> cases = {
      {"empty", "", "truncated"},
      {"short", "abc", "truncated"},
      {"header_len", len_too_big + "{}", "exceeds file size"},
      {"json", RawFile("{not json", ""), "not a JSON object"},
      {"truncated_data", RawFile(ok_header, std::string(4, '\0')), "outside data"},
      {"size_mismatch",
       RawFile(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::string(8, '\0')),
       "does not match"},
      {"dtype",
       RawFile(R"({"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", std::string(8, '\0')),
       "unknown dtype"},
      {"fields", RawFile(R"({"w":{"dtype":"F32"}})", ""), "needs dtype"},
      {"offsets",
       RawFile(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", std::string(8, '\0')),
       "outside data"},
  };
  for (const auto& c : cases) {
    const std::string p = dir.file(std::string(c.name) + ".safetensors");
    WriteRaw(p, c.bytes);
    auto f = SafetensorsFile::Open(p);
    ASSERT_FALSE(f.ok()) << c.name;
    EXPECT_NE(f.status().message().find(c.expect), std::string::npos)
        << c.name << ": " << f.status();
    EXPECT_NE(f.status().message().find(p), std::string::npos)
        << "error names the file: " << f.status();
  }
  EXPECT_EQ(SafetensorsFile::Open(dir.file("missing.safetensors")).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(ModelLoadTest, MissingTensorAndWrongShapeNameTheTensor) {
  TempDir dir;
  Model m = testing::TinyModel();
  ASSERT_TRUE(SaveModel(m, dir.path()).ok());
  // Drop one tensor.
  auto named = NamedWeights(m);
  NamedTensors fewer;
  for (auto& [n, t] : named)
    if (n != "model.layers.1.mlp.up_proj.weight") fewer.emplace_back(n, t);
  ASSERT_TRUE(WriteSafetensors(dir.file("model.safetensors"), fewer).ok());
  auto r = LoadModel(dir.path());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("model.layers.1.mlp.up_proj.weight"), std::string::npos)
      << r.status();
  // Wrong shape.
  NamedTensors wrong;
  for (auto& [n, t] : named) wrong.emplace_back(n, n == "model.norm.weight" ? at::ones({3}) : t);
  ASSERT_TRUE(WriteSafetensors(dir.file("model.safetensors"), wrong).ok());
  r = LoadModel(dir.path());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("model.norm.weight"), std::string::npos);
  EXPECT_NE(r.status().message().find("expected [64]"), std::string::npos) << r.status();
  // No weights at all / broken config.
  fs::remove(dir.file("model.safetensors"));
  EXPECT_EQ(LoadModel(dir.path()).status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(WriteFileAtomic(dir.file("config.json"), "{\"hidden_size\": 8}").ok());
  r = LoadModel(dir.path());
  EXPECT_NE(r.status().message().find("intermediate_size"), std::string::npos) << r.status();
  ASSERT_TRUE(WriteFileAtomic(dir.file("config.json"), "{oops").ok());
  EXPECT_NE(LoadModel(dir.path()).status().message().find("invalid JSON"), std::string::npos);
}

TEST(ConfigTest, ParsesHuggingFaceFields) {
  nlohmann::json j = {{"hidden_size", 2048},
                      {"intermediate_size", 8192},
                      {"num_hidden_layers", 16},
                      {"num_attention_heads", 32},
                      {"num_key_value_heads", 8},
                      {"vocab_size", 128256},
                      {"rms_norm_eps", 1e-5},
                      {"rope_theta", 500000.0},
                      {"tie_word_embeddings", true},
                      {"bos_token_id", 128000},
                      {"eos_token_id", {128001, 128008, 128009}},
                      {"rope_scaling",
                       {{"rope_type", "llama3"},
                        {"factor", 32.0},
                        {"low_freq_factor", 1.0},
                        {"high_freq_factor", 4.0},
                        {"original_max_position_embeddings", 8192}}}};
  auto c = ParseModelConfig(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->group_size(), 4);
  EXPECT_EQ(c->eos_token_ids.size(), 3u);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 32.0);
  // Round trip through JSON keeps everything, including per-layer widths.
  c->layer_kv_heads = std::vector<int64_t>(16, 4);
  c->layer_intermediate = std::vector<int64_t>(16, 1000);
  auto back = ParseModelConfig(ModelConfigToJson(*c));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->layer_kv_heads, c->layer_kv_heads);
  EXPECT_EQ(back->q_heads(3), 16);
  EXPECT_EQ(back->intermediate(3), 1000);
  EXPECT_EQ(back->rope_scaling.original_max_position_embeddings, 8192);
  // Invalid combinations are rejected with a message.
  j["num_key_value_heads"] = 5;
  EXPECT_FALSE(ParseModelConfig(j).ok());
  j["num_key_value_heads"] = 8;
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 2.0}};
  EXPECT_EQ(ParseModelConfig(j).status().code(), absl::StatusCode::kUnimplemented);
}

}  // namespace model_io_test
}  // namespace amoeba
