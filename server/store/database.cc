#include "server/store/database.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "server/store/postgres_database.h"
#include "server/store/sqlite_database.h"

namespace tlserve {

absl::Status Database::ValidateBlobName(const std::string& name) {
  bool ok = !name.empty() && name.size() <= 512 && name.front() != '/' && name.back() != '/';
  for (char c : name) {
    ok = ok && (absl::ascii_isalnum(c) || c == '.' || c == '_' || c == '-' || c == ':' || c == '/');
  }
  for (absl::string_view part : absl::StrSplit(name, '/')) {
    ok = ok && !part.empty() && part != "." && part != "..";
  }
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("\"", name, "\" is not a valid blob name"));
}

bool Database::IsPostgresUri(const std::string& location) {
  return absl::StartsWith(location, "postgresql://") || absl::StartsWith(location, "postgres://");
}

absl::StatusOr<std::unique_ptr<Database>> Database::Open(const std::string& location) {
  if (IsPostgresUri(location)) return PostgresDatabase::Open(location);
  return SqliteDatabase::Open(location);
}

}  // namespace tlserve
