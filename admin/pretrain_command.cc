// amoeba-admin pretrain: plain LM training of every weight, for small models from scratch.
#include <signal.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "admin/commands.h"
#include "distill/pretrain.h"
#include "model/file_util.h"
#include "model/runtime.h"
#include "model/status_macros.h"
#include "model/tokenizer.h"
#include "subnet/calibration_data.h"
#include "subnet/metrics.h"

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
  // Held-out perplexity during training (off without --heldout): every `eval_every` steps and at
  // the end, on `eval_windows` fixed windows of `seq_len` tokens.
  std::string heldout;
  int64_t eval_every = 100;
  int64_t eval_windows = 32;
};

struct HeldoutPoint {
  int64_t step;
  double perplexity;
};

// The training report: tokens seen per parameter and whether held-out perplexity has stopped
// improving (the relative gain over the last fifth of the evaluations' steps).
nlohmann::json PretrainReport(const Model& m, const PretrainFlags& f,
                              const std::vector<HeldoutPoint>& points) {
  const int64_t params = m.config.ParameterCount();
  const double tokens = static_cast<double>(f.o.loop.steps) * static_cast<double>(f.o.batch) *
                        static_cast<double>(f.o.seq_len) * static_cast<double>(f.o.loop.grad_accum);
  nlohmann::json j = {{"params", params},
                      {"steps", f.o.loop.steps},
                      {"tokens", tokens},
                      {"tokens_per_param", tokens / static_cast<double>(params)}};
  if (points.empty()) return j;
  nlohmann::json curve = nlohmann::json::array();
  for (const auto& p : points) curve.push_back({{"step", p.step}, {"perplexity", p.perplexity}});
  j["heldout"] = curve;
  const HeldoutPoint& last = points.back();
  j["heldout_perplexity"] = last.perplexity;
  // The latest evaluation at or before 4/5 of the run, against the final one.
  const int64_t fifth = last.step - last.step / 5;
  const HeldoutPoint* before = nullptr;
  for (const auto& p : points)
    if (p.step <= fifth) before = &p;
  if (before && before->step < last.step) {
    const double gain = before->perplexity / last.perplexity - 1.0;
    j["last_fifth_gain"] = gain;
    j["converged"] = gain < 0.02;  // less than 2% better over the last fifth
  }
  return j;
}

// By step; the last line of a step wins (a resumed run evaluates its checkpoint's steps again).
std::vector<HeldoutPoint> ReadHeldoutLog(const std::string& path) {
  std::map<int64_t, double> by_step;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_object() && j.contains("step") && j.contains("heldout_perplexity"))
      by_step[j["step"].get<int64_t>()] = j["heldout_perplexity"].get<double>();
  }
  std::vector<HeldoutPoint> out;
  for (const auto& [step, ppl] : by_step) out.push_back({step, ppl});
  return out;
}

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
  const std::string heldout_log = out + ".pretrain_heldout.jsonl";
  at::Tensor heldout;
  if (!f.heldout.empty()) {
    if (f.eval_every < 1 || f.eval_windows < 1)
      return absl::InvalidArgumentError("--eval-every and --eval-windows must be >= 1");
    ASSIGN_OR_RETURN(std::string text, ReadCorpus(f.heldout));
    WindowOptions wo;
    wo.num_windows = f.eval_windows;
    wo.window_len = f.o.seq_len;
    wo.seed = 1;
    wo.bos_token_id = m.config.bos_token_id;
    ASSIGN_OR_RETURN(heldout, MakeWindows(text, *tok, wo));
    // A resumed run appends (steps it evaluates again replace their earlier line when read).
    if (!f.o.loop.resume) RETURN_IF_ERROR(TruncateMetricsLog(heldout_log, 0));
    f.o.loop.on_step = [&](int64_t step) {
      if (step % f.eval_every != 0 && step != f.o.loop.steps) return;
      at::NoGradGuard no_grad;
      const double ppl = std::exp(MeanNll(m, heldout, 8));
      std::ofstream log(heldout_log, std::ios::app);
      log << nlohmann::json({{"step", step}, {"heldout_perplexity", ppl}}).dump() << "\n";
      spdlog::info("pretrain: step {} held-out perplexity {:.2f}", step, ppl);
    };
  }
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
  const nlohmann::json report = PretrainReport(
      m, f, f.heldout.empty() ? std::vector<HeldoutPoint>{} : ReadHeldoutLog(heldout_log));
  RETURN_IF_ERROR(
      WriteFileAtomic((fs::path(tmp) / "pretrain_report.json").string(), report.dump(1) + "\n"));
  spdlog::info("pretrain: report {}", report.dump());
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
  cmd->add_option(
      "--heldout", f->heldout,
      "Held-out text: perplexity every --eval-every steps, in OUT/pretrain_report.json");
  cmd->add_option("--eval-every", f->eval_every)->capture_default_str();
  cmd->add_option("--eval-windows", f->eval_windows, "Held-out windows of --seq-len tokens")
      ->capture_default_str();
  return [f]() {
    absl::Status st = RunPretrain(*f);
    if (!st.ok()) spdlog::error("pretrain: {}", st.ToString());
    return st.code() == absl::StatusCode::kCancelled ? 130 : ExitCodeFor(st);
  };
}

}  // namespace amoeba::admin
