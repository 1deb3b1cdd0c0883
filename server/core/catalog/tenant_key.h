// Tenants' objects share one catalogue: inside the server a dataset's or a
// model's key is "TENANT:NAME", and just "NAME" for the `default` tenant — so
// data directories made before tenants existed need no migration (their
// objects are the default tenant's) and a server without API keys keeps the
// keys it always had. Names cannot contain ':' (DatasetCatalog::ValidateName)
// and tenants cannot either, so two tenants' keys never collide; keys never
// contain '/', which the records of versions use as their separator.
//
// Only server/api turns a caller's name into a key (Caller::Qualify) and a
// key back into what a caller sees; the rest of core treats keys as names.
#ifndef TLSERVE_SERVER_CORE_CATALOG_TENANT_KEY_H_
#define TLSERVE_SERVER_CORE_CATALOG_TENANT_KEY_H_

#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace tlserve {

inline constexpr char kDefaultTenant[] = "default";

inline std::string TenantKey(const std::string& tenant, const std::string& name) {
  return tenant == kDefaultTenant ? name : absl::StrCat(tenant, ":", name);
}

// (tenant, name) of a key.
inline std::pair<std::string, std::string> SplitTenantKey(const std::string& key) {
  const auto colon = key.find(':');
  if (colon == std::string::npos) return {kDefaultTenant, key};
  return {key.substr(0, colon), key.substr(colon + 1)};
}

inline std::string TenantOf(const std::string& key) { return SplitTenantKey(key).first; }

// Tenants: 1-64 of [a-z0-9._-], starting with a letter or digit.
inline absl::Status ValidateTenant(const std::string& tenant) {
  bool ok = !tenant.empty() && tenant.size() <= 64 && absl::ascii_isalnum(tenant[0]);
  for (char c : tenant) {
    ok = ok &&
         ((c >= 'a' && c <= 'z') || absl::ascii_isdigit(c) || c == '.' || c == '_' || c == '-');
  }
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("tenant \"", tenant.substr(0, 64),
                   "\" is not a valid tenant: use 1-64 lowercase letters, digits, '.', '_' or "
                   "'-', starting with a letter or digit"));
}

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_CATALOG_TENANT_KEY_H_
