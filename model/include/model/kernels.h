// CPU compute kernels for the inference engine. Linear layers dispatch by the number of input
// rows: 1 → GEMV streaming the weight once, 2..kSkinnyMaxRows → skinny GEMM streaming each weight
// row once for all inputs, more → BLAS GEMM. AVX2/FMA paths are chosen at run time, with portable
// fallbacks. Weights may be prefix views ([out, in] with row stride >= in, unit column stride).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace amoeba {

inline constexpr int64_t kSkinnyMaxRows = 32;

enum class LinearPath { kAuto, kTorch };

// y[n, out] = x[n, in] · W[out, in]^T (+ bias[out]). W is fp32 or fp16 (converted in registers). x
// rows are contiguous (stride `in`), y rows contiguous (stride `out`). `path` = kTorch forces
// at::linear (the baseline).
void Linear(const float* x, int64_t n, const at::Tensor& W, const float* bias, float* y,
            LinearPath path = LinearPath::kAuto);

// y[n, out] = x[n, in] · W[out, in]^T for fp32 W, every output one dot product of a W row and an x
// row: a row's result does not depend on how many rows come with it (the GEMV of Linear's one-row
// case, for every n). For small products that must agree with decoding token by token.
void LinearRowwise(const float* x, int64_t n, const at::Tensor& W, float* y);

// out = x * rsqrt(mean(x^2) + eps) * w, per row of length `dim`.
void RmsNorm(const float* x, const float* w, int64_t rows, int64_t dim, double eps, float* out);

// a = silu(a) * b elementwise.
void SiluMul(float* a, const float* b, int64_t n);

// y += x elementwise.
void AddInPlace(float* y, const float* x, int64_t n);

float Dot(const float* a, const float* b, int64_t n);
// y += alpha * x
void Axpy(float alpha, const float* x, float* y, int64_t n);
// y *= alpha
void Scale(float* y, float alpha, int64_t n);
// Index of the first largest of x[0, n) (std::max_element's pick), NaNs skipped; 0 when n is 0
// or every value is NaN. Vectorised: greedy picks over a vocabulary of logits per decoded row.
int64_t Argmax(const float* x, int64_t n);
// y = x rounded to IEEE half (round to nearest even).
void FloatToHalf(const float* x, at::Half* y, int64_t n);

// True when the CPU has AVX2, FMA and F16C (the fast paths are used).
bool CpuHasAvx2Fma();
bool CpuHasAvx512();
// AVX512-BF16 (vdpbf16ps): Zen 4 and later, Cooper Lake and Sapphire Rapids and later.
bool CpuHasAvx512Bf16();
// AMX tiles (Sapphire Rapids and later) with an extension, and Linux's permission to use them.
enum class AmxExtension { kBf16 = 22, kInt8 = 25 };  // their CPUID.(7,0):EDX bits
bool CpuHasAmx(AmxExtension extension);
// AMX-BF16 and AVX512-BF16 (the bf16 attention kernels use both).
bool CpuHasAmxBf16();

// Instruction sets of the skinny-GEMM path, best last. kAuto = the best this CPU has.
enum class KernelIsa { kAuto = -1, kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
// Caps the instruction set (tests and benchmarks compare paths); never raises it above the CPU's.
void ForceKernelIsa(KernelIsa isa);
KernelIsa ActiveKernelIsa();
const char* KernelIsaName(KernelIsa isa);

// Prefill attention's bf16 kernels (EngineOptions::bf16_prefill_attention). kAuto: AMX-BF16 tiles
// where the CPU has them (head dimensions 32, 64, 128), else none (fp32). kAvx512Bf16 (vdpbf16ps)
// ran slower than the fp32 kernel on a Sapphire Rapids Xeon; it runs only when forced (tests,
// bench/prefill), for the CPUs where it may pay.
enum class PrefillBf16Kernel { kAuto = -1, kNone = 0, kAvx512Bf16 = 1, kAmxBf16 = 2 };
// kNone and the kernels this CPU runs.
std::vector<PrefillBf16Kernel> AvailablePrefillBf16Kernels();
// Picks the kernel (kAuto = the default above); one the CPU lacks falls back to fp32.
void ForcePrefillBf16Kernel(PrefillBf16Kernel kernel);
PrefillBf16Kernel ActivePrefillBf16Kernel(int64_t head_dim);
const char* PrefillBf16KernelName(PrefillBf16Kernel kernel);

}  // namespace amoeba
