// amoeba-admin convert: an HF LLaMA model directory as one GGUF file for llama.cpp (what
// `export --format gguf` does for a supernet's subnet, for any model directory).
#include <spdlog/spdlog.h>

#include <filesystem>
#include <memory>

#include "absl/strings/str_cat.h"
#include "admin/commands.h"
#include "model/gguf_model.h"
#include "model/status_macros.h"

namespace amoeba::admin {

namespace {
struct ConvertFlags {
  std::string model, out, dtype = "f16";
};

absl::Status RunConvert(const ConvertFlags& f) {
  auto format = ParseWeightFormat(f.dtype);
  if (!format.ok())
    return absl::InvalidArgumentError(absl::StrCat("--", format.status().message()));
  at::InferenceMode guard;
  ASSIGN_OR_RETURN(Model m, LoadModel(f.model));
  GgufExportOptions o;
  o.format = *format;
  o.name = std::filesystem::path(f.model).filename().string();
  o.tokenizer_dir = f.model;
  RETURN_IF_ERROR(SaveGguf(m, f.out, o));
  spdlog::info("convert: {} → {} (GGUF {}, {})", f.model, f.out, GgufArchitectureFor(m),
               WeightFormatName(*format));
  return absl::OkStatus();
}
}  // namespace

Runner AddConvertCommand(CLI::App& app) {
  auto f = std::make_shared<ConvertFlags>();
  CLI::App* cmd = app.add_subcommand("convert", "Write an HF model directory as one GGUF file");
  cmd->add_option("--model", f->model, "HF model directory (config.json, safetensors, tokenizer)")
      ->required();
  cmd->add_option("--out", f->out, "Output .gguf file")->required();
  cmd->add_option("--dtype", f->dtype, "f32 | f16 | q8_0 | q4_0")->capture_default_str();
  return [f]() {
    absl::Status st = RunConvert(*f);
    if (!st.ok()) spdlog::error("convert: {}", st.ToString());
    return ExitCodeFor(st);
  };
}

}  // namespace amoeba::admin
