// Process-wide runtime set-up: thread count and a check that libtorch uses an optimised BLAS.
#pragma once
#include <string>

namespace amoeba {

// Routes spdlog to stderr (stdout is for program output) with one line per event.
void InitLogging();

// Sets libtorch's intra-op threads (0 = all cores) and logs the BLAS in use, warning loudly when
// it is the reference implementation (~40x slower). Call once at program start.
void InitRuntime(int threads);

// The BLAS library mapped into this process ("openblas-openmp", "reference", ...).
std::string DescribeBlas();

}  // namespace amoeba
