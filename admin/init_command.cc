// amoeba-admin init: writes a randomly initialised LLaMA in Hugging Face format.
#include <spdlog/spdlog.h>

#include <filesystem>
#include <memory>

#include "absl/strings/str_cat.h"
#include "admin/commands.h"
#include "model/file_util.h"
#include "model/presets.h"
#include "model/status_macros.h"
#include "model/tokenizer.h"
#include "model/tokenizer_train.h"
#include "model/weights.h"

namespace amoeba::admin {
namespace fs = std::filesystem;

namespace {
struct InitOptions {
  std::string out;
  std::string preset = "tiny";
  std::string tokenizer = "bytes";  // "bytes", a directory/file with tokenizer.model|json
  std::string train_tokenizer;      // text file to train a SentencePiece tokenizer on
  int tokenizer_vocab = 4096;
  int64_t hidden = 0, intermediate = 0, layers = 0, heads = 0, kv_heads = 0, vocab = 0;
  int64_t max_positions = 0;
  bool tie = false;
  uint64_t seed = 0;
  std::string dtype = "f32";
};

absl::Status RunInit(const InitOptions& o) {
  ASSIGN_OR_RETURN(ModelConfig c, PresetConfig(o.preset));
  if (o.hidden) c.hidden_size = o.hidden;
  if (o.intermediate) c.intermediate_size = o.intermediate;
  if (o.layers) c.num_hidden_layers = o.layers;
  if (o.heads) c.num_attention_heads = o.heads;
  if (o.kv_heads)
    c.num_key_value_heads = o.kv_heads;
  else if (o.heads)
    c.num_key_value_heads = o.heads;
  if (o.max_positions) c.max_position_embeddings = o.max_positions;
  c.tie_word_embeddings = o.tie;
  if (o.heads || o.hidden) c.head_dim = c.hidden_size / c.num_attention_heads;
  at::ScalarType dtype = at::kFloat;
  if (o.dtype == "f16")
    dtype = at::kHalf;
  else if (o.dtype == "bf16")
    dtype = at::kBFloat16;
  else if (o.dtype != "f32")
    return absl::InvalidArgumentError("--dtype: f32, f16 or bf16");

  // Build into a temp directory, then move into place: an interrupted init leaves nothing.
  const std::string tmp = o.out + ".tmp-init";
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", tmp, ": ", ec.message()));

  if (!o.train_tokenizer.empty()) {
    TokenizerTrainOptions to;
    to.vocab_size = o.tokenizer_vocab;
    spdlog::info("init: training a SentencePiece tokenizer (vocab {}) on {}", to.vocab_size,
                 o.train_tokenizer);
    RETURN_IF_ERROR(TrainSentencePiece(o.train_tokenizer, tmp, to));
  } else if (o.tokenizer == "bytes") {
    RETURN_IF_ERROR(WriteByteTokenizer(tmp));
  } else {
    fs::path src = o.tokenizer;
    std::vector<fs::path> files;
    if (fs::is_directory(src)) {
      for (const char* f : {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"})
        if (fs::exists(src / f)) files.push_back(src / f);
    } else if (fs::exists(src)) {
      files.push_back(src);
    }
    if (files.empty())
      return absl::NotFoundError(absl::StrCat("--tokenizer: no tokenizer at ", o.tokenizer));
    for (const auto& f : files)
      fs::copy_file(f, fs::path(tmp) / f.filename(), fs::copy_options::overwrite_existing);
  }
  ASSIGN_OR_RETURN(auto tok, LoadTokenizer(tmp));
  if (o.vocab) {
    c.vocab_size = o.vocab;
  } else if (o.preset == "tiny" || !o.train_tokenizer.empty()) {
    c.vocab_size = tok->vocab_size();  // small models: the tokenizer decides
  }
  if (c.vocab_size < tok->vocab_size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--vocab ", c.vocab_size, " is smaller than the tokenizer's ", tok->vocab_size()));
  }
  RETURN_IF_ERROR(ValidateModelConfig(c));
  spdlog::info(
      "init: {} params (hidden {}, layers {}, heads {}/{}, intermediate {}, vocab {}), seed {}",
      c.ParameterCount(), c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
      c.num_key_value_heads, c.intermediate_size, c.vocab_size, o.seed);
  Model m = RandomModel(c, o.seed);
  RETURN_IF_ERROR(SaveModel(m, tmp, dtype));
  RETURN_IF_ERROR(ReplaceDirectory(tmp, o.out));
  spdlog::info("init: wrote {}", o.out);
  return absl::OkStatus();
}
}  // namespace

Runner AddInitCommand(CLI::App& app) {
  auto o = std::make_shared<InitOptions>();
  CLI::App* cmd = app.add_subcommand("init", "Write a randomly initialised model in HF format");
  cmd->add_option("--out", o->out, "Output directory")->required();
  cmd->add_option("--preset", o->preset,
                  "tiny | quality | quality-small | quality-mini | 100m | tinyllama")
      ->capture_default_str();
  cmd->add_option("--tokenizer", o->tokenizer,
                  "'bytes' (byte-level BPE, no merges) or a tokenizer.model/tokenizer.json file or "
                  "directory")
      ->capture_default_str();
  cmd->add_option("--train-tokenizer", o->train_tokenizer,
                  "Train a SentencePiece tokenizer on this text file");
  cmd->add_option("--tokenizer-vocab", o->tokenizer_vocab, "Vocabulary of the trained tokenizer")
      ->capture_default_str();
  cmd->add_option("--hidden", o->hidden, "Override hidden_size");
  cmd->add_option("--intermediate", o->intermediate, "Override intermediate_size");
  cmd->add_option("--layers", o->layers, "Override num_hidden_layers");
  cmd->add_option("--heads", o->heads, "Override num_attention_heads");
  cmd->add_option("--kv-heads", o->kv_heads, "Override num_key_value_heads");
  cmd->add_option("--vocab", o->vocab, "Override vocab_size (>= the tokenizer's)");
  cmd->add_option("--max-positions", o->max_positions, "Override max_position_embeddings");
  cmd->add_flag("--tie", o->tie, "Tie the LM head to the embedding");
  cmd->add_option("--seed", o->seed, "Random seed")->capture_default_str();
  cmd->add_option("--dtype", o->dtype, "On-disk dtype: f32 | f16 | bf16")->capture_default_str();
  return [o]() {
    absl::Status st = RunInit(*o);
    if (!st.ok()) spdlog::error("init: {}", st.ToString());
    return ExitCodeFor(st);
  };
}

}  // namespace amoeba::admin
