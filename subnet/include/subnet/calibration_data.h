// Calibration / evaluation text: plain text or JSONL (a "text" field per line), tokenised into
// fixed-length windows sampled deterministically from a seed.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/tokenizer.h"

namespace amoeba {

struct WindowOptions {
  int64_t num_windows = 32;
  int64_t window_len = 256;
  uint64_t seed = 0;
  int64_t bos_token_id =
      -1;  // >= 0: every window starts with BOS (then window_len - 1 text tokens)
};

// Reads a .txt file (whole text) or .jsonl file (concatenated "text" fields, newline-separated).
absl::StatusOr<std::string> ReadCorpus(const std::string& path);

// [num_windows, window_len] int64 token windows. Fewer tokens than one window is an error;
// fewer than num_windows distinct windows gives overlapping ones.
absl::StatusOr<at::Tensor> MakeWindows(const std::string& text, const Tokenizer& tok,
                                       const WindowOptions& o);

struct MultipleChoiceItem {
  std::string prompt;
  std::vector<std::string> choices;
  int answer = 0;
  // Score a choice by how much the prompt raises its likelihood (log p(choice | prompt) minus
  // log p(choice) after BOS alone) instead of by its likelihood: for cloze items whose choices
  // are real sentences, so a choice does not win for being common (or lose for being rare).
  bool unconditional_baseline = false;
};
// JSONL lines {"prompt": ..., "choices": [...], "answer": i} and optionally
// "scoring": "likelihood" (default) | "pmi" (unconditional_baseline).
absl::StatusOr<std::vector<MultipleChoiceItem>> ReadMultipleChoice(const std::string& path);

}  // namespace amoeba
