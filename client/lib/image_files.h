// Finds and reads the image files a user names on the command line.
#ifndef TLSERVE_CLIENT_LIB_IMAGE_FILES_H_
#define TLSERVE_CLIENT_LIB_IMAGE_FILES_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tlserve/v1/inference.pb.h"

namespace tlserve {

// Files as given, and for a directory every .jpg/.jpeg/.png below it, sorted.
// NOT_FOUND naming a path that does not exist.
absl::StatusOr<std::vector<std::string>> ListImageFiles(const std::vector<std::string>& paths);

absl::StatusOr<std::string> ReadFileBytes(const std::string& path);

// The file as an encoded image named by its path.
absl::StatusOr<v1::Image> ReadImage(const std::string& path);

// File names are bytes; protobuf strings must be UTF-8 (a server cannot
// parse a message that holds anything else).
bool IsUtf8(const std::string& s);
// `s` with every byte that is not part of valid UTF-8 replaced by U+FFFD.
std::string ToUtf8(const std::string& s);

}  // namespace tlserve

#endif  // TLSERVE_CLIENT_LIB_IMAGE_FILES_H_
