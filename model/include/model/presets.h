// Named model shapes for `amoeba-admin init` and the benchmarks.
#pragma once
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"

namespace amoeba {

// "tiny" (tests), "100m" (llama2.c-style 110M body, untied head: 134M), "tinyllama" (1.1B shape).
absl::StatusOr<ModelConfig> PresetConfig(const std::string& name);
std::vector<std::string> PresetNames();

// Writes a byte-level tokenizer.json: <unk>, <s>, </s>, then the 256 bytes, no merges. Always
// available, lossless for any text; a real tokenizer can replace it.
absl::Status WriteByteTokenizer(const std::string& dir);

}  // namespace amoeba
