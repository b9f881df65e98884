#include "http_status.h"

#include "server/request_checks.h"

namespace amoeba {

int HttpStatusFor(absl::StatusCode c) {
  switch (c) {
    case absl::StatusCode::kOk:
      return 200;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
      return 400;
    case absl::StatusCode::kUnauthenticated:
      return 401;
    case absl::StatusCode::kPermissionDenied:
      return 403;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kCancelled:
      return 499;  // the client closed the request (nginx's code; nobody reads it)
    case absl::StatusCode::kUnimplemented:
      return 501;
    case absl::StatusCode::kUnavailable:
      return 503;
    case absl::StatusCode::kDeadlineExceeded:
      return 504;
    default:
      return 500;
  }
}

nlohmann::json ErrorBody(const absl::Status& s) {
  const int status = HttpStatusFor(s.code());
  return {{"error",
           {{"message", BoundedMessage(std::string_view(s.message().data(), s.message().size()))},
            {"type", status >= 500 ? "server_error" : "invalid_request_error"},
            {"param", nullptr},
            {"code", absl::StatusCodeToString(s.code())}}}};
}

HttpReply ErrorReply(const absl::Status& s) {
  HttpReply r;
  r.status = HttpStatusFor(s.code());
  r.body = ErrorBody(s).dump();
  return r;
}

HttpReply TransportErrorReply(int http_status, const std::string& message) {
  HttpReply r;
  r.status = http_status;
  r.body = nlohmann::json{{"error",
                           {{"message", message},
                            {"type", http_status >= 500 ? "server_error" : "invalid_request_error"},
                            {"param", nullptr},
                            {"code", http_status}}}}
               .dump();
  return r;
}

}  // namespace amoeba
