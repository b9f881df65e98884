#include "model/generation.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "sampling_kernels.h"

namespace amoeba {

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kStopSequence:
      return "stop_sequence";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kTimeLimit:
      return "time_limit";
    case FinishReason::kError:
      return "error";
  }
  return "?";
}

TokenStream::TokenStream(const Tokenizer& tok, const ModelConfig& config,
                         const GenerationOptions& options, std::span<const int32_t> prompt)
    : eos_token_ids_(config.eos_token_ids.begin(), config.eos_token_ids.end()),
      opt_(options),
      sampler_(options.sampling, config.vocab_size),
      // Only a prompt of nothing but BOS makes the output the start of the text.
      decoder_(tok, prompt.empty() || (prompt.size() == 1 && prompt[0] == config.bos_token_id)) {
  for (int32_t t : prompt) sampler_.Observe(t);
  if (opt_.grammar) {
    const bool text_start =
        prompt.empty() || (prompt.size() == 1 && prompt[0] == config.bos_token_id);
    grammar_.emplace(opt_.grammar, text_start && tok.strips_leading_space());
  }
  for (const auto& s : opt_.stop) max_stop_ = std::max(max_stop_, s.size());
  tokens_.reserve(opt_.max_new_tokens);
}

void LogprobRow::Read(const float* logits, int64_t vocab) {
  logits_ = logits;
  vocab_ = vocab;
  // One pass over the vocabulary for the maximum, one for the sum (sampling_kernels.h).
  const float mx = RowMax(logits, vocab);
  log_z_ = mx + static_cast<float>(std::log(SumExp(logits, vocab, mx)));
}

void LogprobRow::Top(int32_t k, std::vector<std::pair<int32_t, float>>& out) {
  out.clear();
  k = static_cast<int32_t>(std::min<int64_t>(k, vocab_));
  if (k <= 0) return;
  // One scan keeping the k largest in order (k <= 20): most logits fail the first compare. Ties
  // go to the lower id (an equal value never displaces one seen before), so the order is
  // deterministic.
  top_.clear();
  for (int64_t i = 0; i < vocab_; ++i) {
    const float v = logits_[i];
    if (static_cast<int32_t>(top_.size()) == k && !(v > top_.back().first)) continue;
    auto at =
        std::upper_bound(top_.begin(), top_.end(), v,
                         [](float x, const std::pair<float, int32_t>& e) { return x > e.first; });
    top_.insert(at, {v, static_cast<int32_t>(i)});
    if (static_cast<int32_t>(top_.size()) > k) top_.pop_back();
  }
  for (const auto& [v, id] : top_) out.emplace_back(id, Of(id));
}

std::string_view TokenStream::Emit(bool final) {
  // Hold back a tail that could still grow into a stop string (and is a prefix of one).
  size_t upto = text_.size();
  if (!final) {
    for (const auto& s : opt_.stop) {
      for (size_t k = std::min(s.size() - 1, text_.size()); k > 0; --k) {
        if (text_.compare(text_.size() - k, k, s, 0, k) == 0) {
          upto = std::min(upto, text_.size() - k);
          break;
        }
      }
    }
  }
  delta_.assign(text_, emitted_, upto > emitted_ ? upto - emitted_ : 0);
  emitted_ = std::max(emitted_, upto);
  return delta_;
}

void TokenStream::BeginDraft() {
  if (!draft_sampler_) {
    SamplingOptions o = opt_.sampling;
    o.seed ^= 0x9E3779B97F4A7C15ull;  // independent of the target's draws (the rule needs it)
    draft_sampler_.emplace(o, sampler_.vocab_size());
  }
  if (sampler_.UsesHistory()) draft_sampler_->CopyHistoryFrom(sampler_);
  if (grammar_) draft_grammar_ = *grammar_;
}

int32_t TokenStream::Draft(float* logits, float* probs) {
  // Drafts are masked too: a draft the grammar forbids would only be rejected by the check.
  if (draft_grammar_) draft_grammar_->Mask(logits, sampler_.vocab_size());
  const int32_t tok = draft_sampler_->Sample(logits, greedy() ? nullptr : probs);
  if (sampler_.UsesHistory()) draft_sampler_->ObserveGenerated(tok);
  if (draft_grammar_) draft_grammar_->Accept(tok);
  return tok;
}

bool TokenStream::ReadRow(float* logits) {
  if (opt_.logprobs >= 0) {  // the model's distribution: before the sampler transforms the row
    raw_logits_.assign(logits, logits + sampler_.vocab_size());
    logprob_row_.Read(raw_logits_.data(), sampler_.vocab_size());
  }
  // The grammar masks the row before any sampling (or check of a draft): a forbidden token has
  // probability 0, so a check never accepts one.
  return !grammar_ || grammar_->Mask(logits, sampler_.vocab_size());
}

void TokenStream::Choose(float* logits) {
  chosen_.reset();
  if (reason_ == FinishReason::kNone) chosen_ = ReadRow(logits) ? sampler_.Sample(logits) : -1;
  chosen_row_ = logits;
}

