// Storage formats of the decode weights (packed panels, model/packed_linear.h): fp32, fp16, and
// GGML's block formats Q8_0 and Q4_0 (blocks of 32 consecutive input elements of one output row
// share one fp16 scale d; Q8_0 holds int8 q with x = d·q, Q4_0 4-bit q with x = d·(q − 8)).
#pragma once
#include <cstdint>
#include <string_view>

#include "absl/status/statusor.h"

namespace amoeba {

enum class WeightFormat { kF32, kF16, kQ8_0, kQ4_0 };

inline constexpr int64_t kQuantBlock = 32;  // input elements per scale (Q8_0 and Q4_0)

// "f32", "f16", "q8_0", "q4_0" (as the flags and the API spell them).
absl::StatusOr<WeightFormat> ParseWeightFormat(std::string_view name);
const char* WeightFormatName(WeightFormat f);
bool IsQuantized(WeightFormat f);
// Bytes one weight takes, scales included: 4, 2, 34/32 (8.5 bits), 18/32 (4.5 bits).
double BytesPerWeight(WeightFormat f);

}  // namespace amoeba
