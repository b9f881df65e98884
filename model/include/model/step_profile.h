// Where a forward pass spends its time: wall time per phase, measured on the thread that runs
// the pass (a team's first thread). Each phase ends at the barrier its kernels end with, so a
// phase's time includes the wait for the slowest member of the team. Off unless a profile is
// attached to the calling thread: a pass then pays one branch per phase.
#pragma once
#include <array>
#include <cstdint>
#include <string_view>

namespace amoeba {

enum class StepPhase : int {
  kEmbed,      // token embeddings
  kNorm,       // RMSNorm before attention, MLP and the head
  kQkv,        // the q/k/v projections (one stream of their panels)
  kRope,       // rotary embeddings (runs longer than one token; decode rotates inside attention)
  kAttention,  // KV append and attention
  kO,          // the output projection
  kGateUp,     // the gate/up projections
  kSiluMul,    // SiLU(gate) * up
  kDown,       // the down projection
  kResidual,   // residual adds, biases of dropped blocks, tails of narrower rows
  kHead,       // the LM head
  kCount
};
inline constexpr int kNumStepPhases = static_cast<int>(StepPhase::kCount);

std::string_view StepPhaseName(StepPhase phase);

struct StepProfile {
  std::array<int64_t, kNumStepPhases> ns{};  // per phase, summed over passes
  int64_t quantize_ns = 0;  // activation quantization inside the projections (part of them)
  // Whole passes, entry to return: the phases plus what runs before and after them (input
  // checks, the KV cache growing to hold the new tokens, starting the team).
  int64_t pass_ns = 0;
  int64_t passes = 0;
  int64_t rows = 0;  // token rows over all passes
  // Per team member (its tid; the first kMaxMembers): time spent in Team::Barrier waiting for
  // the others, summed over passes. A member waits while another finishes a larger share of a
  // split or runs serial work (Serially) alone.
  static constexpr int kMaxMembers = 8;
  std::array<int64_t, kMaxMembers> barrier_wait_ns{};
  int members = 0;  // the largest team that recorded into the profile

  int64_t total_ns() const;
  // Adds another profile's times and counts to this one.
  void Add(const StepProfile& other);
  // The mean of the waits of every member but the first (0 for a team of one or none).
  int64_t others_wait_ns() const;
};

// The profile passes on the calling thread record into (null: none).
StepProfile* AttachedStepProfile();

// Attaches `profile` to the calling thread for the object's lifetime.
class ScopedStepProfile {
 public:
  explicit ScopedStepProfile(StepProfile* profile);
  ~ScopedStepProfile();
  ScopedStepProfile(const ScopedStepProfile&) = delete;
  ScopedStepProfile& operator=(const ScopedStepProfile&) = delete;

 private:
  StepProfile* previous_;
};

// Times a whole pass: built at its entry, Done(rows) at its end counts it (rows, time) in the
// profile attached to the thread that built it; nothing without one.
class PassTimer {
 public:
  PassTimer();
  void Done(int64_t rows);

 private:
  StepProfile* profile_;
  int64_t entered_ns_ = 0;
};

// Marks phase boundaries: Mark(p) adds the time since the previous mark to phase p. A timer built
// on a thread without a profile does nothing.
class PhaseTimer {
 public:
  PhaseTimer();
  void Mark(StepPhase phase) {
    if (profile_) MarkSlow(phase);
  }

 private:
  void MarkSlow(StepPhase phase);
  StepProfile* profile_;
  int64_t last_ns_ = 0;
};

}  // namespace amoeba
