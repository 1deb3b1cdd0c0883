// Containment: the one place where an exception becomes an absl::Status.
// Every job and every RPC handler runs its body through Contain, so that a
// LibTorch error, an out-of-memory or a bug fails *that* job or call with a
// message — never the process (the rule of DESIGN.md: catch at the boundary).
//
// Messages are bounded: LibTorch's errors carry C++ backtraces and client
// strings can be megabytes long; neither is echoed whole.
//
// Thread-safe (stateless).
#ifndef TLSERVE_SERVER_CORE_CONTAIN_H_
#define TLSERVE_SERVER_CORE_CONTAIN_H_

#include <string>
#include <type_traits>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tlserve {

// The exception being handled (call inside a catch block) as a status:
// RESOURCE_EXHAUSTED for out-of-memory (host or device), INTERNAL otherwise,
// its message prefixed by `what` ("training failed") and cut to one line.
absl::Status StatusFromCurrentException(absl::string_view what);

// `s` cut to at most `max` bytes (with "…" and the full length when cut) and
// with control characters replaced: safe to put in an error message or log.
std::string Bounded(absl::string_view s, size_t max = 80);

// Runs `fn` (returning absl::Status or absl::StatusOr<T>) and turns any
// exception it throws into a status.
template <typename Fn>
auto Contain(absl::string_view what, Fn&& fn) -> decltype(fn()) {
  try {
    return std::forward<Fn>(fn)();
  } catch (...) {
    return StatusFromCurrentException(what);
  }
}

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_CONTAIN_H_
