// amoeba-admin calibrate: HF model + text → supernet directory.
#include <spdlog/spdlog.h>

#include <memory>

#include "admin/commands.h"
#include "model/runtime.h"
#include "subnet/calibrate.h"

namespace amoeba::admin {

Runner AddCalibrateCommand(CLI::App& app) {
  auto o = std::make_shared<CalibrateOptions>();
  auto threads = std::make_shared<int>(0);
  CLI::App* cmd =
      app.add_subcommand("calibrate", "Width importance + DP depth table: HF model → supernet");
  cmd->add_option("--model", o->model_dir, "HF model directory, or a llama .gguf file")->required();
  cmd->add_option("--tokenizer", o->tokenizer_dir,
                  "Tokenizer directory for a .gguf model (default: the file's directory)");
  cmd->add_option("--data", o->data_path,
                  "Calibration text (.txt, or .jsonl with a \"text\" field)")
      ->required();
  cmd->add_option("--out", o->out_dir, "Supernet directory to write")->required();
  cmd->add_option("--windows", o->windows, "Calibration windows (the width statistics see all)")
      ->capture_default_str();
  cmd->add_option("--window-len", o->window_len, "Tokens per window")->capture_default_str();
  cmd->add_option("--dp-windows", o->dp_windows, "Windows per DP evaluation")
      ->capture_default_str();
  cmd->add_option("--seed", o->seed, "Window sampling seed")->capture_default_str();
  cmd->add_flag("--window-bos", o->window_bos,
                "Start every window with a BOS (for models trained with one at every window)");
  cmd->add_option("--min-depth-ratio", o->min_depth_ratio, "Smallest depth = ceil(ratio * layers)")
      ->capture_default_str();
  cmd->add_option("--widths", o->widths, "Width ratios of the grid, descending from 1")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--keep-last", o->keep_last, "Last layers never removed")->capture_default_str();
  cmd->add_flag("--uniform-width", o->uniform_width, "Same width fraction in every layer");
  cmd->add_option("--width-scores", o->width_scores,
                  "Unit importance: flap (activation variance x weight norm) | magnitude (weight "
                  "norm alone) | removal (removal error x measured layer sensitivity)")
      ->check(CLI::IsMember({"flap", "magnitude", "removal"}))
      ->capture_default_str();
  cmd->add_option("--metric", o->metric, "DP metric: perplexity | accuracy")->capture_default_str();
  cmd->add_option("--mc-data", o->mc_data, "Multiple-choice JSONL for --metric accuracy");
  cmd->add_option("--batch", o->batch, "Windows per forward pass")->capture_default_str();
  cmd->add_flag("--force", o->force, "Overwrite an existing supernet");
  cmd->add_option("--threads", *threads, "Compute threads (0 = all cores)");
  return [o, threads]() {
    InitRuntime(*threads);
    auto r = Calibrate(*o);
    if (!r.ok()) spdlog::error("calibrate: {}", r.status().ToString());
    return ExitCodeFor(r.status());
  };
}

}  // namespace amoeba::admin
