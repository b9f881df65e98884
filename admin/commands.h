// amoeba-admin subcommands. Each registers its flags on the app and returns the process exit
// code: 0 ok, 1 runtime failure, 2 bad input.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>

#include "absl/status/status.h"

namespace amoeba::admin {

using Runner = std::function<int()>;

// Registers a subcommand; the returned runner is called when it was selected.
Runner AddInitCommand(CLI::App& app);
Runner AddGenerateCommand(CLI::App& app);
Runner AddCalibrateCommand(CLI::App& app);
Runner AddExportCommand(CLI::App& app);
Runner AddTuneCommand(CLI::App& app);
Runner AddEvalCommand(CLI::App& app);
Runner AddPretrainCommand(CLI::App& app);
Runner AddConvertCommand(CLI::App& app);

// Exit code for a failed absl::Status: 2 for bad input, 1 otherwise.
int ExitCodeFor(const absl::Status& st);

}  // namespace amoeba::admin
