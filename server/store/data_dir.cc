#include "server/store/data_dir.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace tlserve {
namespace {

absl::Status Errno(const std::string& what) {
  const int e = errno;
  const std::string message = absl::StrCat(what, ": ", std::strerror(e));
  if (e == EACCES || e == EPERM || e == EROFS) return absl::PermissionDeniedError(message);
  return absl::InternalError(message);
}

}  // namespace

absl::Status MakeDirectories(const std::string& path) {
  for (size_t pos = 0; pos != std::string::npos;) {
    pos = path.find('/', pos + 1);
    const std::string prefix = path.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) {
      return Errno(absl::StrCat("cannot create directory ", prefix));
    }
  }
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(path, " exists and is not a directory"));
  }
  return absl::OkStatus();
}

namespace {

absl::Status SyncDir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return Errno(absl::StrCat("cannot open directory ", dir));
  const int rc = ::fsync(fd);
  ::close(fd);
  return rc == 0 ? absl::OkStatus() : Errno(absl::StrCat("cannot fsync directory ", dir));
}

}  // namespace

absl::StatusOr<std::unique_ptr<DataDir>> DataDir::Open(const std::string& path) {
  if (path.empty()) return absl::InvalidArgumentError("--data_dir must not be empty");
  if (absl::Status s = MakeDirectories(path); !s.ok()) return s;
  const std::string lock_path = path + "/LOCK";
  const int fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return Errno(absl::StrCat("cannot open ", lock_path));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd);
    return absl::FailedPreconditionError(
        absl::StrCat("data directory ", path, " is in use by another tlserve process (", lock_path,
                     " is locked); give each server its own --data_dir"));
  }
  std::unique_ptr<DataDir> dir(new DataDir(path, fd));
  // Written once, when the directory is new; never again: a restart on a
  // full disk must work. (The lock file, opened for writing, already proved
  // that the directory is writable.)
  constexpr char kFormat[] = "tlserve-data 1\n";
  const std::string format_path = path + "/FORMAT";
  struct stat st;
  if (::stat(format_path.c_str(), &st) != 0) {
    if (absl::Status s = WriteFileAtomically(format_path, kFormat); !s.ok()) return s;
  } else {
    char buf[64] = {0};
    const int ffd = ::open(format_path.c_str(), O_RDONLY | O_CLOEXEC);
    const ssize_t n = ffd >= 0 ? ::read(ffd, buf, sizeof(buf) - 1) : -1;
    if (ffd >= 0) ::close(ffd);
    if (n < 0 || std::string(buf, static_cast<size_t>(n)) != kFormat) {
      return absl::FailedPreconditionError(absl::StrCat(
          format_path, " does not say \"tlserve-data 1\": not a data directory of this tlserve"));
    }
  }
  return dir;
}

DataDir::~DataDir() { ::close(lock_fd_); }

absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno(absl::StrCat("cannot create ", tmp));
  size_t written = 0;
  while (written < contents.size()) {
    const ssize_t n = ::write(fd, contents.data() + written, contents.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      absl::Status s = Errno(absl::StrCat("cannot write ", tmp));
      ::close(fd);
      ::unlink(tmp.c_str());
      return s;
    }
    written += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    absl::Status s = Errno(absl::StrCat("cannot fsync ", tmp));
    ::close(fd);
    ::unlink(tmp.c_str());
    return s;
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    absl::Status s = Errno(absl::StrCat("cannot rename ", tmp, " to ", path));
    ::unlink(tmp.c_str());
    return s;
  }
  const auto slash = path.find_last_of('/');
  return SyncDir(slash == std::string::npos ? "." : path.substr(0, slash));
}

}  // namespace tlserve
