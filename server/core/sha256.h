// SHA-256 digests (OpenSSL), as lowercase hex: what tlserve shows to
// identify a backbone file or an exported model.
#ifndef TLSERVE_SERVER_CORE_SHA256_H_
#define TLSERVE_SERVER_CORE_SHA256_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tlserve {

std::string Sha256Hex(absl::string_view bytes);
// INVALID_ARGUMENT when the file cannot be read.
absl::StatusOr<std::string> FileSha256(const std::string& path);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_SHA256_H_
