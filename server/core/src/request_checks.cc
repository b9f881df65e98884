#include "server/request_checks.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace amoeba {

absl::Status ValidateRequestId(std::string_view id) {
  bool ok = id.size() <= kMaxRequestIdBytes;
  for (size_t i = 0; ok && i < id.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(id[i]);
    ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == ':' || c == '-';
  }
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("request_id: at most ", kMaxRequestIdBytes,
                                                 " bytes of [A-Za-z0-9._:-] (got ", id.size(),
                                                 " bytes)"));
}

std::string LogSafe(std::string_view text, size_t max_bytes) {
  std::string out;
  const size_t n = std::min(text.size(), max_bytes);
  for (size_t i = 0; i < n; ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\')
      out += static_cast<char>(c);
    else
      absl::StrAppendFormat(&out, "\\x%02x", c);
  }
  if (text.size() > n) absl::StrAppend(&out, "...(", text.size(), " bytes)");
  return out;
}

std::string BoundedMessage(std::string_view message) {
  std::string m(message.substr(0, kMaxErrorMessageBytes));
  if (message.size() > kMaxErrorMessageBytes) m += "...";
  return m;
}

absl::Status CheckBearerToken(const std::optional<std::string>& authorization,
                              std::string_view token) {
  if (!authorization) return absl::UnauthenticatedError("missing authorization: Bearer <token>");
  const std::string want = absl::StrCat("Bearer ", std::string(token));
  const std::string_view got = *authorization;
  unsigned char diff = got.size() == want.size() ? 0 : 1;
  for (size_t i = 0; i < want.size(); ++i)
    diff |= static_cast<unsigned char>(want[i] ^ (i < got.size() ? got[i] : 0));
  if (diff != 0) return absl::PermissionDeniedError("invalid token");
  return absl::OkStatus();
}

}  // namespace amoeba
