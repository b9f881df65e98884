#include "subnet/subnet_builder.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "model/packed_linear.h"
#include "model/status_macros.h"

namespace amoeba {
namespace fs = std::filesystem;

at::Tensor ShapeGate(const Supernet& s, const Smol& smol, const Shape& shape) {
  return smol.Gate(
      smol.ShapeFeature(s.spec().FindDepth(shape.depth)->layers, s.WidthIndex(shape.width)), false);
}

absl::Status ValidateSubnetShape(const Supernet& s, const Smol* smol, const Shape& shape,
                                 const SubnetOptions& o) {
  const bool adapters = smol != nullptr && o.adapters != AdapterMode::kNone;
  // The router's input is the grid width index: adapters need a grid width.
  if (!o.uniform_width || adapters || !s.spec().FindDepth(shape.depth)) return s.Validate(shape);
  if (!(shape.width > 0 && shape.width <= 1))
    return absl::InvalidArgumentError("shape.width: must be in (0, 1]");
  return absl::OkStatus();
}

absl::StatusOr<Model> BuildSubnet(const Supernet& s, const Smol* smol, const Shape& shape,
                                  const SubnetOptions& o) {
  const bool adapters = smol != nullptr && o.adapters != AdapterMode::kNone;
  RETURN_IF_ERROR(ValidateSubnetShape(s, smol, shape, o));
  Model m;
  if (o.uniform_width) {
    ASSIGN_OR_RETURN(m, s.ExtractWith(shape.depth, AllocateUniform(s.base(), shape.width),
                                      ExtractMode::kSliced));
  } else {
    ASSIGN_OR_RETURN(m, s.Extract(shape));
  }
  if (!adapters) return m;
  const std::vector<int>& layers = s.spec().FindDepth(shape.depth)->layers;
  const at::Tensor gate = ShapeGate(s, *smol, shape);
  if (o.adapters == AdapterMode::kMerged) return smol->Merge(m, gate, layers, o.between_matrices);
  Model unmerged = smol->AttachUnmerged(m, gate, layers);
  if (o.pack_deltas) PackDeltas(unmerged);
  return unmerged;
}

absl::StatusOr<std::unique_ptr<Smol>> LoadAdapters(const Supernet& s) {
  const bool named = s.spec().smol.is_object() && s.spec().smol.contains("experts");
  const fs::path path = fs::path(s.dir()) / "smol.safetensors";
  const bool present = !s.dir().empty() && fs::exists(path);
  if (!named && !present) return std::unique_ptr<Smol>();
  if (named && !present) {
    return absl::DataLossError(
        "amoeba.json names SMoL adapters but smol.safetensors is missing (copy it back, or remove "
        "the \"smol\" entry to serve the untuned supernet)");
  }
  if (!named) {
    return absl::DataLossError(
        "smol.safetensors is present but amoeba.json names no adapters (tuning did not finish?)");
  }
  ASSIGN_OR_RETURN(Smol loaded, Smol::Load(path.string(), s.base()));
  if (loaded.config().experts != s.spec().smol.value("experts", int64_t{-1}) ||
      loaded.config().rank != s.spec().smol.value("rank", int64_t{-1})) {
    return absl::DataLossError(
        "smol.safetensors does not match the adapters amoeba.json names (experts/rank differ)");
  }
  return std::make_unique<Smol>(std::move(loaded));
}

}  // namespace amoeba
