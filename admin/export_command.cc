// amoeba-admin export: one shape of a supernet as a standalone HF directory, or as one GGUF file
// for llama.cpp (--format gguf).
#include <spdlog/spdlog.h>

#include <memory>

#include "absl/strings/str_cat.h"
#include "admin/commands.h"
#include "model/gguf_model.h"
#include "model/runtime.h"
#include "model/status_macros.h"
#include "subnet/export.h"

namespace amoeba::admin {

namespace {
struct ExportFlags {
  std::string supernet, shape, out, dtype, format = "hf";  // dtype "": f32 (hf), f16 (gguf)
  bool uniform = false, no_adapters = false;
};

absl::Status RunExport(const ExportFlags& f) {
  ExportOptions o;
  o.uniform_width = f.uniform;
  o.adapters = !f.no_adapters;
  RETURN_IF_ERROR(ParseExportFormat(f.format, f.dtype, o));
  const bool gguf = o.format == ExportOptions::Format::kGguf;
  at::InferenceMode guard;
  ASSIGN_OR_RETURN(auto s, Supernet::Load(f.supernet));
  ASSIGN_OR_RETURN(Shape shape, Shape::Parse(f.shape, s->base().config.num_hidden_layers));
  ASSIGN_OR_RETURN(std::unique_ptr<Smol> smol, LoadAdapters(*s));
  ASSIGN_OR_RETURN(Model m, SubnetForExport(*s, smol.get(), shape, o));
  if (gguf) {
    RETURN_IF_ERROR(WriteGgufExport(*s, m, shape, f.out, o.gguf_dtype));
  } else {
    RETURN_IF_ERROR(WriteExport(*s, m, f.out, o));
  }
  spdlog::info("export: {} ({} params{}) → {}{}", shape.ToString(), m.config.ParameterCount(),
               smol && o.adapters ? ", SMoL adapters merged" : "", f.out,
               gguf ? absl::StrCat(" (GGUF ", GgufArchitectureFor(m), ", ",
                                   WeightFormatName(o.gguf_dtype), ")")
                    : std::string());
  return absl::OkStatus();
}
}  // namespace

Runner AddExportCommand(CLI::App& app) {
  auto f = std::make_shared<ExportFlags>();
  CLI::App* cmd = app.add_subcommand(
      "export", "Write one subnet as a standalone HF directory or one GGUF file (llama.cpp)");
  cmd->add_option("--supernet", f->supernet, "Supernet directory")->required();
  cmd->add_option("--shape", f->shape, "depth=D,width=W")->required();
  cmd->add_option("--out", f->out, "Output directory (a .gguf file with --format gguf)")
      ->required();
  cmd->add_option("--format", f->format, "hf (Hugging Face directory) | gguf (llama.cpp)")
      ->capture_default_str();
  cmd->add_flag("--uniform-width", f->uniform,
                "Same width in every layer: a standard LlamaForCausalLM");
  cmd->add_option("--dtype", f->dtype,
                  "hf: f32 (default) | f16 | bf16; gguf: f32 | f16 (default) | q8_0 | q4_0");
  cmd->add_flag("--no-adapters", f->no_adapters,
                "Export the base subnet without the tuned SMoL adapters merged in");
  return [f]() {
    absl::Status st = RunExport(*f);
    if (!st.ok()) spdlog::error("export: {}", st.ToString());
    return ExitCodeFor(st);
  };
}

}  // namespace amoeba::admin
