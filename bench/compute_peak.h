// The multiply-add peak of the instruction a decode path's projections are built on, measured on
// this machine: independent chains of that one instruction on registers, on every thread at once.
// A step whose projections need longer than their multiply-adds at this rate cannot reach the
// memory roofline whatever its kernel does; bench/decode reports how close it could get.
#pragma once

#include <string>

#include "model/quantized_panels.h"

namespace amoeba::bench {

struct ComputePeak {
  std::string instruction;         // e.g. "vpdpbusd zmm"; empty where nothing was measured
  double multiply_adds_per_s = 0;  // all threads together
};

// fp32 fused multiply-adds, at the widest vector the CPU has (the fp32 and fp16 panels' math).
ComputePeak MeasureFp32Peak(int threads);
// The int8 dot-product instruction of `kernel` (the q8_0 / q4_0 panels' math): AMX `tdpbssd`,
// `vpdpbusd` on zmm or ymm, AVX2's `vpmaddubsw` + `vpmaddwd` + `vpaddd`; nothing for the scalar
// kernel.
ComputePeak MeasureInt8Peak(QuantKernel kernel, int threads);

}  // namespace amoeba::bench
