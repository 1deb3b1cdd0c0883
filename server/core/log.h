// One line per event on stderr: "2026-11-28T01:42:12.123Z INFO message".
// Thread-safe: each line is written with a single write(2).
#ifndef TLSERVE_SERVER_CORE_LOG_H_
#define TLSERVE_SERVER_CORE_LOG_H_

#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"

namespace tlserve {

enum class LogLevel { kInfo, kWarning, kError };

void LogLine(LogLevel level, absl::string_view message);

template <typename... Args>
void LogInfo(const absl::FormatSpec<Args...>& format, const Args&... args) {
  LogLine(LogLevel::kInfo, absl::StrFormat(format, args...));
}
template <typename... Args>
void LogWarning(const absl::FormatSpec<Args...>& format, const Args&... args) {
  LogLine(LogLevel::kWarning, absl::StrFormat(format, args...));
}
template <typename... Args>
void LogError(const absl::FormatSpec<Args...>& format, const Args&... args) {
  LogLine(LogLevel::kError, absl::StrFormat(format, args...));
}

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_LOG_H_
