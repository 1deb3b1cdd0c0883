// Who may call: the API keys file (--api_keys) and the per-tenant quotas file
// (--quotas), parsed. Pure data: server/api/security.h watches the files and
// applies them to calls.
//
// API keys file, one key per line (`#` starts a comment):
//   TENANT ROLE SHA256HEX [LABEL]     a bearer key, by its lowercase hex SHA-256
//   TENANT ROLE cn:COMMON_NAME [LABEL] a client certificate (mutual TLS), by its
//                                      subject's common name
// ROLE is admin (every tenant, and administration), write (its tenant's
// objects: upload, create, train, delete, classify, export, ...) or read
// (get, list, describe, classify, embed). The server never sees the keys of
// the file, only their hashes: `printf %s "$KEY" | sha256sum` makes a line.
//
// Quotas file, one override per line: TENANT QUOTA VALUE, where QUOTA is one
// of storage_mb, datasets, images, models, private_params, jobs,
// inflight_images, and VALUE an integer (0: unlimited).
#ifndef TLSERVE_SERVER_CORE_CATALOG_ACCESS_H_
#define TLSERVE_SERVER_CORE_CATALOG_ACCESS_H_

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tlserve {

enum class Role { kRead = 0, kWrite = 1, kAdmin = 2 };
const char* RoleName(Role role);

struct Principal {
  std::string tenant;
  Role role = Role::kRead;
  std::string label;  // for logs and the audit trail; never the key
};

class ApiKeys {
 public:
  // INVALID_ARGUMENT naming the line for a malformed one; a tenant may have
  // many keys; the same hash twice is an error.
  static absl::StatusOr<ApiKeys> Parse(const std::string& text);

  // Hashes `key` and compares it with every entry's hash in constant time
  // (no early exit, so timing says nothing about which bytes matched).
  std::optional<Principal> FindKey(absl::string_view key) const;
  std::optional<Principal> FindCommonName(absl::string_view common_name) const;
  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    Principal principal;
    std::array<unsigned char, 32> digest{};  // of the key (unused for cn: lines)
    std::string common_name;                 // empty for key lines
  };
  std::vector<Entry> entries_;
};

// One tenant's limits; 0 means unlimited.
struct QuotaLimits {
  int64_t storage_bytes = 0;  // images in its datasets, weights of its models' versions
  int64_t datasets = 0;
  int64_t images = 0;  // in all its datasets
  int64_t models = 0;
  int64_t private_params = 0;   // its models' own: private stages and heads (device memory)
  int64_t jobs = 0;             // queued and running training jobs
  int64_t inflight_images = 0;  // images of its Embed/Classify calls being computed
};

class QuotaTable {
 public:
  QuotaTable() = default;
  explicit QuotaTable(QuotaLimits defaults) : defaults_(defaults) {}
  // The file's overrides on top of `defaults`; INVALID_ARGUMENT naming the line.
  static absl::StatusOr<QuotaTable> Parse(const std::string& text, QuotaLimits defaults);
  const QuotaLimits& For(const std::string& tenant) const;
  const QuotaLimits& defaults() const { return defaults_; }
  const std::map<std::string, QuotaLimits>& overrides() const { return overrides_; }

 private:
  QuotaLimits defaults_;
  std::map<std::string, QuotaLimits> overrides_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_CATALOG_ACCESS_H_
