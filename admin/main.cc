// amoeba-admin: the one-time pipeline (init, calibrate, tune, eval, export) and local generation.
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <vector>

#include "absl/status/status.h"
#include "admin/commands.h"
#include "model/runtime.h"

namespace amoeba::admin {
int ExitCodeFor(const absl::Status& st) {
  switch (st.code()) {
    case absl::StatusCode::kOk:
      return 0;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kDataLoss:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kUnimplemented:
      return 2;
    default:
      return 1;
  }
}
}  // namespace amoeba::admin

int main(int argc, char** argv) {
  amoeba::InitLogging();
  CLI::App app{"amoeba-admin: build, tune and inspect an Amoeba supernet"};
  app.require_subcommand(1);
  std::vector<std::pair<CLI::App*, amoeba::admin::Runner>> cmds;
  auto add = [&](const char* name, amoeba::admin::Runner r) {
    cmds.emplace_back(app.get_subcommand(name), std::move(r));
  };
  add("init", amoeba::admin::AddInitCommand(app));
  add("generate", amoeba::admin::AddGenerateCommand(app));
  add("calibrate", amoeba::admin::AddCalibrateCommand(app));
  add("export", amoeba::admin::AddExportCommand(app));
  add("tune", amoeba::admin::AddTuneCommand(app));
  add("eval", amoeba::admin::AddEvalCommand(app));
  add("pretrain", amoeba::admin::AddPretrainCommand(app));
  add("convert", amoeba::admin::AddConvertCommand(app));
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }
  for (auto& [sub, run] : cmds)
    if (sub->parsed()) return run();
  return 2;
}
