// SHA-256 digests (OpenSSL), as lowercase hex: what tlserve shows to
// identify a backbone file or an exported model.
#ifndef TLSERVE_SERVER_CORE_SHA256_H_
#define TLSERVE_SERVER_CORE_SHA256_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tlserve {

// Incremental: Update with the pieces in order, then Hex once.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void Update(absl::string_view bytes);
  std::string Hex();

 private:
  struct Ctx;
  std::unique_ptr<Ctx> ctx_;
};

std::string Sha256Hex(absl::string_view bytes);
// INVALID_ARGUMENT when the file cannot be read.
absl::StatusOr<std::string> FileSha256(const std::string& path);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_SHA256_H_
