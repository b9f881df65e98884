#include "subnet/calibration_data.h"

#include <nlohmann/json.hpp>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "model/file_util.h"
#include "model/status_macros.h"

namespace amoeba {

absl::StatusOr<std::string> ReadCorpus(const std::string& path) {
  ASSIGN_OR_RETURN(std::string raw, ReadFile(path));
  if (!absl::EndsWith(path, ".jsonl")) return raw;
  std::string out;
  RETURN_IF_ERROR(ForEachJsonLine(path, raw, [&](const nlohmann::json& j) {
    if (!j.contains("text") || !j["text"].is_string())
      return absl::InvalidArgumentError("expected a \"text\" string");
    out += j["text"].get<std::string>();
    out += "\n";
    return absl::OkStatus();
  }));
  return out;
}

absl::StatusOr<at::Tensor> MakeWindows(const std::string& text, const Tokenizer& tok,
                                       const WindowOptions& o) {
  if (o.num_windows < 1 || o.window_len < 2)
    return absl::InvalidArgumentError("windows: need >= 1 window of >= 2 tokens");
  const std::vector<int32_t> ids = tok.Encode(text);
  const int64_t body = o.window_len - (o.bos_token_id >= 0 ? 1 : 0);
  if (static_cast<int64_t>(ids.size()) < body) {
    return absl::InvalidArgumentError(absl::StrCat("calibration text has ", ids.size(),
                                                   " tokens, fewer than one window of ", body));
  }
  const int64_t span = static_cast<int64_t>(ids.size()) - body + 1;
  std::mt19937_64 rng(o.seed);
  at::Tensor out = at::empty({o.num_windows, o.window_len}, at::kLong);
  auto acc = out.accessor<int64_t, 2>();
  for (int64_t w = 0; w < o.num_windows; ++w) {
    const int64_t start = static_cast<int64_t>(rng() % static_cast<uint64_t>(span));
    int64_t k = 0;
    if (o.bos_token_id >= 0) acc[w][k++] = o.bos_token_id;
    for (int64_t i = 0; i < body; ++i) acc[w][k++] = ids[start + i];
  }
  return out;
}

absl::StatusOr<std::vector<MultipleChoiceItem>> ReadMultipleChoice(const std::string& path) {
  ASSIGN_OR_RETURN(std::string raw, ReadFile(path));
  std::vector<MultipleChoiceItem> items;
  RETURN_IF_ERROR(ForEachJsonLine(path, raw, [&](const nlohmann::json& j) {
    auto bad = [](const char* why) { return absl::InvalidArgumentError(why); };
    if (!j.contains("prompt") || !j["prompt"].is_string()) return bad("missing \"prompt\" string");
    if (!j.contains("choices") || !j["choices"].is_array() || j["choices"].size() < 2)
      return bad("\"choices\" needs >= 2 strings");
    if (!j.contains("answer") || !j["answer"].is_number_integer())
      return bad("missing integer \"answer\"");
    MultipleChoiceItem it;
    it.prompt = j["prompt"].get<std::string>();
    for (const auto& c : j["choices"]) {
      if (!c.is_string()) return bad("choices must be strings");
      it.choices.push_back(c.get<std::string>());
    }
    it.answer = j["answer"].get<int>();
    const std::string scoring = j.value("scoring", "likelihood");
    if (scoring != "likelihood" && scoring != "pmi")
      return bad("\"scoring\" must be \"likelihood\" or \"pmi\"");
    it.unconditional_baseline = scoring == "pmi";
    if (it.answer < 0 || it.answer >= static_cast<int>(it.choices.size()))
      return bad("\"answer\" out of range");
    items.push_back(std::move(it));
    return absl::OkStatus();
  }));
  if (items.empty()) return absl::InvalidArgumentError(path + ": no items");
  return items;
}

}  // namespace amoeba
