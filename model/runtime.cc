#include "model/runtime.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include "model/kernels.h"

namespace amoeba {

std::string DescribeBlas() {
  // Force BLAS to be exercised so lazily-resolved libraries are mapped.
  at::mm(at::ones({2, 2}), at::ones({2, 2}));
  std::ifstream maps("/proc/self/maps");
  std::string line, found;
  while (std::getline(maps, line)) {
    if (line.find("openblas") != std::string::npos) {
      return line.find("openmp") != std::string::npos ? "openblas-openmp"
             : line.find("pthread") != std::string::npos ? "openblas-pthread"
                                                         : "openblas";
    }
    if (line.find("libmkl") != std::string::npos) return "mkl";
    if (line.find("libblis") != std::string::npos) return "blis";
    if (line.find("atlas") != std::string::npos) return "atlas";
    if (line.find("/blas/libblas.so") != std::string::npos) found = "reference";
  }
  return found.empty() ? "unknown" : found;
}

void InitLogging() {
  auto logger = spdlog::stderr_color_mt("amoeba");
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v");
}

void InitRuntime(int threads) {
  const int cores = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  const int n = threads > 0 ? threads : std::max(1, cores);
  at::set_num_threads(n);
  const std::string blas = DescribeBlas();
  spdlog::info("runtime: {} threads, BLAS {}, AVX2/FMA kernels {}", at::get_num_threads(), blas,
               CpuHasAvx2Fma() ? "on" : "off (portable fallback)");
  if (blas == "reference" || blas == "unknown") {
    spdlog::warn("!!! libtorch is using the {} BLAS: matrix products will be ~40x slower. "
                 "Install libopenblas0-openmp (scripts/setup does) !!!", blas);
  }
}

}  // namespace amoeba
