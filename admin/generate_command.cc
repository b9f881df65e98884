// amoeba-admin generate: streams a completion of a prompt to stdout and reports tokens/s.
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <memory>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "admin/commands.h"
#include "model/engine.h"
#include "model/generation.h"
#include "model/gguf_model.h"
#include "model/model_loader.h"
#include "model/packed_linear.h"
#include "model/runtime.h"
#include "model/status_macros.h"
#include "model/tokenizer.h"
#include "model/weights.h"

namespace amoeba::admin {

namespace {
struct GenerateFlags {
  std::string model;
  std::string tokenizer;  // for a .gguf model: the directory of its tokenizer files
  std::string prompt;
  GenerationOptions gen;
  int threads = 0;
  int64_t max_len = 2048;
  bool no_bos = false;
  bool baseline = false;
  bool json = false;  // one JSON line (prompt ids, generated ids, text) instead of streamed text
  std::string weights_dtype = "f32";
  std::string kv_dtype = "f32";
  std::string prefill_attention = "auto";  // EngineOptions::bf16_prefill_attention
};

absl::Status RunGenerate(const GenerateFlags& f) {
  if (f.prompt.empty()) return absl::InvalidArgumentError("prompt: empty");
  if (!IsValidUtf8(f.prompt)) return absl::InvalidArgumentError("prompt: not valid UTF-8");
  if (f.gen.sampling.temperature < 0)
    return absl::InvalidArgumentError("--temperature: must be >= 0");
  if (!(f.gen.sampling.top_p > 0 && f.gen.sampling.top_p <= 1))
    return absl::InvalidArgumentError("--top-p: must be in (0, 1]");
  if (f.gen.max_new_tokens < 1) return absl::InvalidArgumentError("--max-new-tokens: must be >= 1");
  InitRuntime(f.threads);
  at::InferenceMode guard;
  ASSIGN_OR_RETURN(Model m, LoadModelOrGguf(f.model));
  ASSIGN_OR_RETURN(auto tok, LoadModelTokenizer(f.model, f.tokenizer));
  std::vector<int32_t> ids;
  if (!f.no_bos) ids.push_back(static_cast<int32_t>(m.config.bos_token_id));
  for (int32_t t : tok->Encode(f.prompt)) ids.push_back(t);
  EngineOptions eo;
  eo.max_len = std::min<int64_t>(f.max_len, m.config.max_position_embeddings);
  eo.linear_path = f.baseline ? LinearPath::kTorch : LinearPath::kAuto;
  eo.kv_dtype = f.kv_dtype == "f16" ? at::kHalf : at::kFloat;
  eo.bf16_prefill_attention = f.prefill_attention == "auto";
  auto format = ParseWeightFormat(f.weights_dtype);
  if (!format.ok())
    return absl::InvalidArgumentError(absl::StrCat("--", format.status().message()));
  if (f.baseline) {
    if (IsQuantized(*format))
      return absl::InvalidArgumentError("--baseline: f32 or f16 weights (libtorch has no q8_0)");
    if (*format == WeightFormat::kF16) m = ConvertWeights(m, at::kHalf);  // libtorch, row-major
  } else {
    PackWeights(m, *format);  // decode from panels; the row-major pages can go
    ReleaseRowMajorPages(m);
  }
  auto shared = std::make_shared<const Model>(std::move(m));
  Engine engine(shared, eo);
  KVCache cache = engine.NewCache(1);
  if (!f.json) {
    std::fputs(f.prompt.c_str(), stdout);
    std::fflush(stdout);
  }
  ASSIGN_OR_RETURN(
      GenerationResult r,
      Generate(engine, cache, 0, *tok, ids, f.gen, [&](int32_t, std::string_view piece) {
        if (f.json) return true;  // printed at the end
        std::fwrite(piece.data(), 1, piece.size(), stdout);
        std::fflush(stdout);
        return true;
      }));
  if (f.json) {
    // How sure each greedy pick was: top-1 minus top-2 logit at each generated position, from
    // one teacher-forced pass. Another engine may break a near-tie the other way.
    std::vector<int32_t> all = ids;
    all.insert(all.end(), r.tokens.begin(), r.tokens.end());
    std::vector<float> margins;
    if (all.size() <= static_cast<size_t>(cache.max_len())) {
      cache.Reset(0);
      const SeqInput in{0, all, /*all_logits=*/true};
      ASSIGN_OR_RETURN(at::Tensor logits, engine.Forward(cache, {&in, 1}));
      const at::Tensor top = std::get<0>(logits.topk(2, 1));
      for (size_t i = ids.size() - 1; i + 1 < all.size(); ++i)
        margins.push_back(top[static_cast<int64_t>(i)][0].item<float>() -
                          top[static_cast<int64_t>(i)][1].item<float>());
    }
    const nlohmann::json out = {{"prompt_ids", ids},
                                {"margins", margins},
                                {"tokens", r.tokens},
                                {"text", r.text},
                                {"finish_reason", FinishReasonName(r.finish_reason)}};
    std::fputs(out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str(), stdout);
  }
  std::fputs("\n", stdout);
  const double decode_tps =
      r.tokens.size() > 1 ? (r.tokens.size() - 1) * 1000.0 / r.decode_ms : 0.0;
  std::fprintf(stderr,
               "[%zu new tokens, finish=%s | prefill %lld tokens %.1f ms (%.0f tok/s) | decode "
               "%.2f tok/s]\n",
               r.tokens.size(), FinishReasonName(r.finish_reason),
               static_cast<long long>(r.prompt_tokens), r.prefill_ms,
               r.prompt_tokens * 1000.0 / std::max(r.prefill_ms, 1e-3), decode_tps);
  return absl::OkStatus();
}
}  // namespace

Runner AddGenerateCommand(CLI::App& app) {
  auto f = std::make_shared<GenerateFlags>();
  CLI::App* cmd = app.add_subcommand("generate", "Generate text locally from a model directory");
  cmd->add_option("--model", f->model,
                  "HF model directory (config.json, safetensors, tokenizer) or a llama/deci "
                  ".gguf file")
      ->required();
  cmd->add_option("--tokenizer", f->tokenizer,
                  "Directory with tokenizer.json / tokenizer.model (default: the model's; a "
                  ".gguf file carries its own)");
  cmd->add_option("prompt", f->prompt, "Prompt text")->required();
  cmd->add_option("--max-new-tokens,-n", f->gen.max_new_tokens, "Tokens to generate")
      ->capture_default_str();
  cmd->add_option("--temperature", f->gen.sampling.temperature, "0 = greedy")
      ->capture_default_str();
  cmd->add_option("--top-k", f->gen.sampling.top_k, "0 = off")->capture_default_str();
  cmd->add_option("--top-p", f->gen.sampling.top_p, "1 = off")->capture_default_str();
  cmd->add_option("--repetition-penalty", f->gen.sampling.repetition_penalty, "1 = off")
      ->capture_default_str();
  cmd->add_option("--seed", f->gen.sampling.seed, "Sampling seed")->capture_default_str();
  cmd->add_option("--stop", f->gen.stop, "Stop string (repeatable)");
  cmd->add_flag(
      "--ignore-eos", [f](int64_t) { f->gen.stop_at_eos = false; }, "Do not stop at EOS");
  cmd->add_option("--threads", f->threads, "Compute threads (0 = all cores)")
      ->capture_default_str();
  cmd->add_option("--max-len", f->max_len, "Context length to allocate")->capture_default_str();
  cmd->add_flag("--no-bos", f->no_bos, "Do not prepend BOS");
  cmd->add_flag("--json", f->json,
                "Print one JSON object: prompt_ids, tokens (generated ids), text, finish_reason");
  cmd->add_flag("--baseline", f->baseline, "Use libtorch linear instead of Amoeba's kernels");
  cmd->add_option("--weights-dtype", f->weights_dtype,
                  "Decode weights: f32 | f16 | q8_0 | q4_0 (bytes per token: 1, 1/2, ~1/4, ~1/7)")
      ->capture_default_str();
  cmd->add_option("--kv-dtype", f->kv_dtype, "KV cache: f32 | f16 (half the memory)")
      ->check(CLI::IsMember({"f32", "f16"}))
      ->capture_default_str();
  cmd->add_option("--prefill-attention", f->prefill_attention,
                  "auto (bf16 products on AMX tiles where the CPU has them) | fp32")
      ->check(CLI::IsMember({"auto", "fp32"}))
      ->capture_default_str();
  return [f]() {
    absl::Status st = RunGenerate(*f);
    if (!st.ok()) spdlog::error("generate: {}", st.ToString());
    return ExitCodeFor(st);
  };
}

}  // namespace amoeba::admin