TokenStream::Step TokenStream::Next(float* logits, const Proposal* proposal) {
  Step step;
  if (reason_ != FinishReason::kNone) {
    step.done = true;
    return step;
  }
  int32_t tok;
  if (proposal) {  // a check of the draft on the (masked) row instead of a draw
    chosen_.reset();
    tok = ReadRow(logits)
              ? sampler_.Verify(logits, proposal->token, proposal->probs, &step.accepted)
              : -1;
  } else {
    if (!chosen_ || chosen_row_ != logits) Choose(logits);
    tok = *chosen_;
    chosen_.reset();
  }
  if (tok < 0) {  // the grammar allows nothing: no token in the vocabulary can continue
    step.text = Finish(FinishReason::kEos);
    step.done = true;
    return step;
  }
  if (grammar_) grammar_->Accept(tok);
  if (opt_.logprobs >= 0) {
    logprobs_.token = tok;
    logprobs_.logprob = logprob_row_.Of(tok);
    logprob_row_.Top(std::min(opt_.logprobs, kMaxTopLogprobs), logprobs_.top);
    step.logprobs = &logprobs_;
  }
  sampler_.ObserveGenerated(tok);
  tokens_.push_back(tok);
  step.token = tok;
  const bool eos = opt_.stop_at_eos && std::find(eos_token_ids_.begin(), eos_token_ids_.end(),
                                                 tok) != eos_token_ids_.end();
  if (eos) {
    reason_ = FinishReason::kEos;
  } else {
    const size_t before = text_.size();
    text_ += decoder_.Push(tok);
    if (max_stop_ > 0 && text_.size() > before) {
      // Only a window that includes new text can hold a new match.
      const size_t from = before >= max_stop_ ? before - max_stop_ + 1 : 0;
      size_t cut = std::string::npos;
      for (const auto& s : opt_.stop) {
        if (s.empty()) continue;
        size_t p = text_.find(s, from);
        if (p != std::string::npos) cut = std::min(cut, p);
      }
      if (cut != std::string::npos) {
        text_.resize(cut);
        reason_ = FinishReason::kStopSequence;
      }
    }
    // A complete sentence that nothing can extend: done, without a step for end-of-sequence.
    if (reason_ == FinishReason::kNone && grammar_ && grammar_->finished())
      reason_ = FinishReason::kEos;
    if (reason_ == FinishReason::kNone &&
        static_cast<int64_t>(tokens_.size()) >= opt_.max_new_tokens) {
      reason_ = FinishReason::kLength;
    }
  }
  if (reason_ != FinishReason::kNone && reason_ != FinishReason::kStopSequence) {
    text_ += decoder_.Flush();
  }
  step.done = reason_ != FinishReason::kNone;
  step.text = Emit(step.done);
  return step;
}

std::string_view TokenStream::Finish(FinishReason reason) {
  if (reason_ == FinishReason::kNone) {
    reason_ = reason;
    text_ += decoder_.Flush();
  }
  return Emit(true);
}

absl::StatusOr<GenerationResult> Generate(Engine& engine, KVCache& cache, int64_t slot,
                                          const Tokenizer& tok, std::span<const int32_t> prompt,
                                          const GenerationOptions& options,
                                          const StreamCallback& on_token) {
  using Clock = std::chrono::steady_clock;
  if (prompt.empty()) return absl::InvalidArgumentError("prompt: empty");
  if (options.max_new_tokens < 1) return absl::InvalidArgumentError("max_new_tokens: must be >= 1");
  const int64_t room = cache.max_len() - static_cast<int64_t>(prompt.size());
  if (room < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt: ", prompt.size(), " tokens leave no room in a context of ", cache.max_len()));
  }
  GenerationOptions opt = options;
  opt.max_new_tokens = std::min(opt.max_new_tokens, room);
  cache.Reset(slot);
  TokenStream stream(tok, engine.model().config, opt, prompt);
  GenerationResult res;
  res.prompt_tokens = static_cast<int64_t>(prompt.size());
  const auto t0 = Clock::now();
  const auto deadline = t0 + std::chrono::milliseconds(opt.time_limit_ms);
  SeqInput in{slot, prompt};
  int32_t next = 0;
  auto t_prefill = t0;
  for (;;) {
    auto logits = engine.Forward(cache, std::span<const SeqInput>(&in, 1));
    if (!logits.ok()) return logits.status();
    if (in.tokens.size() > 1 || t_prefill == t0) {
      t_prefill = Clock::now();
      res.prefill_ms = std::chrono::duration<double, std::milli>(t_prefill - t0).count();
    }
    TokenStream::Step step = stream.Next(logits->data_ptr<float>());
    if (on_token && !step.done && !on_token(step.token, step.text)) {
      stream.Finish(FinishReason::kCancelled);
      break;
    }
    if (step.done) {
      if (on_token && !step.text.empty()) on_token(step.token, step.text);
      break;
    }
    if (opt.time_limit_ms > 0 && Clock::now() >= deadline) {
      std::string_view rest = stream.Finish(FinishReason::kTimeLimit);
      if (on_token && !rest.empty()) on_token(-1, rest);
      break;
    }
    next = step.token;
    in.tokens = std::span<const int32_t>(&next, 1);
  }
  res.decode_ms = std::chrono::duration<double, std::milli>(Clock::now() - t_prefill).count();
  res.tokens = stream.tokens();
  res.text = stream.text();
  res.finish_reason = stream.finish_reason();
  return res;
}

}  // namespace amoeba
