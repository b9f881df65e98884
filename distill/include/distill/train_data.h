// Training data: plain text (LM loss on every token) or instruction JSONL
// ({"instruction", "input", "output"}, Alpaca template, loss on response tokens only).
// Batches are a pure function of (seed, step, micro-step), so a resumed run sees the same data.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/tokenizer.h"

namespace amoeba {

struct TrainBatch {
  at::Tensor tokens;  // [B, T] int64
  at::Tensor mask;    // [B, T] float: 1 where the token is a target (position t predicts token t)
};

class TrainData {
 public:
  // `path`: .jsonl with "instruction"/"output" → instruction data; anything else → plain text
  // (.jsonl with "text" fields is plain text too).
  static absl::StatusOr<TrainData> Load(const std::string& path, const Tokenizer& tok, int64_t bos,
                                        int64_t eos);
  TrainBatch Sample(uint64_t seed, int64_t step, int64_t micro, int64_t batch,
                    int64_t seq_len) const;
  bool instruction() const { return !examples_.empty(); }
  int64_t tokens() const;

 private:
  std::vector<int32_t> stream_;  // plain text
  struct Example {
    std::vector<int32_t> ids;
    std::vector<float> mask;
  };
  std::vector<Example> examples_;
  int64_t bos_ = 1, eos_ = 2;
};

}  // namespace amoeba
