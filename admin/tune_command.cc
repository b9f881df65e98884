// amoeba-admin tune: SMoL adapters by in-place distillation; writes smol.safetensors into the
// supernet and records the adapter config in amoeba.json.
#include <signal.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <filesystem>
#include <memory>

#include "absl/strings/str_cat.h"
#include "admin/commands.h"
#include "distill/data_parallel.h"
#include "distill/tuner.h"
#include "model/file_util.h"
#include "model/runtime.h"
#include "model/status_macros.h"

namespace amoeba::admin {
namespace fs = std::filesystem;

namespace {
std::atomic<bool> g_tune_stop{false};
void OnTuneSignal(int) {
  g_tune_stop = true;
}

struct TuneFlags {
  std::string supernet, data;
  TuneOptions o;
  SmolConfig smol;
  bool single_lora = false, no_balancing = false, no_distill = false;
  std::vector<std::string> targets;  // projection names; empty = all seven
  std::string only_shape;            // --shape: train one shape alone
  int threads = 0;
};

absl::Status RunTune(TuneFlags& f) {
  InitRuntime(f.threads);
  ASSIGN_OR_RETURN(auto s, Supernet::Load(f.supernet));
  if (!s->tokenizer()) return absl::FailedPreconditionError(f.supernet + ": no tokenizer");
  const ModelConfig& c = s->base().config;
  ASSIGN_OR_RETURN(TrainData data,
                   TrainData::Load(f.data, *s->tokenizer(), c.bos_token_id, c.eos_token_ids[0]));
  if (f.single_lora) {
    f.smol.experts = 1;
    f.smol.top_k = 1;
  }
  if (!f.targets.empty()) {
    f.smol.targets.fill(false);
    for (const std::string& t : f.targets) {
      bool known = false;
      for (int p = 0; p < kNumProj; ++p) {
        const std::string name = ProjName(static_cast<Proj>(p));  // "q_proj", …
        if (t == name || t + "_proj" == name) {
          f.smol.targets[p] = true;
          known = true;
        }
      }
      if (!known)
        return absl::InvalidArgumentError("--targets: unknown projection '" + t +
                                          "' (q, k, v, o, gate, up, down)");
    }
  }
  if (!f.only_shape.empty()) {
    auto sh = Shape::Parse(f.only_shape, c.num_hidden_layers);
    if (!sh.ok())
      return absl::InvalidArgumentError(absl::StrCat("--shape: ", sh.status().message()));
    absl::Status v = s->Validate(*sh);
    if (!v.ok()) return absl::InvalidArgumentError(absl::StrCat("--shape: ", v.message()));
    f.o.only_shape = *sh;
  }
  f.o.balancing = !f.no_balancing;
  f.o.distill = !f.no_distill;
  if (f.o.loop.checkpoint.empty())
    f.o.loop.checkpoint = (fs::path(f.supernet) / "tune_checkpoint.safetensors").string();
  if (f.o.loop.metrics_log.empty())
    f.o.loop.metrics_log = (fs::path(f.supernet) / "tune_metrics.jsonl").string();
  // A run killed mid-write (kill -9) leaves temp files next to what it was writing.
  int stale = 0;
  for (const std::string& p :
       {f.o.loop.checkpoint, (fs::path(f.supernet) / "smol.safetensors").string(),
        (fs::path(f.supernet) / "amoeba.json").string()})
    stale += RemoveStaleTempFiles(p);
  if (stale > 0) spdlog::info("tune: removed {} temp files left by an interrupted run", stale);
  ASSIGN_OR_RETURN(std::unique_ptr<DataParallel> dp, DataParallel::FromEnv());
  f.o.loop.dp = dp.get();
  const bool lead = !dp || dp->rank() == 0;
  Smol smol(s->base(), static_cast<int64_t>(s->spec().widths.size()), f.smol, f.o.loop.seed);
  spdlog::info(
      "tune: {} experts of rank {} on {} layers; {} steps of {}x{} tokens, {} subnets per "
      "micro-batch ({}{})",
      smol.config().experts, smol.config().rank, c.num_hidden_layers, f.o.loop.steps, f.o.batch,
      f.o.seq_len, f.o.subnets, f.o.distill ? "distillation" : "labels only",
      f.o.balancing ? ", balanced" : "");
  signal(SIGINT, OnTuneSignal);
  signal(SIGTERM, OnTuneSignal);
  ASSIGN_OR_RETURN(TuneResult r, Tune(*s, smol, data, f.o, &g_tune_stop));
  if (r.interrupted)
    return absl::CancelledError(
        absl::StrCat("interrupted at step ", r.step, "; resume with --resume"));
  if (!lead) return absl::OkStatus();  // rank 0 writes the results
  RETURN_IF_ERROR(smol.Save((fs::path(f.supernet) / "smol.safetensors").string()));
  SupernetSpec spec = s->spec();
  spec.smol = smol.config().ToJson();
  spec.smol["tuning"] = {{"data", f.data},
                         {"steps", f.o.loop.steps},
                         {"batch", f.o.batch},
                         {"seq_len", f.o.seq_len},
                         {"lr", f.o.loop.lr},
                         {"seed", f.o.loop.seed},
                         {"balancing", f.o.balancing},
                         {"distill", f.o.distill},
                         {"subnets", f.o.subnets},
                         {"only_shape", f.o.only_shape ? f.o.only_shape->ToString() : ""},
                         {"final_loss_full", r.loss_full},
                         {"final_loss_smallest", r.loss_smallest}};
  s->set_spec(spec);
  RETURN_IF_ERROR(s->SaveMetadata(f.supernet));
  spdlog::info("tune: wrote {}/smol.safetensors (final loss full {:.4f}, smallest {:.4f})",
               f.supernet, r.loss_full, r.loss_smallest);
  return absl::OkStatus();
}
}  // namespace

Runner AddTuneCommand(CLI::App& app) {
  auto f = std::make_shared<TuneFlags>();
  CLI::App* cmd =
      app.add_subcommand("tune", "SMoL adapters by in-place distillation (one-time fine-tuning)");
  cmd->add_option("--supernet", f->supernet, "Supernet directory (from calibrate)")->required();
  cmd->add_option("--data", f->data, "Text (.txt/.jsonl with \"text\") or instruction JSONL")
      ->required();
  cmd->add_option("--steps", f->o.loop.steps)->capture_default_str();
  cmd->add_option("--batch", f->o.batch, "Sequences per micro-batch")->capture_default_str();
  cmd->add_option("--seq-len", f->o.seq_len)->capture_default_str();
  cmd->add_option("--grad-accum", f->o.loop.grad_accum)->capture_default_str();
  cmd->add_option("--subnets", f->o.subnets, "Sandwich size K")->capture_default_str();
  cmd->add_option("--lr", f->o.loop.lr)->capture_default_str();
  cmd->add_option("--schedule", f->o.loop.schedule, "constant | cosine")->capture_default_str();
  cmd->add_option("--warmup", f->o.loop.warmup)->capture_default_str();
  cmd->add_option("--clip", f->o.loop.clip, "Gradient-norm clip")->capture_default_str();
  cmd->add_option("--seed", f->o.loop.seed)->capture_default_str();
  cmd->add_option("--experts", f->smol.experts)->capture_default_str();
  cmd->add_option("--rank", f->smol.rank, "0 = min(64, hidden/8)")->capture_default_str();
  cmd->add_option("--alpha", f->smol.alpha)->capture_default_str();
  cmd->add_option("--top-k", f->smol.top_k)->capture_default_str();
  cmd->add_option("--targets", f->targets,
                  "Projections that get adapters, comma-separated (q,k,v,o,gate,up,down; default "
                  "all)")
      ->delimiter(',');
  cmd->add_flag("--single-lora", f->single_lora, "Ablation: one LoRA (E = 1)");
  cmd->add_flag("--no-balancing", f->no_balancing, "Ablation: no loss-magnitude balancing");
  cmd->add_flag("--no-distill", f->no_distill,
                "Ablation: cross-entropy on labels for every subnet");
  cmd->add_option("--shape", f->only_shape,
                  "Baseline: train only this grid shape on the labels (one adapter for one shape; "
                  "combine with --single-lora)");
  cmd->add_option("--checkpoint", f->o.loop.checkpoint,
                  "Checkpoint file (default SUPERNET/tune_checkpoint.safetensors)");
  cmd->add_option("--checkpoint-every", f->o.loop.checkpoint_every)->capture_default_str();
  cmd->add_flag("--resume", f->o.loop.resume, "Continue from the checkpoint");
  cmd->add_option("--metrics-log", f->o.loop.metrics_log,
                  "JSONL metrics (default SUPERNET/tune_metrics.jsonl)");
  cmd->add_option("--threads", f->threads);
  return [f]() {
    absl::Status st = RunTune(*f);
    if (!st.ok()) spdlog::error("tune: {}", st.ToString());
    return st.code() == absl::StatusCode::kCancelled ? 130 : ExitCodeFor(st);
  };
}

}  // namespace amoeba::admin
