#include "distill/train_data.h"

#include <nlohmann/json.hpp>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "model/file_util.h"
#include "model/status_macros.h"

namespace amoeba {

absl::StatusOr<TrainData> TrainData::Load(const std::string& path, const Tokenizer& tok,
                                          int64_t bos, int64_t eos) {
  ASSIGN_OR_RETURN(std::string raw, ReadFile(path));
  TrainData d;
  d.bos_ = bos;
  d.eos_ = eos;
  std::string text;
  if (absl::EndsWith(path, ".jsonl")) {
    RETURN_IF_ERROR(ForEachJsonLine(path, raw, [&](const nlohmann::json& j) -> absl::Status {
      if (j.contains("instruction") && j.contains("output")) {
        // Alpaca template; the loss covers the response and its EOS only.
        const std::string input = j.value("input", "");
        std::string prompt = input.empty()
                                 ? absl::StrCat(
                                       "Below is an instruction that describes a task. Write a "
                                       "response that appropriately "
                                       "completes the request.\n\n### Instruction:\n",
                                       j["instruction"].get<std::string>(), "\n\n### Response:\n")
                                 : absl::StrCat(
                                       "Below is an instruction that describes a task, paired with "
                                       "an input that provides "
                                       "further context. Write a response that appropriately "
                                       "completes the request.\n\n"
                                       "### Instruction:\n",
                                       j["instruction"].get<std::string>(), "\n\n### Input:\n",
                                       input, "\n\n### Response:\n");
        Example ex;
        ex.ids.push_back(static_cast<int32_t>(bos));
        for (int32_t t : tok.Encode(prompt)) ex.ids.push_back(t);
        ex.mask.assign(ex.ids.size(), 0.f);
        for (int32_t t : tok.Encode(j["output"].get<std::string>())) {
          ex.ids.push_back(t);
          ex.mask.push_back(1.f);
        }
        ex.ids.push_back(static_cast<int32_t>(eos));
        ex.mask.push_back(1.f);
        d.examples_.push_back(std::move(ex));
      } else if (j.contains("text")) {
        text += j["text"].get<std::string>() + "\n";
      } else {
        return absl::InvalidArgumentError("need \"text\" or \"instruction\"+\"output\"");
      }
      return absl::OkStatus();
    }));
  } else {
    text = std::move(raw);
  }
  if (!text.empty()) {
    for (int32_t t : tok.Encode(text)) d.stream_.push_back(t);
  }
  if (d.examples_.empty() && d.stream_.size() < 16)
    return absl::InvalidArgumentError(path + ": too little training text");
  return d;
}

int64_t TrainData::tokens() const {
  if (!instruction()) return static_cast<int64_t>(stream_.size());
  int64_t n = 0;
  for (const auto& e : examples_) n += static_cast<int64_t>(e.ids.size());
  return n;
}

TrainBatch TrainData::Sample(uint64_t seed, int64_t step, int64_t micro, int64_t batch,
                             int64_t T) const {
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(step) * 1000003ull +
                      static_cast<uint64_t>(micro));
  TrainBatch b;
  b.tokens = at::full({batch, T}, eos_, at::kLong);
  b.mask = at::zeros({batch, T});
  auto tk = b.tokens.accessor<int64_t, 2>();
  auto mk = b.mask.accessor<float, 2>();
  for (int64_t i = 0; i < batch; ++i) {
    if (instruction()) {
      const Example& e = examples_[rng() % examples_.size()];
      const int64_t n = std::min<int64_t>(T, static_cast<int64_t>(e.ids.size()));
      for (int64_t t = 0; t < n; ++t) {
        tk[i][t] = e.ids[t];
        mk[i][t] = e.mask[t];
      }
    } else {
      const int64_t body = T - 1;
      const int64_t span = std::max<int64_t>(1, static_cast<int64_t>(stream_.size()) - body + 1);
      const int64_t start = static_cast<int64_t>(rng() % static_cast<uint64_t>(span));
      tk[i][0] = bos_;
      for (int64_t t = 0; t < body && start + t < static_cast<int64_t>(stream_.size()); ++t) {
        tk[i][t + 1] = stream_[start + t];
        mk[i][t + 1] = 1.f;
      }
    }
  }
  return b;
}

}  // namespace amoeba
