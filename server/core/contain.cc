#include "server/core/contain.h"

#include <c10/util/Exception.h>

#include <exception>
#include <new>

#include "absl/strings/str_cat.h"

namespace tlserve {
namespace {

constexpr size_t kMaxExceptionMessage = 300;

// LibTorch messages end with "Exception raised from ... (most recent call
// first):" and a backtrace; a user needs the first line.
std::string FirstLine(absl::string_view message) {
  const size_t nl = message.find('\n');
  return Bounded(message.substr(0, nl), kMaxExceptionMessage);
}

}  // namespace

std::string Bounded(absl::string_view s, size_t max) {
  std::string out;
  const size_t keep = s.size() > max ? max : s.size();
  out.reserve(keep + 32);
  for (size_t i = 0; i < keep; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    out.push_back(c < 0x20 || c == 0x7f ? '?' : static_cast<char>(c));
  }
  if (s.size() > max) absl::StrAppend(&out, "… (", s.size(), " bytes)");
  return out;
}

absl::Status StatusFromCurrentException(absl::string_view what) {
  try {
    throw;
  } catch (const c10::OutOfMemoryError& e) {
    return absl::ResourceExhaustedError(
        absl::StrCat(what, ": out of device memory: ", FirstLine(e.msg())));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(what, ": out of memory"));
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(what, ": ", FirstLine(e.msg())));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(what, ": ", FirstLine(e.what())));
  } catch (...) {
    return absl::InternalError(absl::StrCat(what, ": unknown exception"));
  }
}

}  // namespace tlserve
