// Measures this machine's sustained memory read bandwidth (the decode roofline's denominator).
#pragma once

namespace amoeba::bench {

// GB/s reading a buffer much larger than the last-level cache with all threads.
double MeasureReadBandwidthGBs(double buffer_mib = 512, int repeats = 5);

}  // namespace amoeba::bench
