// What every RPC does with client input before any work: request ids validated, messages and log
// lines bounded and escaped, so nothing a client sends reaches the logs, the error metadata or the
// file system unchecked.
#pragma once
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace amoeba {

inline constexpr size_t kMaxRequestIdBytes = 128;
// Error messages reach clients in transport metadata (gRPC: 8 KB for the whole call, shared with
// other calls' headers on the connection): stay far below.
inline constexpr size_t kMaxErrorMessageBytes = 512;

// OK for "" (the server assigns one) or at most 128 bytes of [A-Za-z0-9._:-]; else
// INVALID_ARGUMENT naming the field (the id itself is not echoed).
absl::Status ValidateRequestId(std::string_view id);

// `text` for a log line: at most `max_bytes` bytes, non-printable and non-ASCII bytes escaped as
// \xNN, "...(N bytes)" when cut.
std::string LogSafe(std::string_view text, size_t max_bytes = 64);

// The "authorization" value against "Bearer <token>", compared in time independent of where the
// first difference is: UNAUTHENTICATED when missing, PERMISSION_DENIED when wrong.
absl::Status CheckBearerToken(const std::optional<std::string>& authorization,
                              std::string_view token);

// `message` cut to kMaxErrorMessageBytes ("..." marks a cut): what any front end sends a client.
std::string BoundedMessage(std::string_view message);

}  // namespace amoeba
