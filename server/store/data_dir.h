// The server's state directory (--data_dir): created at start and locked, so
// that two servers never write the same state. Later features keep their
// database and weight files here. Writes go through WriteFileAtomically:
// a reader or a crash sees the old file or the new one, never half of one.
//
// Not copyable; the lock is held until destruction.
#ifndef TLSERVE_SERVER_STORE_DATA_DIR_H_
#define TLSERVE_SERVER_STORE_DATA_DIR_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tlserve {

class DataDir {
 public:
  // Creates `path` (and parents) if needed and takes its lock.
  // FAILED_PRECONDITION if another process holds it; PERMISSION_DENIED or
  // INTERNAL when it cannot be created or written.
  static absl::StatusOr<std::unique_ptr<DataDir>> Open(const std::string& path);
  ~DataDir();
  DataDir(const DataDir&) = delete;
  DataDir& operator=(const DataDir&) = delete;

  const std::string& path() const { return path_; }

 private:
  DataDir(std::string path, int lock_fd) : path_(std::move(path)), lock_fd_(lock_fd) {}
  std::string path_;
  int lock_fd_;
};

// mkdir -p.
absl::Status MakeDirectories(const std::string& path);

// Writes `contents` to a temporary file beside `path`, fsyncs it, renames it
// over `path` and fsyncs the directory: durable before it returns OK.
absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_STORE_DATA_DIR_H_
