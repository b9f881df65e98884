// Shared benchmark helpers: memory bandwidth (the roofline's denominator) and engine throughput.
#pragma once

#include "model/engine.h"

namespace amoeba::bench {

// GB/s reading a buffer much larger than the last-level cache with all threads.
double MeasureReadBandwidthGBs(double buffer_mib = 512, int repeats = 5);

// Aggregate decode tokens/s for `batch` concurrent sequences after a short prompt each.
double DecodeRate(Engine& e, int batch, int steps);

// Prefill tokens/s of one prompt of `len` tokens.
double PrefillRate(Engine& e, int len);

}  // namespace amoeba::bench
