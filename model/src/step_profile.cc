#include "model/step_profile.h"

#include <algorithm>
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

void StepProfile::Add(const StepProfile& o) {
  for (int ph = 0; ph < kNumStepPhases; ++ph) ns[ph] += o.ns[ph];
  quantize_ns += o.quantize_ns;
  pass_ns += o.pass_ns;
  passes += o.passes;
  rows += o.rows;
  for (int m = 0; m < kMaxMembers; ++m) barrier_wait_ns[m] += o.barrier_wait_ns[m];
  members = std::max(members, o.members);
}

int64_t StepProfile::others_wait_ns() const {
  const int n = std::min(members, kMaxMembers);
  if (n < 2) return 0;
  int64_t sum = 0;
  for (int m = 1; m < n; ++m) sum += barrier_wait_ns[m];
  return sum / (n - 1);
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
