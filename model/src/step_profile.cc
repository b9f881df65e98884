#include "model/step_profile.h"

#include <chrono>

namespace amoeba {

namespace {

thread_local StepProfile* attached = nullptr;

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

std::string_view StepPhaseName(StepPhase phase) {
  static constexpr std::array<std::string_view, kNumStepPhases> kNames = {
      "embed",   "norm",     "qkv",  "rope",     "attention", "o",
      "gate_up", "silu_mul", "down", "residual", "head"};
  const int i = static_cast<int>(phase);
  return i >= 0 && i < kNumStepPhases ? kNames[i] : "unknown";
}

int64_t StepProfile::total_ns() const {
  int64_t t = 0;
  for (int64_t v : ns) t += v;
  return t;
}

StepProfile* AttachedStepProfile() {
  return attached;
}

ScopedStepProfile::ScopedStepProfile(StepProfile* profile) : previous_(attached) {
  attached = profile;
}

ScopedStepProfile::~ScopedStepProfile() {
  attached = previous_;
}

PassTimer::PassTimer() : profile_(attached) {
  if (profile_) entered_ns_ = NowNs();
}

void PassTimer::Done(int64_t rows) {
  if (!profile_) return;
  ++profile_->passes;
  profile_->rows += rows;
  profile_->pass_ns += NowNs() - entered_ns_;
}

PhaseTimer::PhaseTimer() : profile_(attached) {
  if (profile_) last_ns_ = NowNs();
}

void PhaseTimer::MarkSlow(StepPhase phase) {
  const int64_t now = NowNs();
  profile_->ns[static_cast<int>(phase)] += now - last_ns_;
  last_ns_ = now;
}

}  // namespace amoeba
