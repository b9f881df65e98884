// The Q8_0 / Q4_0 panel block layout (quantized_panels.h describes it), shared by the files that
// pack, read and compute with it: layout constants, one value or scale of a block, writing a row
// of a block, GGML's weight quantization rule, the activations as the kernels see them, and the
// CPU features that choose a kernel. Internal to model/.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#include "model/weight_format.h"

namespace amoeba::quant {

inline constexpr int64_t kPanel = 16;       // output rows per panel
inline constexpr int64_t kScaleBytes = 32;  // 16 fp16 scales at the start of each block
inline constexpr int64_t kGroupBytes = 64;  // 16 rows × 4 inputs

// Weight value (signed, offset removed) of row c, input k (0..31) of one block.
template <bool kQ4>
inline int32_t WeightAt(const uint8_t* blk, int64_t c, int64_t k) {
  const uint8_t* data = blk + kScaleBytes;
  if constexpr (kQ4) {
    const int64_t g = (k % 16) / 4, kk = k % 4;
    const uint8_t byte = data[g * kGroupBytes + c * 4 + kk];
    return static_cast<int32_t>(k < 16 ? (byte & 0x0F) : (byte >> 4)) - 8;
  } else {
    return static_cast<int8_t>(data[(k / 4) * kGroupBytes + c * 4 + k % 4]);
  }
}

inline float ScaleAt(const uint8_t* blk, int64_t c) {
  at::Half h;
  std::memcpy(&h, blk + 2 * c, sizeof(h));
  return static_cast<float>(h);
}

// Writes one block of one row: q (signed, offset removed) at the layout's places.
template <bool kQ4>
inline void PutBlockRow(uint8_t* blk, int64_t c, float scale, const int32_t* q) {
  const at::Half h(scale);
  std::memcpy(blk + 2 * c, &h, sizeof(h));
  uint8_t* data = blk + kScaleBytes;
  for (int64_t k = 0; k < kQuantBlock; ++k) {
    if constexpr (kQ4) {
      if (k >= 16) continue;
      const int64_t g = k / 4, kk = k % 4;
      data[g * kGroupBytes + c * 4 + kk] =
          static_cast<uint8_t>((q[k] + 8) | ((q[k + 16] + 8) << 4));
    } else {
      data[(k / 4) * kGroupBytes + c * 4 + k % 4] = static_cast<uint8_t>(static_cast<int8_t>(q[k]));
    }
  }
}

// GGML's rules. Q8_0: d = amax / 127, q = round(x / d). Q4_0: d = (the value of largest
// magnitude) / -8, q = min(15, trunc(x / d + 8.5)) - 8.
void QuantizeWeightBlock(bool q4, const float* v, float* scale, int32_t* q);

// Activations of one call, quantized per row into Q8_0 blocks: q [n][nb·32] int8 (zero past
// `in`), d [n][nb] fp32 scales, sum [n][nb] the sum of each block's q (for the unsigned offsets).
struct QuantActs {
  const int8_t* q = nullptr;
  const float* d = nullptr;
  const int32_t* sum = nullptr;
  int64_t nb = 0;
  // Rows readable from row 0: at least the rows of the call; for the tile kernel rounded up to
  // a whole group of 16 with zero rows (so a partial group can run in tiles, its extra rows
  // computed and dropped). 0: only the call's rows.
  int64_t rows = 0;
  // The same rows interleaved in pairs for the AVX-512 pair kernel, or null where it does not
  // run: pair p's block b is 64 bytes, for each group of 4 inputs row 2p's 4 values then row
  // 2p+1's; its scales and sums are [pair][block][2]. An odd last row is paired with a zero row.
  const int8_t* pair_q = nullptr;
  const float* pair_d = nullptr;
  const int32_t* pair_sum = nullptr;
};

// GGML's Q8_0 rule for activation rows (quantize_activations.cc): the portable version and
// the AVX512 one give the same bits.
void QuantizeRows(const float* x, int64_t n, int64_t in, int64_t nb, int8_t* q, float* d,
                  int32_t* sum);
void QuantizeRowsAvx512(const float* x, int64_t n, int64_t in, int64_t nb, int8_t* q, float* d,
                        int32_t* sum);
// Rows [0, rows) of quantized activations (q, d, sum as above) into the pair layout of QuantActs
// (pair_q, pair_d, pair_sum at pair 0); the second row of a last odd pair is zero.
void PairRowsAvx512(const int8_t* q, const float* d, const int32_t* sum, int64_t nb, int64_t rows,
                    int8_t* pair_q, float* pair_d, int32_t* pair_sum);

// What the CPU can run (cached; AMX also asks Linux for the tile state once per process).
bool CpuHasAvx512Vnni();
bool CpuHasAvxVnni();
bool CpuHasAmxInt8();

}  // namespace amoeba::quant
