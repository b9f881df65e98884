// Per-request generation state (sampling, streaming detokenisation, stop conditions) and a simple
// single-sequence generate loop on top of the engine. The server's batch scheduler drives the same
// TokenStream, one decode step at a time.
#pragma once
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "model/engine.h"
#include "model/finish_reason.h"
#include "model/grammar.h"
#include "model/sampler.h"
#include "model/token_logprobs.h"
#include "model/tokenizer.h"

namespace amoeba {

struct GenerationOptions {
  SamplingOptions sampling;
  int64_t max_new_tokens = 128;
  std::vector<std::string> stop;  // stop strings (not included in the output)
  bool stop_at_eos = true;
  int64_t time_limit_ms = 0;  // 0 = none
  // Log-probabilities of the new tokens (-1: off): each token's, and this many most likely
  // alternatives (at most kMaxTopLogprobs). They are the model's distribution, log-softmax of the
  // logits before any sampling transform (penalties, bias, temperature, truncation).
  int32_t logprobs = -1;
  // Also the prompt's tokens' log-probabilities (each after the first, given those before it;
  // `logprobs` alternatives each): scoring, as evaluation harnesses ask with echo. The prompt is
  // then prefilled with logits for every position (no prompt cache), and max_new_tokens may be 0.
  bool prompt_logprobs = false;
  // Constrained decoding: every token (drafted ones too) is drawn from those the grammar allows
  // next, and the stream ends as soon as the grammar's sentence is complete with nothing that
  // could follow (or at end-of-sequence once it is complete). Null: unconstrained.
  std::shared_ptr<Grammar> grammar;
};

// Log-softmax of one row of logits, for the tokens asked about: LogZ once per row (a pass over
// the vocabulary), then any token's log-probability, and the top k.
class LogprobRow {
 public:
  // Reads `logits` (not modified; kept by reference until the next Read).
  void Read(const float* logits, int64_t vocab);
  float Of(int32_t token) const { return logits_[token] - log_z_; }
  // The k most likely tokens with their log-probabilities, most likely first, into `out`.
  void Top(int32_t k, std::vector<std::pair<int32_t, float>>& out);

 private:
  const float* logits_ = nullptr;
  int64_t vocab_ = 0;
  float log_z_ = 0;
  std::vector<std::pair<float, int32_t>> top_;  // Top's scratch: (logit, id), largest first
};

class TokenStream {
 public:
  TokenStream(const Tokenizer& tok, const ModelConfig& config, const GenerationOptions& options,
              std::span<const int32_t> prompt);

  struct Step {
    int32_t token = -1;
    std::string_view text;  // newly final text (valid UTF-8), valid until the next call
    bool done = false;
    bool accepted = false;  // Next with a proposal: the drafted token was kept
    // With GenerationOptions::logprobs >= 0: the token's log-probability (valid until the next
    // call), else null.
    const TokenLogprobs* logprobs = nullptr;
  };
  // A drafted token and the distribution it was drawn from (null: drawn deterministically).
  struct Proposal {
    int32_t token = -1;
    const float* probs = nullptr;
  };
  // Chooses the next token from `logits` (modified in place) and updates the stop conditions.
  // With a proposal, checks the drafted token against the logits instead (Sampler::Verify): the
  // stream's tokens are then distributed exactly as without drafting (greedy: the same tokens).
  Step Next(float* logits, const Proposal* proposal = nullptr);
  // The part of Next without a proposal that reads `logits` (the log-probabilities' row, the
  // grammar's mask, the draw) and touches only this stream: different streams may Choose on
  // different threads at once (a server step's sequences, in parallel). The next Next, without a
  // proposal and on the same row, then takes the chosen token instead of drawing again.
  void Choose(float* logits);

  // Drafting (speculative decoding): BeginDraft starts a draft from the stream's tokens so far;
  // Draft picks the next drafted token from a draft model's logits with the same sampling options
  // (its own random numbers), writing its distribution to `probs` (vocab floats) when sampling.
  void BeginDraft();
  int32_t Draft(float* logits, float* probs);
  bool greedy() const { return opt_.sampling.temperature <= 0.0f; }
  // Ends the stream early (cancel, time limit, error); returns the text still held back.
  std::string_view Finish(FinishReason reason);

  FinishReason finish_reason() const { return reason_; }
  const std::vector<int32_t>& tokens() const { return tokens_; }
  const std::string& text() const { return text_; }

 private:
  std::string_view Emit(bool final);
  // Reads `logits` for the log-probabilities and applies the grammar's mask; false when the
  // grammar allows no token.
  bool ReadRow(float* logits);

  // A copy: a server lane may swap its model (a merged copy) while the stream runs.
  std::vector<int64_t> eos_token_ids_;
  GenerationOptions opt_;
  Sampler sampler_;
  std::optional<Sampler> draft_sampler_;  // made on first BeginDraft
  StreamingDecoder decoder_;
  std::optional<GrammarState> grammar_, draft_grammar_;
  std::vector<int32_t> tokens_;
  std::string text_;    // the output text (stop string removed)
  size_t emitted_ = 0;  // bytes of text_ already returned
  std::string delta_;
  std::vector<float> raw_logits_;  // logprobs: the row before the sampler transforms it
  LogprobRow logprob_row_;
  TokenLogprobs logprobs_;
  // What Choose left for the next Next on the same row: the token (-1: the grammar allows
  // nothing), or none.
  std::optional<int32_t> chosen_;
  const float* chosen_row_ = nullptr;
  size_t max_stop_ = 0;
  FinishReason reason_ = FinishReason::kNone;
};

struct GenerationResult {
  std::vector<int32_t> tokens;
  std::string text;
  FinishReason finish_reason = FinishReason::kNone;
  int64_t prompt_tokens = 0;
  double prefill_ms = 0, decode_ms = 0;
};

// Return false to cancel.
using StreamCallback = std::function<bool(int32_t token, std::string_view text)>;

// Prefills `prompt` into `slot` (resetting it) and decodes until a stop condition.
absl::StatusOr<GenerationResult> Generate(Engine& engine, KVCache& cache, int64_t slot,
                                          const Tokenizer& tok, std::span<const int32_t> prompt,
                                          const GenerationOptions& options,
                                          const StreamCallback& on_token = nullptr);

}  // namespace amoeba
