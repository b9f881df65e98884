// GGUF: the container round-trips typed metadata and tensors and refuses corrupt files with the
// file and the key or tensor named; models exported as llama (uniform) or deci (per-layer widths,
// head-free and MLP-free layers with compensation biases) read back with the same logits, in
// f32 exactly and in the block formats equal to Amoeba's own kernels on the same values.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "model/engine.h"
#include "model/gguf.h"
#include "model/gguf_model.h"
#include "model/gguf_tokenizer.h"
#include "model/packed_linear.h"
#include "model/presets.h"
#include "model/quantized_panels.h"
#include "model/tokenizer.h"
#include "model/tokenizer_train.h"
#include "model/torch_forward.h"
#include "tests/test_util.h"

namespace amoeba {
namespace gguf_test {  // named: a unity build joins test files

using testing::MaxAbsDiff;
using testing::TempDir;
using testing::TinyModel;

GgufExportOptions Opts(WeightFormat f) {
  GgufExportOptions o;
  o.format = f;
  return o;
}

at::Tensor Ids() {
  at::manual_seed(3);
  return at::randint(0, 97, {2, 11}, at::kLong);
}

// A subnet-like model: layer 0 full, layer 1 narrower (2 of 4 heads, 40 channels: odd rows
// for the block formats), layer 2 head-free and MLP-free with compensation biases.
Model NonUniformModel() {
  Model m = TinyModel(7);
  const int64_t hd = m.config.head_dim;
  LayerWeights& l1 = m.layers[1];
  l1.q = l1.q.narrow(0, 0, 2 * hd).contiguous();
  l1.k = l1.k.narrow(0, 0, hd).contiguous();
  l1.v = l1.v.narrow(0, 0, hd).contiguous();
  l1.o = l1.o.narrow(1, 0, 2 * hd).contiguous();
  l1.gate = l1.gate.narrow(0, 0, 40).contiguous();
  l1.up = l1.up.narrow(0, 0, 40).contiguous();
  l1.down = l1.down.narrow(1, 0, 40).contiguous();
  l1.o_bias = at::randn({64}) * 0.1;
  LayerWeights& l2 = m.layers[2];
  l2.q = at::empty({0, 64});
  l2.k = at::empty({0, 64});
  l2.v = at::empty({0, 64});
  l2.o = at::empty({64, 0});
  l2.gate = at::empty({0, 64});
  l2.up = at::empty({0, 64});
  l2.down = at::empty({64, 0});
  l2.o_bias = at::randn({64}) * 0.1;
  l2.down_bias = at::randn({64}) * 0.1;
  m.SyncConfigWithWeights();
  return m;
}

TEST(GgufTest, ContainerRoundTripsMetadataAndTensors) {
  TempDir dir;
  GgufWriter w;
  w.SetString("general.architecture", "test");
  w.SetU32("a.u", 7);
  w.SetI32("a.i", -3);
  w.SetF32("a.f", 0.5f);
  w.SetBool("a.b", true);
  w.SetStringArray("a.s", {"x", "", "yz"});
  w.SetI32Array("a.arr", {1, 2, 3});
  at::Tensor t = at::arange(6, at::kFloat);
  w.AddTensor("t", GgmlType::kF32, {3, 2}, t);
  w.AddTensor("h", GgmlType::kF16, {5}, at::ones({5}).to(at::kHalf));
  ASSERT_TRUE(w.Write(dir.file("x.gguf")).ok());
  auto f = ReadGguf(dir.file("x.gguf"));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->version, 3u);
  EXPECT_EQ(*f->GetString("general.architecture"), "test");
  EXPECT_EQ(*f->GetInt("a.u"), 7);
  EXPECT_EQ(*f->GetInt("a.i"), -3);
  EXPECT_EQ(*f->GetFloat("a.f"), 0.5);
  EXPECT_EQ(f->meta.at("a.b").i, 1);
  EXPECT_EQ(f->meta.at("a.s").array.at(2).s, "yz");
  EXPECT_EQ(*f->GetIntArray("a.arr", 3), (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(*f->GetIntArray("a.u", 2), (std::vector<int64_t>{7, 7}));  // scalar for every layer
  EXPECT_FALSE(f->GetIntArray("a.arr", 4).ok());
  EXPECT_FALSE(f->GetString("a.u").ok());
  const GgufTensorInfo* ti = f->Find("t");
  ASSERT_NE(ti, nullptr);
  EXPECT_EQ(ti->ne, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(ti->offset % 32, 0u);
  EXPECT_EQ(std::memcmp(ti->data, t.data_ptr<float>(), 24), 0);
  EXPECT_EQ(f->Find("h")->offset, 32u);  // 24 bytes, aligned up to 32
}

// Every corruption is an error naming the file and what is wrong, never a crash.
TEST(GgufTest, CorruptFilesAreClearErrors) {
  TempDir dir;
  Model m = TinyModel(2);
  const std::string good = dir.file("m.gguf");
  ASSERT_TRUE(SaveGguf(m, good, Opts(WeightFormat::kF32)).ok());
  std::string bytes;
  {
    std::ifstream in(good, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto expect = [&](const std::string& data, const std::string& needle) {
    const std::string p = dir.file("bad.gguf");
    std::ofstream(p, std::ios::binary) << data;
    auto r = LoadGgufModel(p);
    ASSERT_FALSE(r.ok()) << needle;
    EXPECT_NE(std::string(r.status().message()).find(needle), std::string::npos)
        << r.status() << " (want " << needle << ")";
    EXPECT_NE(std::string(r.status().message()).find("bad.gguf"), std::string::npos);
  };
  expect("GGUF", "too short");
  std::string b = bytes;
  b[0] = 'X';
  expect(b, "bad magic");
  b = bytes;
  b[4] = 9;
  expect(b, "version 9");
  for (size_t cut : {size_t{40}, bytes.size() / 3, bytes.size() - 10}) {
    const std::string t = bytes.substr(0, cut);
    const std::string p = dir.file("bad.gguf");
    std::ofstream(p, std::ios::binary) << t;
    auto r = LoadGgufModel(p);
    ASSERT_FALSE(r.ok()) << cut;
    const std::string msg(r.status().message());
    EXPECT_TRUE(msg.find("truncated") != std::string::npos ||
                msg.find("past the end") != std::string::npos)
        << msg;
  }
  // A tensor of the wrong shape, and one missing.
  GgufWriter w;
  w.SetString("general.architecture", "llama");
  w.SetU32("llama.embedding_length", 64);
  w.SetU32("llama.block_count", 1);
  w.SetU32("llama.attention.head_count", 4);
  w.SetU32("llama.feed_forward_length", 96);
  w.SetF32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  w.AddTensor("token_embd.weight", GgmlType::kF32, {64, 97}, at::zeros({97, 64}));
  w.AddTensor("output_norm.weight", GgmlType::kF32, {63}, at::zeros({63}));
  ASSERT_TRUE(w.Write(dir.file("bad.gguf")).ok());
  auto r = LoadGgufModel(dir.file("bad.gguf"));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find("output_norm.weight is [63]"), std::string::npos)
      << r.status();
  GgufWriter w2;
  w2.SetString("general.architecture", "gpt2");
  ASSERT_TRUE(w2.Write(dir.file("bad.gguf")).ok());
  r = LoadGgufModel(dir.file("bad.gguf"));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find("architecture gpt2"), std::string::npos);
}

// Uniform: architecture llama; f32 reads back bit for bit (logits equal); q/k rows are stored
// as interleaved rotary pairs (row 2j of a head = HF row j, row 2j+1 = HF row j + hd/2: rotating
// pairs (2j, 2j+1) then equals HF's rotate-half on (j, j + hd/2)); the BPE tokenizer goes along.
TEST(GgufTest, UniformModelIsLlamaAndReadsBackExactly) {
  TempDir dir;
  at::InferenceMode g;
  Model m = TinyModel(4);
  ASSERT_TRUE(WriteByteTokenizer(dir.path()).ok());
  GgufExportOptions o = Opts(WeightFormat::kF32);
  o.tokenizer_dir = dir.path();
  ASSERT_EQ(GgufArchitectureFor(m), "llama");
  ASSERT_TRUE(SaveGguf(m, dir.file("m.gguf"), o).ok());
  auto f = ReadGguf(dir.file("m.gguf"));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(*f->GetString("general.architecture"), "llama");
  EXPECT_EQ(*f->GetInt("llama.attention.head_count_kv"), 2);
  EXPECT_EQ(*f->GetString("tokenizer.ggml.model"), "gpt2");
  EXPECT_EQ(f->meta.at("tokenizer.ggml.tokens").array.size(), 97u);
  const GgufTensorInfo* q = f->Find("blk.0.attn_q.weight");
  ASSERT_NE(q, nullptr);
  const auto* qd = reinterpret_cast<const float*>(q->data);
  const int64_t hd = 16, H = 64;
  for (int64_t h = 0; h < 4; ++h)
    for (int64_t j = 0; j < hd / 2; ++j) {
      EXPECT_EQ(qd[(h * hd + 2 * j) * H + 5], m.layers[0].q[h * hd + j][5].item<float>());
      EXPECT_EQ(qd[(h * hd + 2 * j + 1) * H + 5],
                m.layers[0].q[h * hd + j + hd / 2][5].item<float>());
    }
  auto back = LoadGgufModel(dir.file("m.gguf"));
  ASSERT_TRUE(back.ok()) << back.status();
  const at::Tensor ids = Ids();
  EXPECT_LT(MaxAbsDiff(TorchForward(*back, ids), TorchForward(m, ids)), 1e-5);
  // Tied embeddings write no output.weight and read back tied.
  Model tied = TinyModel(5, 2, /*tie=*/true);
  ASSERT_TRUE(SaveGguf(tied, dir.file("t.gguf"), Opts(WeightFormat::kF32)).ok());
  auto tb = LoadGgufModel(dir.file("t.gguf"));
  ASSERT_TRUE(tb.ok());
  EXPECT_TRUE(tb->config.tie_word_embeddings);
  EXPECT_LT(MaxAbsDiff(TorchForward(*tb, ids), TorchForward(tied, ids)), 1e-5);
}

// A uniform-width export of a pruned shape carries zero q/k/v/gate/up biases (HF has one bias
// flag per block). llama.cpp's `llama` graph sizes a q bias by the embedding width and refused
// such files ("attn_q.bias has wrong shape; expected 256, got 192"): zero biases are left out,
// the compensation biases (o, down) stay, and the logits read back the same.
TEST(GgufTest, ZeroProjectionBiasesAreLeftOutAndCompensationBiasesKept) {
  TempDir dir;
  at::InferenceMode g;
  Model m = TinyModel(4);
  for (auto& l : m.layers) {
    l.q_bias = at::zeros({l.q.size(0)});
    l.k_bias = at::zeros({l.k.size(0)});
    l.v_bias = at::zeros({l.v.size(0)});
    l.gate_bias = at::zeros({l.gate.size(0)});
    l.up_bias = at::zeros({l.up.size(0)});
    l.o_bias = at::randn({m.config.hidden_size}) * 0.1;
    l.down_bias = at::randn({m.config.hidden_size}) * 0.1;
  }
  m.config.attention_bias = m.config.mlp_bias = true;
  ASSERT_TRUE(SaveGguf(m, dir.file("m.gguf"), Opts(WeightFormat::kF32)).ok());
  auto f = ReadGguf(dir.file("m.gguf"));
  ASSERT_TRUE(f.ok()) << f.status();
  for (const char* gone :
       {"attn_q.bias", "attn_k.bias", "attn_v.bias", "ffn_gate.bias", "ffn_up.bias"})
    EXPECT_EQ(f->Find(absl::StrCat("blk.0.", gone)), nullptr) << gone;
  EXPECT_NE(f->Find("blk.0.attn_output.bias"), nullptr);
  EXPECT_NE(f->Find("blk.0.ffn_down.bias"), nullptr);
  int64_t bytes = 0;
  for (const auto& t : f->tensors) bytes += (t.bytes + 31) / 32 * 32;
  EXPECT_EQ(GgufTensorBytes(m, WeightFormat::kF32), bytes);
  auto back = LoadGgufModel(dir.file("m.gguf"));
  ASSERT_TRUE(back.ok()) << back.status();
  const at::Tensor ids = Ids();
  EXPECT_LT(MaxAbsDiff(TorchForward(*back, ids), TorchForward(m, ids)), 1e-5);
}

// Per-layer widths: architecture deci with per-layer arrays (a head-free layer as one zero KV
// group, an MLP-free layer as one zero channel), biases kept: the logits read back equal.
TEST(GgufTest, NonUniformModelIsDeciAndReadsBackExactly) {
  TempDir dir;
  at::InferenceMode g;
  Model m = NonUniformModel();
  ASSERT_EQ(GgufArchitectureFor(m), "deci");
  ASSERT_TRUE(SaveGguf(m, dir.file("d.gguf"), Opts(WeightFormat::kF32)).ok());
  auto f = ReadGguf(dir.file("d.gguf"));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(*f->GetString("general.architecture"), "deci");
  EXPECT_EQ(*f->GetIntArray("deci.attention.head_count", 3), (std::vector<int64_t>{4, 2, 2}));
  EXPECT_EQ(*f->GetIntArray("deci.attention.head_count_kv", 3), (std::vector<int64_t>{2, 1, 1}));
  EXPECT_EQ(*f->GetIntArray("deci.feed_forward_length", 3), (std::vector<int64_t>{96, 40, 1}));
  EXPECT_NE(f->Find("blk.2.attn_output.bias"), nullptr);
  EXPECT_NE(f->Find("blk.2.ffn_down.bias"), nullptr);
  EXPECT_NE(f->Find("blk.1.attn_output.bias"), nullptr);
  auto back = LoadGgufModel(dir.file("d.gguf"));
  ASSERT_TRUE(back.ok()) << back.status();
  const at::Tensor ids = Ids();
  const at::Tensor want = TorchForward(m, ids);
  EXPECT_LT(MaxAbsDiff(TorchForward(*back, ids), want), 1e-5);
  // The engine on the read-back model too (the dummy group decodes to the bias alone).
  auto shared = std::make_shared<const Model>(std::move(*back));
  Engine e(shared, {.max_len = 32});
  KVCache cache = e.NewCache(1);
  std::vector<int32_t> tok;
  for (int64_t t = 0; t < ids.size(1); ++t)
    tok.push_back(static_cast<int32_t>(ids[0][t].item<int64_t>()));
  SeqInput in{0, tok};
  auto logits = e.Forward(cache, {&in, 1}, true);
  ASSERT_TRUE(logits.ok());
  EXPECT_LT(MaxAbsDiff(*logits, want[0]), 1e-4);
}

// The block formats: the file holds Q8_0 / Q4_0 rows (f16 where a row is not a multiple of 32),
// and the model read back, packed in the same format, decodes exactly as Amoeba's kernels do on
// the original weights in that format (the GGML values requantize to themselves); f16 reads back
// within f16 rounding.
TEST(GgufTest, BlockFormatsHoldTheServedValues) {
  TempDir dir;
  at::InferenceMode g;
  const at::Tensor ids = Ids();
  for (WeightFormat format : {WeightFormat::kQ8_0, WeightFormat::kQ4_0}) {
    for (bool uniform : {true, false}) {
      Model m = uniform ? TinyModel(8) : NonUniformModel();
      const std::string p = dir.file("q.gguf");
      ASSERT_TRUE(SaveGguf(m, p, Opts(format)).ok());
      auto f = ReadGguf(p);
      ASSERT_TRUE(f.ok());
      const GgmlType want_type = format == WeightFormat::kQ8_0 ? GgmlType::kQ8_0 : GgmlType::kQ4_0;
      EXPECT_EQ(f->Find("blk.0.ffn_up.weight")->type, want_type);
      if (!uniform) {
        EXPECT_EQ(f->Find("blk.1.ffn_down.weight")->type, GgmlType::kF16);  // rows of 40
      }
      // GGML's byte layout, decoded here by hand (fp16 d, then int8 q or nibbles: low = the
      // first 16 of the block, high = the last 16, offset 8), equals what Amoeba's panels serve.
      {
        const GgufTensorInfo* t = f->Find("blk.0.ffn_up.weight");
        const at::Tensor served =
            DequantizePanels(PackPanels(m.layers[0].up, format), m.layers[0].up.size(0), 64)[0];
        const uint8_t* row = t->data;  // row 0: 2 blocks of 32
        for (int b = 0; b < 2; ++b) {
          at::Half d;
          std::memcpy(&d, row, 2);
          for (int k = 0; k < 32; ++k) {
            const int q = format == WeightFormat::kQ8_0
                              ? static_cast<int8_t>(row[2 + k])
                              : (k < 16 ? (row[2 + k] & 15) : (row[2 + k - 16] >> 4)) - 8;
            EXPECT_EQ(static_cast<float>(d) * q, served[b * 32 + k].item<float>()) << b << " " << k;
          }
          row += format == WeightFormat::kQ8_0 ? 34 : 18;
        }
      }
      // The size the planner counts is the data section's, exactly.
      int64_t end = 0;
      for (const GgufTensorInfo& t : f->tensors)
        end = std::max<int64_t>(end, static_cast<int64_t>(t.offset) + (t.bytes + 31) / 32 * 32);
      EXPECT_EQ(end, GgufTensorBytes(m, format));
      auto back = LoadGgufModel(p);
      ASSERT_TRUE(back.ok()) << back.status();
      // Reference: the original in Amoeba's format; the embedding as the file holds it, and rows
      // the file keeps in f16 rounded to f16.
      Model ref = m;
      ref.embed = back->embed;
      if (!uniform) ref.layers[1].down = m.layers[1].down.to(at::kHalf).to(at::kFloat);
      PackWeights(ref, format);
      Model got = std::move(*back);
      PackWeights(got, format);
      auto run = [&](const Model& model) {
        Engine e(std::make_shared<const Model>(model), {.max_len = 32});
        KVCache cache = e.NewCache(1);
        std::vector<int32_t> tok;
        for (int64_t t = 0; t < ids.size(1); ++t)
          tok.push_back(static_cast<int32_t>(ids[0][t].item<int64_t>()));
        SeqInput in{0, tok};
        return e.Forward(cache, {&in, 1}, true)->clone();
      };
      const at::Tensor a = run(ref), b = run(got);
      EXPECT_LT(MaxAbsDiff(a, b), 1e-4 * a.abs().max().item<double>())
          << WeightFormatName(format) << (uniform ? " uniform" : " deci");
    }
  }
  Model m = TinyModel(9);
  ASSERT_TRUE(SaveGguf(m, dir.file("h.gguf"), Opts(WeightFormat::kF16)).ok());
  auto h = LoadGgufModel(dir.file("h.gguf"));
  ASSERT_TRUE(h.ok());
  const at::Tensor want = TorchForward(m, ids);
  EXPECT_LT(MaxAbsDiff(TorchForward(*h, ids), want), 1e-2 * want.abs().max().item<double>());
  EXPECT_GT(MaxAbsDiff(TorchForward(*h, ids), want), 0.0);
}

// SentencePiece: the file carries tokenizer.model's pieces as llama.cpp's "llama" vocabulary: the
// same piece strings, the control/unknown/byte types (3/2/6) and the pieces' scores, padded up to
// the model's vocabulary with UNUSED entries.
TEST(GgufTest, SentencePieceVocabularyGoesAlong) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "no SentencePiece in sanitizer builds (the runtime refuses RTLD_DEEPBIND)";
#endif
  TempDir dir;
  {
    std::ofstream f(dir.file("corpus.txt"));
    const char* words[] = {"the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park"};
    uint64_t x = 11;
    for (int line = 0; line < 2000; ++line)
      for (int w = 0; w < 8; ++w) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        f << words[(x >> 33) % 10] << (w < 7 ? " " : ".\n");
      }
  }
  TokenizerTrainOptions to;
  to.vocab_size = 300;
  ASSERT_TRUE(TrainSentencePiece(dir.file("corpus.txt"), dir.path(), to).ok());
  auto tok = LoadTokenizer(dir.path());
  ASSERT_TRUE(tok.ok()) << tok.status();
  ModelConfig c = testing::TinyConfig();
  c.vocab_size = (*tok)->vocab_size() + 5;  // a padded embedding
  Model m = RandomModel(c, 3);
  GgufExportOptions o = Opts(WeightFormat::kF16);
  o.tokenizer_dir = dir.path();
  ASSERT_TRUE(SaveGguf(m, dir.file("sp.gguf"), o).ok());
  auto f = ReadGguf(dir.file("sp.gguf"));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(*f->GetString("tokenizer.ggml.model"), "llama");
  const auto& tokens = f->meta.at("tokenizer.ggml.tokens").array;
  const auto& types = f->meta.at("tokenizer.ggml.token_type").array;
  const auto& scores = f->meta.at("tokenizer.ggml.scores").array;
  ASSERT_EQ(tokens.size(), static_cast<size_t>(c.vocab_size));
  ASSERT_EQ(types.size(), tokens.size());
  ASSERT_EQ(scores.size(), tokens.size());
  EXPECT_EQ(tokens[0].s, "<unk>");
  EXPECT_EQ(types[0].i, 2);  // UNKNOWN
  EXPECT_EQ(tokens[1].s, "<s>");
  EXPECT_EQ(types[1].i, 3);  // CONTROL
  EXPECT_EQ(types[3].i, 6);  // BYTE (<0x00>)
  EXPECT_EQ(tokens[3].s, "<0x00>");
  // A merged piece: "▁the" encodes " the" and is NORMAL with a (negative) merge score.
  const auto ids = (*tok)->Encode("the");
  ASSERT_EQ(ids.size(), 1u);
  EXPECT_EQ(tokens[ids[0]].s, "\xe2\x96\x81the");
  EXPECT_EQ(types[ids[0]].i, 1);
  EXPECT_LT(scores[ids[0]].f, 0.0);
  EXPECT_EQ(types.back().i, 5);  // padding: UNUSED
  // Read back: the embedded tokenizer.model, and one rebuilt from the vocabulary alone, encode
  // and decode as the original.
  o.embed_tokenizer = false;
  ASSERT_TRUE(SaveGguf(m, dir.file("bare.gguf"), o).ok());
  for (const char* file : {"sp.gguf", "bare.gguf"}) {
    auto back = LoadGgufTokenizer(dir.file(file));
    ASSERT_TRUE(back.ok()) << back.status();
    for (const char* text : {"the cat sat on the mat.", "a dog ran to the park", "zebra 123 ~"}) {
      EXPECT_EQ((*back)->Encode(text), (*tok)->Encode(text)) << file << ": " << text;
      EXPECT_EQ((*back)->Decode((*tok)->Encode(text)), (*tok)->Decode((*tok)->Encode(text)));
    }
  }
}

// The BPE tokenizer read back from the file: embedded tokenizer.json, or rebuilt from tokens and
// merges (byte-level, GPT-2 pre-tokenizer); a file without a vocabulary is NOT_FOUND.
TEST(GgufTest, BpeTokenizerReadsBack) {
  TempDir dir;
  ASSERT_TRUE(WriteByteTokenizer(dir.path()).ok());
  auto tok = LoadTokenizer(dir.path());
  ASSERT_TRUE(tok.ok());
  ModelConfig c = testing::TinyConfig();
  c.vocab_size = (*tok)->vocab_size();
  Model m = RandomModel(c, 4);
  for (bool embed : {true, false}) {
    GgufExportOptions o = Opts(WeightFormat::kF16);
    o.tokenizer_dir = dir.path();
    o.embed_tokenizer = embed;
    ASSERT_TRUE(SaveGguf(m, dir.file("b.gguf"), o).ok());
    auto back = LoadGgufTokenizer(dir.file("b.gguf"));
    ASSERT_TRUE(back.ok()) << back.status();
    for (const char* text : {"Hello, world!", "  two  spaces", "caf\xc3\xa9 42"})
      EXPECT_EQ((*back)->Encode(text), (*tok)->Encode(text)) << embed << ": " << text;
  }
  ASSERT_TRUE(SaveGguf(m, dir.file("none.gguf"), Opts(WeightFormat::kF16)).ok());
  EXPECT_EQ(LoadGgufTokenizer(dir.file("none.gguf")).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace gguf_test
}  // namespace amoeba
