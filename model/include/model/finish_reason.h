// Why a generation ended. Free of ATen, so protocol front ends can name it.
#pragma once

namespace amoeba {

enum class FinishReason { kNone, kLength, kEos, kStopSequence, kCancelled, kTimeLimit, kError };
const char* FinishReasonName(FinishReason r);

}  // namespace amoeba
