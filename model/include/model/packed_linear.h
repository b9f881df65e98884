// Weights packed for decode (the engine's default weight layout): panels of 16 output rows stored
// k-major, [ceil(out/16), in, 16] fp32 or fp16, zero-padded (the Q8_0/Q4_0 block formats keep
// 16-row panels in blocks of 32 inputs: model/quantized_panels.h). The kernel is an outer product
// per k: one 16-wide weight load feeds up to 16 inputs' accumulators (no horizontal sums), inputs
// are taken 16 at a time, and each thread reads its panels as one sequential stream (with a
// software prefetch ahead from 8 inputs up, so computing and streaming from DRAM overlap). A prefix
// of the original matrix (a sliced subnet: fewer outputs and/or inputs) is served from the same
// panels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include <cstdint>
#include <functional>
#include <optional>
#include <span>

#include "model/team.h"
#include "model/weight_format.h"
#include "model/weights.h"

namespace amoeba {

// Packs W [out, in] (fp32 or fp16, any strides) into panels of format `f` (default: W's dtype).
// fp16 panels are converted to fp32 in registers; the block formats dot in integers per block;
// accumulation is fp32 throughout.
at::Tensor PackPanels(const at::Tensor& W, std::optional<WeightFormat> f = std::nullopt);
// The format of panels made by PackPanels.
WeightFormat PanelsFormat(const at::Tensor& panels);

// y[n, out] = x[n, in] · W[:out, :in]^T (+ bias[out]) for `panels` = PackPanels(W), with out and
// in at most W's sizes. x rows are contiguous (stride in), y rows contiguous (stride out).
void LinearPacked(const float* x, int64_t n, const at::Tensor& panels, int64_t out, int64_t in,
                  const float* bias, float* y);

// Several projections of one input (q, k, v; gate, up) in one pass: the input is transposed (or
// quantized) once and all their panels run in one parallel region. Panels must share a format;
// y_i[n, out_i].
struct PackedOutput {
  const at::Tensor* panels = nullptr;
  int64_t out = 0;
  const float* bias = nullptr;  // optional
  float* y = nullptr;
  // Optional, ceil(out/16) entries: panel p computes only rows [0, panel_rows[p]) of y (rows of
  // several widths in one pass, widest first: a narrower row needs fewer panels). Rows a panel
  // skips keep whatever y held.
  const int64_t* panel_rows = nullptr;
};
void LinearPackedMany(const float* x, int64_t n, int64_t in, std::span<const PackedOutput> outs);

// For kernels: calls fn(output, panel index, valid rows of that panel) for every 16-row panel of
// `outs`, the outputs' panels numbered back to back and split over the threads in one region
// (or over the current team, a member that is done taking the others' last panels:
// ParallelForStealing, model/team.h).
template <typename Fn>
void ForEachPanel(std::span<const PackedOutput> outs, const Fn& fn) {
  constexpr int64_t kRows = 16;
  int64_t total = 0;
  for (const PackedOutput& o : outs) total += (o.out + kRows - 1) / kRows;
  ParallelForStealing(0, total, 4, 4, [&](int64_t b, int64_t e) {
    size_t i = 0;
    int64_t first = 0;  // global index of outs[i]'s first panel
    for (int64_t g = b; g < e; ++g) {
      while (g >= first + (outs[i].out + kRows - 1) / kRows)
        first += (outs[i++].out + kRows - 1) / kRows;
      const int64_t p = g - first;
      fn(outs[i], p, std::min(kRows, outs[i].out - p * kRows));
    }
  });
}

// Packs every projection and the LM head of `m` that has no panels yet into panels of format `f`
// (LayerWeights::panels, Model::head_panels). The engine then decodes from the panels. The
// embedding stays row-major in its dtype (decode reads one row of it per token).
// `between_matrices`, when set, is called after each matrix is packed: a background caller may
// block in it to let foreground work have the cores.
void PackWeights(Model& m, WeightFormat f = WeightFormat::kF32,
                 const std::function<void()>& between_matrices = {});
// Packs every low-rank delta of `m` that has no panels yet (LowRankDelta::down_panels), in the
// format of the projection's panels (q8_0 where those are q8_0 or q4_0: a delta's factors are
// small and q4_0 would cost it more precision than it saves bytes). Projections without panels
// keep their deltas row-major.
void PackDeltas(Model& m);
// The bytes PackDeltas would add to `m` (0 when nothing is left to pack).
int64_t PackDeltasBytes(const Model& m);
// Drops every panel of `m` (views of another model's panels included): the engine then reads the
// row-major weights.
void DropPanels(Model& m);
// DropPanels, then PackWeights in format `f`: panels of its own in that format. The row-major
// weights must be readable.
void RepackWeights(Model& m, WeightFormat f, const std::function<void()>& between_matrices = {});

// Tells the kernel that the row-major projection and LM head pages of `m` will not be read soon
// (madvise MADV_PAGEOUT): pages mapped from a safetensors file leave resident memory and come
// back from the file if something reads them (merging adapters, export). Contents never change;
// anonymous pages stay unless there is swap. For models decoded from panels.
void ReleaseRowMajorPages(const Model& m);

// For decode-only copies (a server lane's merged adapters): replaces every projection that has
// panels by a storage-less (meta) tensor of its shape and dtype, freeing the row-major copy. The
// engine needs only the shape; reading the values (TorchForward, merging, saving) fails loudly.
void DropPackedRowMajor(Model& m);

}  // namespace amoeba
