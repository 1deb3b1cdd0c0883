#include "server/store/database.h"

#include "absl/strings/match.h"
#include "server/store/postgres_database.h"
#include "server/store/sqlite_database.h"

namespace tlserve {

bool Database::IsPostgresUri(const std::string& location) {
  return absl::StartsWith(location, "postgresql://") || absl::StartsWith(location, "postgres://");
}

absl::StatusOr<std::unique_ptr<Database>> Database::Open(const std::string& location) {
  if (IsPostgresUri(location)) return PostgresDatabase::Open(location);
  return SqliteDatabase::Open(location);
}

}  // namespace tlserve
