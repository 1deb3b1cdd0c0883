// The disk budget of the data directory (--min_free_disk_mb): a write that
// would leave less free space than the reserve fails with RESOURCE_EXHAUSTED
// *before* anything is written, so the disk never fills up under tlserve —
// deletes, restarts and job records always have room. Free space is the file
// system's free bytes; a write into the database also counts what the
// database will reuse (free pages of deleted datasets), a file (weights, an
// export) does not. The probes are injectable, so tests can fake a full disk.
//
// Thread-safe (stateless apart from the probe, which must be thread-safe).
#ifndef TLSERVE_SERVER_STORE_DISK_BUDGET_H_
#define TLSERVE_SERVER_STORE_DISK_BUDGET_H_

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tlserve {

class DiskBudget {
 public:
  // Free bytes now.
  using Probe = std::function<absl::StatusOr<int64_t>()>;
  // Where a write goes.
  enum class Into { kFile, kDatabase };

  // statvfs(`dir`).
  static Probe FileSystemProbe(std::string dir);

  // `reusable` (may be empty): bytes the database reuses before it grows.
  DiskBudget(Probe probe, int64_t min_free_bytes, std::function<int64_t()> reusable = nullptr)
      : probe_(std::move(probe)), reusable_(std::move(reusable)), min_free_bytes_(min_free_bytes) {}

  // OK when `bytes` more can be written `into` a file or the database and
  // `min_free_bytes` stay free; RESOURCE_EXHAUSTED naming `what`, the free
  // space and the flag otherwise.
  absl::Status Check(int64_t bytes, absl::string_view what, Into into = Into::kDatabase) const;

  int64_t min_free_bytes() const { return min_free_bytes_; }

 private:
  Probe probe_;
  std::function<int64_t()> reusable_;
  int64_t min_free_bytes_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_STORE_DISK_BUDGET_H_
