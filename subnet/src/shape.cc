#include "subnet/shape.h"

#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace amoeba {

std::string Shape::ToString() const {
  std::string w = absl::StrCat(width);
  return absl::StrCat("depth=", depth, ",width=", w);
}

absl::StatusOr<Shape> Shape::Parse(const std::string& s, int64_t full_depth) {
  Shape out{full_depth, 1.0};
  for (auto part : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    std::vector<std::string> kv = absl::StrSplit(part, '=');
    if (kv.size() != 2)
      return absl::InvalidArgumentError(
          absl::StrCat("shape: expected key=value, got '", part, "'"));
    if (kv[0] == "depth") {
      if (!absl::SimpleAtoi(kv[1], &out.depth))
        return absl::InvalidArgumentError("shape: depth must be an integer");
    } else if (kv[0] == "width") {
      if (!absl::SimpleAtod(kv[1], &out.width))
        return absl::InvalidArgumentError("shape: width must be a number");
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("shape: unknown key '", kv[0], "' (depth, width)"));
    }
  }
  return out;
}

}  // namespace amoeba
