#include "server/store/disk_budget.h"

#include <sys/statvfs.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tlserve {

DiskBudget::Probe DiskBudget::FileSystemProbe(std::string dir) {
  return [dir = std::move(dir)]() -> absl::StatusOr<int64_t> {
    struct statvfs st;
    if (::statvfs(dir.c_str(), &st) != 0) {
      return absl::InternalError(absl::StrCat("statvfs ", dir, ": ", std::strerror(errno)));
    }
    return static_cast<int64_t>(st.f_bavail) * static_cast<int64_t>(st.f_frsize);
  };
}

absl::Status DiskBudget::Check(int64_t bytes, absl::string_view what, Into into) const {
  auto free = probe_();
  if (!free.ok()) return free.status();
  if (into == Into::kDatabase && reusable_) *free += reusable_();
  if (*free - bytes >= min_free_bytes_) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrFormat(
      "%s needs about %.1f MB of disk, but the data directory has %.1f MB free and keeps "
      "%.1f MB in reserve (--min_free_disk_mb); delete datasets or models, or give it more space",
      what, bytes / 1e6, *free / 1e6, min_free_bytes_ / 1e6));
}

}  // namespace tlserve
