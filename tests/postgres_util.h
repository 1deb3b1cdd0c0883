// A throwaway PostgreSQL server for tests (scripts/pg-temp.sh: its own
// cluster in a temporary directory on a free loopback port, run as the
// "postgres" user when the tests run as root), and fresh databases on it.
#ifndef TLSERVE_TESTS_POSTGRES_UTIL_H_
#define TLSERVE_TESTS_POSTGRES_UTIL_H_

#include <libpq-fe.h>
#include <stdlib.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

namespace tlserve::testing {

class TempPostgres {
 public:
  // Starts a server; nullptr with `error` set when it cannot.
  static std::unique_ptr<TempPostgres> Start(std::string* error) {
    char dir[] = "/tmp/tlserve-pg-XXXXXX";
    if (mkdtemp(dir) == nullptr) {
      *error = "mkdtemp failed";
      return nullptr;
    }
    std::unique_ptr<TempPostgres> pg(new TempPostgres(dir));
    FILE* out = popen((Script() + " start " + dir).c_str(), "r");
    char line[512] = {0};
    const bool read = out != nullptr && std::fgets(line, sizeof(line), out) != nullptr;
    const int rc = out != nullptr ? pclose(out) : -1;
    if (!read || rc != 0) {
      *error = "scripts/pg-temp.sh start failed (its stderr is above)";
      return nullptr;
    }
    pg->uri_ = line;
    while (!pg->uri_.empty() && (pg->uri_.back() == '\n' || pg->uri_.back() == '\r')) {
      pg->uri_.pop_back();
    }
    return pg;
  }
  ~TempPostgres() { (void)std::system((Script() + " stop " + dir_).c_str()); }
  TempPostgres(const TempPostgres&) = delete;
  TempPostgres& operator=(const TempPostgres&) = delete;

  // postgresql://tlserve@127.0.0.1:PORT/tlserve
  const std::string& uri() const { return uri_; }
  // The URI of database `name` on this server (not created).
  std::string UriOf(const std::string& name) const {
    return uri_.substr(0, uri_.rfind('/') + 1) + name;
  }
  // Creates an empty database `name`; its URI, or "" on failure.
  std::string NewDatabase(const std::string& name) const {
    return Exec("CREATE DATABASE \"" + name + "\"") ? UriOf(name) : "";
  }
  // Runs one statement on the "tlserve" database; whether it succeeded.
  bool Exec(const std::string& sql) const {
    PGconn* c = PQconnectdb(uri_.c_str());
    bool ok = PQstatus(c) == CONNECTION_OK;
    if (ok) {
      PGresult* r = PQexec(c, sql.c_str());
      ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;
      if (!ok) std::fprintf(stderr, "postgres: %s: %s", sql.c_str(), PQresultErrorMessage(r));
      PQclear(r);
    }
    PQfinish(c);
    return ok;
  }

 private:
  explicit TempPostgres(std::string dir) : dir_(std::move(dir)) {}
  static std::string Script() {
    const char* src = std::getenv("TLSERVE_SOURCE_DIR");
    return std::string("bash ") + (src ? src : ".") + "/scripts/pg-temp.sh";
  }
  std::string dir_;
  std::string uri_;
};

}  // namespace tlserve::testing

#endif  // TLSERVE_TESTS_POSTGRES_UTIL_H_
