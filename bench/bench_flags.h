// The command line of every bench: CLI11, with one rule for how a bad flag ends the program.
#pragma once
#include <CLI/CLI.hpp>
#include <optional>

namespace amoeba::bench {

// Parses argv into `app`. When the program should stop there, the exit code: 0 after --help, 2
// after a bad flag (CLI11 has printed why either way); nullopt to go on.
inline std::optional<int> ParseFlags(CLI::App& app, int argc, char** argv) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  return std::nullopt;
}

}  // namespace amoeba::bench
