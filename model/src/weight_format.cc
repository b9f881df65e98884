#include "model/weight_format.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace amoeba {

absl::StatusOr<WeightFormat> ParseWeightFormat(std::string_view name) {
  if (name == "f32") return WeightFormat::kF32;
  if (name == "f16") return WeightFormat::kF16;
  if (name == "q8_0") return WeightFormat::kQ8_0;
  if (name == "q4_0") return WeightFormat::kQ4_0;
  return absl::InvalidArgumentError(
      absl::StrCat("weights dtype \"", std::string(name), "\": f32, f16, q8_0 or q4_0"));
}

const char* WeightFormatName(WeightFormat f) {
  switch (f) {
    case WeightFormat::kF32:
      return "f32";
    case WeightFormat::kF16:
      return "f16";
    case WeightFormat::kQ8_0:
      return "q8_0";
    case WeightFormat::kQ4_0:
      return "q4_0";
  }
  return "?";
}

bool IsQuantized(WeightFormat f) {
  return f == WeightFormat::kQ8_0 || f == WeightFormat::kQ4_0;
}

double BytesPerWeight(WeightFormat f) {
  switch (f) {
    case WeightFormat::kF32:
      return 4;
    case WeightFormat::kF16:
      return 2;
    case WeightFormat::kQ8_0:
      return (2.0 + kQuantBlock) / kQuantBlock;
    case WeightFormat::kQ4_0:
      return (2.0 + kQuantBlock / 2) / kQuantBlock;
  }
  return 4;
}

}  // namespace amoeba
