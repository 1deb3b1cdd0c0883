// The one place where absl::Status becomes grpc::Status (the codes are the
// same canonical set), and where a code gets its metric label.
#ifndef TLSERVE_SERVER_API_STATUS_UTIL_H_
#define TLSERVE_SERVER_API_STATUS_UTIL_H_

#include <grpcpp/support/status.h>

#include <string>

#include "absl/status/status.h"

namespace tlserve {

inline grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

// "OK", "INVALID_ARGUMENT", ...: the `code` label of tlserve_requests_total.
inline std::string CodeLabel(absl::StatusCode code) { return absl::StatusCodeToString(code); }

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_STATUS_UTIL_H_
