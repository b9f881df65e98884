// The one way to turn a supernet shape into a runnable or exportable Model: the shape's active
// layers, its per-layer widths (grid allocation, or the same fraction in every layer), the
// compensation biases, and the SMoL adapters for that shape merged into copies of the weights or
// attached unmerged to views. The scheduler, `eval` and export all build subnets through here, so
// what is exported is exactly what is served.
#pragma once
#include <functional>
#include <memory>

#include "absl/status/statusor.h"
#include "lora/smol.h"
#include "subnet/supernet.h"

namespace amoeba {

enum class AdapterMode {
  kNone,      // the base subnet (also what an untuned supernet gives in every mode)
  kUnmerged,  // views of the supernet plus a low-rank delta per adapted projection (cheap)
  kMerged,    // ΔW folded into copies of the sliced projections (fastest to run)
};

struct SubnetOptions {
  AdapterMode adapters = AdapterMode::kMerged;
  // Same fraction of heads/channels in every layer instead of the grid's global allocation (for
  // exports that plain HF loaders must read). The width must still be on the grid when adapters
  // are used: the router's input is the grid width index.
  bool uniform_width = false;
  // kUnmerged on a supernet decoded from panels: pack the deltas as panels too (PackDeltas: a
  // per-shape copy of the mixed factors, a small fraction of the shape's weights, that lets its
  // steps run as one team). false: they stay views of the adapters (no memory, slower).
  bool pack_deltas = true;
  // kMerged: called after each projection's merge (Smol::Merge); a background build blocks in it
  // while serving needs the cores.
  std::function<void()> between_matrices = nullptr;
};

// OK when BuildSubnet can build `shape`: depth in the depth table; width on the grid, or in
// (0, 1] for uniform widths without adapters. The message names the field.
absl::Status ValidateSubnetShape(const Supernet& s, const Smol* smol, const Shape& shape,
                                 const SubnetOptions& options);

// Validates `shape` (ValidateSubnetShape) and builds it. `smol` may be null (untuned supernet).
absl::StatusOr<Model> BuildSubnet(const Supernet& s, const Smol* smol, const Shape& shape,
                                  const SubnetOptions& options = {});

// The deterministic (noise-free) router gate of a grid shape.
at::Tensor ShapeGate(const Supernet& s, const Smol& smol, const Shape& shape);

// The supernet's adapters, as amoeba.json describes them: null when it names none, an error when
// it names adapters that smol.safetensors does not hold (or the file exists but amoeba.json says
// the supernet is untuned).
absl::StatusOr<std::unique_ptr<Smol>> LoadAdapters(const Supernet& s);

}  // namespace amoeba
