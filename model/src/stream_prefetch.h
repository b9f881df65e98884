// Whether the panel kernels (packed_linear, quantized_panels) issue software prefetches ahead of
// the weight stream. It depends on the machine and the format: 4 KB ahead took Zen 3 and Zen 5
// VMs from 76-85% to 88-91% of a read probe and gains 2-6% on a Sapphire-Rapids-class Xeon, but
// cost a 2.6 GHz Zen 4 VM 9-24% in q8_0 (its hardware prefetcher alone streamed at the probe's
// rate); on the Xeon the quantized kernels stream best 1 KB ahead. A kernel-only calibration
// picked the wrong side for two of four formats on the Xeon, so the choice is made on real decode
// steps: the first batch-1 steps of a model that streams from DRAM take the arms in turn, and
// the fastest median wins (once per process and format).
// Only one-input calls follow it: with more inputs the compute per line is larger and the
// prefetch paid on every machine measured (the Zen 4 VM too: batch 16 10-19% slower without).
#pragma once
#include <cstddef>
#include <cstdint>

#include "model/weight_format.h"

namespace amoeba {

inline constexpr int64_t kPrefetchChoiceMaxRows = 1;
// Weights larger than this stream from DRAM on a small VM (sysconf reports the socket's L3,
// 320-480 MB on our 2-core VMs, whose share is nearer 32 MB); smaller ones do not care.
inline constexpr size_t kPrefetchTrialMinBytes = size_t{32} << 20;
// Models beyond even a whole socket's L3 have a trial of their own: on the Xeon the 100m preset
// in q4_0 (62 MB) ran near and far alike while TinyLlama's (582 MB) streamed 97% vs 82%.
inline constexpr size_t kPrefetchTrialLargeBytes = size_t{512} << 20;
// Decode steps timed on each arm before the choice is made.
inline constexpr int kPrefetchTrialSteps = 12;

// The arms: no prefetch, near (1 KB ahead), far (4 KB ahead). The AVX2 fp32/fp16 kernel has one
// distance: near and far are the same there, and the trial has two arms.
enum class StreamPrefetch { kAuto = -1, kOff = 0, kNear = 1, kFar = 2 };
inline constexpr int kDefaultPrefetchArm = 2;  // kFar: the long-standing default
// How far ahead of the block being computed the one-input kernels prefetch, by arm.
constexpr int64_t PrefetchAheadBytes(int arm) {
  return arm == 1 ? 1024 : 4096;
}

// The address `bytes` ahead of `p` in a panel stream: a distance in bytes whatever the element
// type (a fp16 stream once went 2 KB ahead where 4 KB was meant: 1024 elements, not bytes).
template <typename T>
inline const char* StreamAhead(const T* p, int64_t bytes) {
  return reinterpret_cast<const char*>(p) + bytes;
}

// The arm for one-input kernel calls on this thread: set by ScopedPrefetchArm (the engine sets
// its model's choice, or a trial arm, for a batch-1 step), else forced, else kDefaultPrefetchArm.
int StreamPrefetchArm();
// Tests and benches: force an arm for every format (kAuto: back to the choice).
void ForceStreamPrefetch(StreamPrefetch p);

// The trials, one per weight format and size class: the key of a model with `weight_bytes` of
// panels in `f`, or -1 for models small enough to stay in the cache.
int PrefetchTrialKey(WeightFormat f, size_t weight_bytes);
// The arm the next batch-1 decode step of a model with `key` runs: the choice once made, else
// the trial's next arm (in turn: off, near, far; off, far for fp32/fp16 without AVX-512) with
// *on_trial set; -1 while forced (the kernels then read the forcing). Record a trial step's time
// with RecordPrefetchTrial; after kPrefetchTrialSteps on each arm the choice is made and logged:
// the default unless another arm's median is at least 3% faster. Thread-safe.
int PrefetchArmForStep(int key, bool* on_trial);
void RecordPrefetchTrial(int key, int arm, double seconds);
// The decision once made (an arm), or -1 while on trial.
int PrefetchTrialChoice(int key);
// Tests: start a trial over.
void ResetPrefetchTrial(int key);

// Sets this thread's arm for its scope (arm < 0: leaves the choice alone). Each member of a
// decode team sets it: the kernels read the choice on the thread that runs them.
class ScopedPrefetchArm {
 public:
  explicit ScopedPrefetchArm(int arm);
  ~ScopedPrefetchArm();
  ScopedPrefetchArm(const ScopedPrefetchArm&) = delete;
  ScopedPrefetchArm& operator=(const ScopedPrefetchArm&) = delete;

 private:
  int previous_;
};

}  // namespace amoeba
