// Shared benchmark helpers: memory bandwidth (the roofline's denominator) and engine throughput.
#pragma once

#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "model/engine.h"
#include "model/runtime.h"
#include "model/step_profile.h"

namespace amoeba::bench {

using amoeba::BandwidthProbe;
using amoeba::MeasureReadBandwidthGBs;

// Aggregate decode tokens/s for `batch` concurrent sequences, each after a prompt of `context`
// tokens (attention reads grow with it).
double DecodeRate(Engine& e, int batch, int steps, int context = 8);

// One decode step's wall time, the read bandwidth probed right after it, and the cached
// positions its attention read (summed over the batch; each reads the KV cache's bytes).
struct StepSample {
  double seconds = 0;
  double probe_gbs = 0;
  int64_t positions = 0;
};
// `steps` decode steps as DecodeRate runs them, each followed by one pass of `probe`: every step
// gets the roofline of its own moment (this shared machine's bandwidth moves within seconds).
// paired = false: the steps back to back (weights that fit in the L3 stay there, as llama-bench
// runs them) and one probe after them for all. `profile`: the steps' time split, added to it.
std::vector<StepSample> DecodeStepsAgainstProbe(Engine& e, int batch, int steps, int context,
                                                BandwidthProbe& probe, bool paired = true,
                                                StepProfile* profile = nullptr);

// The time-split table of step profiles (model/step_profile.h): its header after the caller's
// leading columns (`lead`, e.g. "| preset | batch | pass ms |"), and one row's cells after them:
// each phase's share of the passes' wall time, then outside the phases, then quantization, then
// the time the team's first thread and (the mean of) its others waited at barriers.
std::string StepSplitHeader(const std::string& lead, int lead_columns);
std::string StepSplitCells(const StepProfile& p);
// Milliseconds per phase, outside the phases and in quantization, over `per` passes (or prompts).
nlohmann::json StepSplitMs(const StepProfile& p, double per);

// Prefill tokens/s of one prompt of `len` tokens.
double PrefillRate(Engine& e, int len);

// Writes the machine-readable JSON and the Markdown summary, and prints the summary.
void WriteReport(const std::string& json_path, const std::string& json_text,
                 const std::string& md_path, const std::string& md);

}  // namespace amoeba::bench
