// Q8_0 / Q4_0 decode panels and their kernels. A panel holds 16 output rows; for every block of 32
// inputs it stores the 16 rows' fp16 scales, then the values grouped by 4 consecutive inputs:
// 64 bytes = 16 rows × 4 inputs, the operand of one VNNI dot-product step (Q8_0: 8 groups of int8;
// Q4_0: 4 groups of bytes whose low nibbles are inputs 0-15 of the block and high nibbles inputs
// 16-31, stored as q + 8, unsigned). The tensor is [ceil(out/16), ceil(in/32), block bytes],
// int8 for Q8_0 and uint8 for Q4_0; values and scales are GGML's, only their order differs.
//
// The kernels quantize the activations per row into Q8_0 blocks (fp32 scale), dot in integers
// (AVX512-VNNI, AVX-VNNI, AVX2 maddubs, or portable code, chosen at run time) and scale per block
// in fp32. A prefix of the matrix is served from the same panels: fewer output rows read a panel
// prefix, fewer inputs read whole blocks with the activations zero-padded to the block boundary.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <span>
#include <vector>

#include "model/weight_format.h"

namespace amoeba {

struct PackedOutput;

// Bytes of one block of one panel: 32 (scales) + 512 (Q8_0) or 256 (Q4_0).
int64_t QuantBlockBytes(WeightFormat f);
// Panels of W [out, in] (fp32 or fp16, any strides) in `f` (kQ8_0 or kQ4_0).
at::Tensor PackQuantizedPanels(const at::Tensor& W, WeightFormat f);
// The same into `panels` (allocated by the caller: [ceil(out/16), ceil(in/32), block bytes]).
void FillQuantizedPanels(const at::Tensor& W, WeightFormat f, at::Tensor& panels);
// y_i[n, out_i] = x[n, in] · W_i[:out_i, :in]^T for quantized panels of one format (no bias).
void QuantizedLinearMany(const float* x, int64_t n, int64_t in, std::span<const PackedOutput> outs);

// GGML's own row layout (GGUF tensors): per block of 32, the fp16 scale then the values (Q8_0:
// 32 int8; Q4_0: 16 bytes, low nibbles the first 16, high nibbles the last 16, q + 8). Rows of
// `n` values, n a multiple of 32; the same rules as the panels, so the values are the same.
void QuantizeRowGgml(WeightFormat f, const float* x, int64_t n, uint8_t* out);
void DequantizeRowGgml(WeightFormat f, const uint8_t* in, int64_t n, float* out);

// References for tests: the [out, in] prefix of the matrix the panels hold, dequantized; and x
// [n, in] quantized to Q8_0 blocks and back, as the kernels see it.
at::Tensor DequantizePanels(const at::Tensor& panels, int64_t out, int64_t in);
at::Tensor QuantizeDequantizeActivations(const at::Tensor& x);

// The integer dot-product kernels. kAuto follows the active ISA (kernels.h): AVX-512 → kAmxInt8
// where the CPU has AMX-int8 tiles (groups of 16 rows: prefill and 16+ sequences; fewer rows run
// the VNNI kernel), else kAvx512Vnni with VNNI; AVX2 → kAvxVnni where the CPU has AVX-VNNI,
// else kAvx2 (`maddubs`); otherwise kScalar. Each kernel computes a row alone: its result does
// not depend on the other rows.
enum class QuantKernel { kAuto = -1, kScalar = 0, kAvx2, kAvxVnni, kAvx512Vnni, kAmxInt8 };
// Tests and benches: take `k` while the CPU has it (kAuto: back to the ISA's choice).
void ForceQuantKernel(QuantKernel k);
QuantKernel ActiveQuantKernel();
std::vector<QuantKernel> AvailableQuantKernels();
const char* QuantKernelName(QuantKernel k);
// The active kernel's name: "amx-int8", "avx512-vnni", "avx-vnni", "avx2" or "scalar".
const char* QuantKernelName();
// The AVX-512 kernels run 4 or more rows in pairs (a layout of the activations that halves the
// broadcasts per dot-product step; same bits). Tests and benches: false runs every row alone.
void ForceRowPairs(bool on);
}  // namespace amoeba
