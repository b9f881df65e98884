// Shared benchmark helpers: memory bandwidth (the roofline's denominator) and engine throughput.
#pragma once

#include <string>

#include "model/engine.h"
#include "model/runtime.h"

namespace amoeba::bench {

using amoeba::MeasureReadBandwidthGBs;

// Aggregate decode tokens/s for `batch` concurrent sequences, each after a prompt of `context`
// tokens (attention reads grow with it).
double DecodeRate(Engine& e, int batch, int steps, int context = 8);

// Prefill tokens/s of one prompt of `len` tokens.
double PrefillRate(Engine& e, int len);

// Writes the machine-readable JSON and the Markdown summary, and prints the summary.
void WriteReport(const std::string& json_path, const std::string& json_text,
                 const std::string& md_path, const std::string& md);

}  // namespace amoeba::bench
