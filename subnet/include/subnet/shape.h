// A subnet's shape: how many layers run (depth) and what fraction of the attention and MLP
// parameters each keeps (width). Free of ATen, so protocol front ends can name shapes.
#pragma once
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace amoeba {

struct Shape {
  int64_t depth = 0;
  double width = 1.0;
  std::string ToString() const;
  // "depth=18,width=0.75" (either part may be omitted: full depth / full width).
  static absl::StatusOr<Shape> Parse(const std::string& s, int64_t full_depth);
  bool operator==(const Shape& o) const { return depth == o.depth && width == o.width; }
};

}  // namespace amoeba
