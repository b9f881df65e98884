// amoeba-admin pretrain: plain LM training of every weight, for small models from scratch.
#include <signal.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <filesystem>
#include <memory>

#include "absl/strings/str_cat.h"
#include "admin/commands.h"
#include "distill/pretrain.h"
#include "model/file_util.h"
#include "model/runtime.h"
#include "model/status_macros.h"
#include "model/tokenizer.h"

namespace amoeba::admin {
namespace fs = std::filesystem;

namespace {
std::atomic<bool> g_pretrain_stop{false};
void OnPretrainSignal(int) {
  g_pretrain_stop = true;
}

struct PretrainFlags {
  std::string model, data, out;
  PretrainOptions o;
  int threads = 0;
};

absl::Status RunPretrain(PretrainFlags& f) {
  InitRuntime(f.threads);
  ASSIGN_OR_RETURN(Model m, LoadModel(f.model));
  ASSIGN_OR_RETURN(auto tok, LoadTokenizer(f.model));
  ASSIGN_OR_RETURN(TrainData data,
                   TrainData::Load(f.data, *tok, m.config.bos_token_id, m.config.eos_token_ids[0]));
  const std::string out = f.out.empty() ? f.model : f.out;
  if (f.o.loop.checkpoint.empty()) f.o.loop.checkpoint = out + ".pretrain_checkpoint.safetensors";
  if (f.o.loop.metrics_log.empty()) f.o.loop.metrics_log = out + ".pretrain_metrics.jsonl";
  spdlog::info("pretrain: {} params on {} tokens; {} steps of {}x{}", m.config.ParameterCount(),
               data.tokens(), f.o.loop.steps, f.o.batch, f.o.seq_len);
  signal(SIGINT, OnPretrainSignal);
  signal(SIGTERM, OnPretrainSignal);
  ASSIGN_OR_RETURN(LoopResult r, Pretrain(m, data, f.o, &g_pretrain_stop));
  if (r.interrupted)
    return absl::CancelledError(
        absl::StrCat("interrupted at step ", r.step, "; resume with --resume"));
  // Model files go into a temp directory first, then replace `out` (tokenizer copied along).
  const std::string tmp = out + ".tmp-pretrain";
  std::error_code ec;
  fs::remove_all(tmp, ec);
  RETURN_IF_ERROR(SaveModel(m, tmp));
  RETURN_IF_ERROR(CopyTokenizerFiles(f.model, tmp));
  RETURN_IF_ERROR(ReplaceDirectory(tmp, out));
  spdlog::info("pretrain: final loss {:.4f} (perplexity {:.1f}); wrote {}", r.loss,
               std::exp(r.loss), out);
  return absl::OkStatus();
}
}  // namespace

Runner AddPretrainCommand(CLI::App& app) {
  auto f = std::make_shared<PretrainFlags>();
  f->o.loop.lr = 1e-3;
  f->o.loop.schedule = "cosine";
  f->o.loop.warmup = 20;
  f->o.loop.clip = 1.0;
  f->o.loop.weight_decay = 0.05;
  f->o.loop.steps = 300;
  CLI::App* cmd =
      app.add_subcommand("pretrain", "Train all weights as a plain language model (small models)");
  cmd->add_option("--model", f->model, "HF model directory (e.g. from init)")->required();
  cmd->add_option("--data", f->data, "Training text (.txt or .jsonl)")->required();
  cmd->add_option("--out", f->out, "Output directory (default: overwrite --model)");
  cmd->add_option("--steps", f->o.loop.steps)->capture_default_str();
  cmd->add_option("--batch", f->o.batch)->capture_default_str();
  cmd->add_option("--seq-len", f->o.seq_len)->capture_default_str();
  cmd->add_option("--grad-accum", f->o.loop.grad_accum)->capture_default_str();
  cmd->add_option("--lr", f->o.loop.lr)->capture_default_str();
  cmd->add_option("--schedule", f->o.loop.schedule, "constant | cosine")->capture_default_str();
  cmd->add_option("--warmup", f->o.loop.warmup)->capture_default_str();
  cmd->add_option("--clip", f->o.loop.clip)->capture_default_str();
  cmd->add_option("--weight-decay", f->o.loop.weight_decay)->capture_default_str();
  cmd->add_option("--seed", f->o.loop.seed)->capture_default_str();
  cmd->add_option("--checkpoint", f->o.loop.checkpoint,
                  "Checkpoint file (default OUT.pretrain_checkpoint.safetensors)");
  cmd->add_option("--checkpoint-every", f->o.loop.checkpoint_every)->capture_default_str();
  cmd->add_flag("--resume", f->o.loop.resume, "Continue from the checkpoint");
  cmd->add_option("--threads", f->threads);
  return [f]() {
    absl::Status st = RunPretrain(*f);
    if (!st.ok()) spdlog::error("pretrain: {}", st.ToString());
    return st.code() == absl::StatusCode::kCancelled ? 130 : ExitCodeFor(st);
  };
}

}  // namespace amoeba::admin
