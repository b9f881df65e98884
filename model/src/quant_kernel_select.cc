// Which integer kernel runs: the CPU's features (AMX asks Linux for the tile state), a forced
// choice for tests and benches, and their names.
#include <atomic>
#include <vector>

#include "model/kernels.h"
#include "model/quantized_panels.h"
#include "quantized_block.h"

namespace amoeba {
namespace quant {

bool CpuHasAvx512Vnni() {
  static const bool has = CpuHasAvx512() && __builtin_cpu_supports("avx512vnni");
  return has;
}

bool CpuHasAvxVnni() {
  static const bool has = CpuHasAvx2Fma() && __builtin_cpu_supports("avxvnni");
  return has;
}

// AMX-int8 (the tiles and Linux's permission to use them: model/kernels.h) and AVX512-VNNI,
// which the AMX kernel uses for rows that do not fill a tile.
bool CpuHasAmxInt8() {
  static const bool has = CpuHasAvx512Vnni() && CpuHasAmx(AmxExtension::kInt8);
  return has;
}

}  // namespace quant

using namespace quant;

namespace {

bool CpuHas(QuantKernel k) {
  switch (k) {
    case QuantKernel::kAmxInt8:
      return CpuHasAmxInt8();
    case QuantKernel::kAvx512Vnni:
      return CpuHasAvx512Vnni();
    case QuantKernel::kAvxVnni:
      return CpuHasAvxVnni();
    case QuantKernel::kAvx2:
      return CpuHasAvx2Fma();
    case QuantKernel::kScalar:
      return true;
    default:
      return false;
  }
}

std::atomic<int> g_forced_kernel{static_cast<int>(QuantKernel::kAuto)};

}  // namespace

void ForceQuantKernel(QuantKernel k) {
  g_forced_kernel.store(static_cast<int>(k));
}

QuantKernel ActiveQuantKernel() {
  const auto forced = static_cast<QuantKernel>(g_forced_kernel.load(std::memory_order_relaxed));
  if (forced != QuantKernel::kAuto && CpuHas(forced)) return forced;
  const KernelIsa isa = ActiveKernelIsa();
  if (isa == KernelIsa::kAvx512 && CpuHasAmxInt8()) return QuantKernel::kAmxInt8;
  if (isa == KernelIsa::kAvx512 && CpuHasAvx512Vnni()) return QuantKernel::kAvx512Vnni;
  if (isa >= KernelIsa::kAvx2) return CpuHasAvxVnni() ? QuantKernel::kAvxVnni : QuantKernel::kAvx2;
  return QuantKernel::kScalar;
}

std::vector<QuantKernel> AvailableQuantKernels() {
  std::vector<QuantKernel> ks;
  for (QuantKernel k : {QuantKernel::kScalar, QuantKernel::kAvx2, QuantKernel::kAvxVnni,
                        QuantKernel::kAvx512Vnni, QuantKernel::kAmxInt8})
    if (CpuHas(k)) ks.push_back(k);
  return ks;
}

const char* QuantKernelName(QuantKernel k) {
  switch (k) {
    case QuantKernel::kAmxInt8:
      return "amx-int8";
    case QuantKernel::kAvx512Vnni:
      return "avx512-vnni";
    case QuantKernel::kAvxVnni:
      return "avx-vnni";
    case QuantKernel::kAvx2:
      return "avx2";
    case QuantKernel::kScalar:
      return "scalar";
    default:
      return "auto";
  }
}

const char* QuantKernelName() {
  return QuantKernelName(ActiveQuantKernel());
}

}  // namespace amoeba
