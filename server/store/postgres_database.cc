#include "server/store/postgres_database.h"

#include <endian.h>
#include <libpq-fe.h>
#include <poll.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "server/core/log.h"

namespace tlserve {

// A query's result, cleared on scope exit. Columns are in binary format.
class PgResult {
 public:
  explicit PgResult(PGresult* r) : r_(r) {}
  PgResult(PgResult&& o) noexcept : r_(std::exchange(o.r_, nullptr)) {}
  PgResult& operator=(PgResult&& o) noexcept {
    std::swap(r_, o.r_);
    return *this;
  }
  ~PgResult() { PQclear(r_); }
  PGresult* get() const { return r_; }
  int rows() const { return PQntuples(r_); }
  std::string Bytes(int row, int col) const {
    return std::string(PQgetvalue(r_, row, col), static_cast<size_t>(PQgetlength(r_, row, col)));
  }
  // An integer column (smallint, integer, bigint): big-endian bytes in a
  // binary result, digits in a text one; 0 for NULL.
  int64_t Int(int row, int col) const {
    const char* p = PQgetvalue(r_, row, col);
    if (PQgetisnull(r_, row, col)) return 0;
    if (PQfformat(r_, col) == 0) return std::strtoll(p, nullptr, 10);
    switch (PQgetlength(r_, row, col)) {
      case 8: {
        uint64_t v;
        std::memcpy(&v, p, 8);
        return static_cast<int64_t>(be64toh(v));
      }
      case 4: {
        uint32_t v;
        std::memcpy(&v, p, 4);
        return static_cast<int32_t>(be32toh(v));
      }
      case 2: {
        uint16_t v;
        std::memcpy(&v, p, 2);
        return static_cast<int16_t>(be16toh(v));
      }
      default:
        return 0;  // NULL
    }
  }

 private:
  PGresult* r_;
};

namespace {

// Each migration runs once, in order, in its own transaction; the number of
// those applied is the schema version. Append, never edit.
const char* const kMigrations[] = {
    // 1: datasets, staged uploads and records (what the SQLite schema holds).
    R"sql(
CREATE TABLE datasets (
  name TEXT PRIMARY KEY,
  created_unix BIGINT NOT NULL
);
CREATE TABLE examples (
  id BIGSERIAL PRIMARY KEY,
  dataset TEXT NOT NULL REFERENCES datasets(name) ON DELETE CASCADE,
  name TEXT NOT NULL,
  label TEXT NOT NULL,
  bytes BYTEA NOT NULL,
  hash BIGINT NOT NULL
);
-- Encoded images do not compress: store them out of line, uncompressed.
ALTER TABLE examples ALTER COLUMN bytes SET STORAGE EXTERNAL;
CREATE INDEX examples_by_dataset ON examples(dataset, id);
CREATE TABLE staged_examples (
  upload BIGINT NOT NULL,
  seq BIGSERIAL PRIMARY KEY,
  name TEXT NOT NULL,
  label TEXT NOT NULL,
  bytes BYTEA NOT NULL,
  hash BIGINT NOT NULL,
  staged_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
ALTER TABLE staged_examples ALTER COLUMN bytes SET STORAGE EXTERNAL;
CREATE INDEX staged_by_upload ON staged_examples(upload, seq);
CREATE TABLE records (
  kind TEXT NOT NULL,
  key TEXT NOT NULL,
  json TEXT NOT NULL,
  PRIMARY KEY (kind, key)
);
)sql",
    // 2: blobs (versions' weights, jobs' checkpoints).
    R"sql(
CREATE TABLE blobs (
  name TEXT PRIMARY KEY,
  bytes BYTEA NOT NULL
);
ALTER TABLE blobs ALTER COLUMN bytes SET STORAGE EXTERNAL;
)sql",
    // 3: every committed change of a record is announced to the replicas
    // (LISTEN tlserve_records; payload "KIND/KEY").
    R"sql(
CREATE FUNCTION tlserve_record_changed() RETURNS trigger AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    PERFORM pg_notify('tlserve_records', OLD.kind || '/' || OLD.key);
  ELSE
    PERFORM pg_notify('tlserve_records', NEW.kind || '/' || NEW.key);
  END IF;
  RETURN NULL;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER records_changed AFTER INSERT OR UPDATE OR DELETE ON records
  FOR EACH ROW EXECUTE FUNCTION tlserve_record_changed();
)sql",
    // 4: the job queue: claimed with SKIP LOCKED, held by leases. The jobs
    // left unfinished before it (server/core/jobs.cc's records: state 0
    // queued, 1 running; a model key "TENANT:NAME" or "NAME" for the default
    // tenant) are queued here, a running one as claimed once (interrupted).
    R"sql(
CREATE TABLE job_queue (
  seq BIGSERIAL PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  model TEXT NOT NULL UNIQUE,
  tenant TEXT NOT NULL,
  owner TEXT NOT NULL DEFAULT '',
  lease_until TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
  claims INTEGER NOT NULL DEFAULT 0
);
INSERT INTO job_queue (id, model, tenant, claims)
SELECT key, j->>'model',
       CASE WHEN strpos(j->>'model', ':') > 0 THEN split_part(j->>'model', ':', 1) ELSE 'default' END,
       CASE WHEN j->>'state' = '1' THEN 1 ELSE 0 END
FROM (SELECT key, json::jsonb AS j FROM records WHERE kind = 'job' AND json LIKE '{%') AS jobs
WHERE j->>'state' IN ('0', '1') AND j->>'model' IS NOT NULL
ORDER BY (j->>'created_unix')::bigint, key
ON CONFLICT DO NOTHING;
)sql",
};

// pg_advisory_lock key of the migrations ("tlserve" in ASCII, 0x746c7365727665).
constexpr char kMigrationLock[] = "SELECT pg_advisory_lock(32770340177475173)";
constexpr char kMigrationUnlock[] = "SELECT pg_advisory_unlock(32770340177475173)";

// Uploads whose last chunk was staged this long ago were left by a replica
// that died mid-upload (a live upload stages a chunk at least every few
// seconds, or its stream times out long before).
constexpr char kAbandonedUploads[] =
    "DELETE FROM staged_examples WHERE upload IN (SELECT upload FROM staged_examples "
    "GROUP BY upload HAVING max(staged_at) < now() - interval '1 hour')";

// A failed statement as a status that keeps its cause (SQLSTATE classes:
// https://www.postgresql.org/docs/15/errcodes-appendix.html).
absl::Status PgStatus(const std::string& what, const char* sqlstate, const std::string& message) {
  const std::string state = sqlstate ? sqlstate : "";
  std::string text = absl::StrCat("postgresql ", what, ": ", message);
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  if (state == "53100") {
    return absl::ResourceExhaustedError(
        absl::StrCat(text,
                     " (the database server's disk is full; delete datasets or models, "
                     "or give it more space)"));
  }
  if (state.rfind("53", 0) == 0) return absl::ResourceExhaustedError(text);
  if (state.empty() || state.rfind("08", 0) == 0 || state.rfind("57P", 0) == 0) {
    return absl::UnavailableError(text);  // connection lost, server shutting down
  }
  if (state == "40001" || state == "40P01" || state == "55P03") return absl::AbortedError(text);
  if (state.rfind("22", 0) == 0) return absl::InvalidArgumentError(text);  // data exceptions
  if (state == "XX001" || state == "XX002") return absl::DataLossError(text);
  if (state.rfind("42", 0) == 0 && state != "42P01") return absl::InternalError(text);
  if (state == "28000" || state == "28P01" || state == "42501") {
    return absl::PermissionDeniedError(text);
  }
  return absl::InternalError(text);
}

PostgresDatabase::Param Text(std::string v) { return {std::move(v), false}; }
PostgresDatabase::Param Text(int64_t v) { return {absl::StrCat(v), false}; }
PostgresDatabase::Param Blob(absl::string_view v) { return {std::string(v), true}; }

// The first word of a statement, for messages ("INSERT", "SELECT", ...).
std::string Verb(const std::string& sql) {
  const size_t start = sql.find_first_not_of(" \n");
  if (start == std::string::npos) return "statement";
  return sql.substr(start, sql.find_first_of(" \n(", start) - start);
}

}  // namespace

std::string PostgresDatabase::Redacted(const std::string& uri) {
  // postgresql://user:password@host/... -> postgresql://user:***@host/...
  const size_t scheme = uri.find("://");
  if (scheme == std::string::npos) return uri;
  const size_t at = uri.find('@', scheme + 3);
  const size_t slash = uri.find('/', scheme + 3);
  std::string out = uri;
  if (at != std::string::npos && (slash == std::string::npos || at < slash)) {
    const size_t colon = uri.find(':', scheme + 3);
    if (colon != std::string::npos && colon < at) {
      out = absl::StrCat(uri.substr(0, colon + 1), "***", uri.substr(at));
    }
  }
  // A password given as a query parameter.
  const size_t p = out.find("password=");
  if (p != std::string::npos) {
    const size_t end = out.find('&', p);
    out =
        absl::StrCat(out.substr(0, p + 9), "***", end == std::string::npos ? "" : out.substr(end));
  }
  return out;
}

namespace {

// A connection to `uri` with defaults the URI may override: a bounded
// connect, and TCP keepalives that notice a database server gone silent (a
// lost node, a cut network) in about 25 s instead of the system's 2 hours.
PGconn* ConnectTo(const std::string& uri) {
  // Defaults first: the URI's own values, expanded from dbname, come later
  // and win.
  // $PGCONNECT_TIMEOUT, when set, keeps its say. tcp_user_timeout bounds a
  // write the server never acknowledges (keepalives do not).
  const char* timeout = std::getenv("PGCONNECT_TIMEOUT");
  const char* const keys[] = {
      "connect_timeout",  "keepalives",       "keepalives_idle", "keepalives_interval",
      "keepalives_count", "tcp_user_timeout", "dbname",          nullptr};
  const char* const values[] = {
      timeout != nullptr ? timeout : "10", "1", "10", "5", "3", "30000", uri.c_str(), nullptr};
  return PQconnectdbParams(keys, values, /*expand_dbname=*/1);
}

// The replica lock's connection: the database server too drops it within
// about 25 s of the replica's node going silent (not only when the replica's
// process dies and its kernel closes the socket), so that a copy is not kept
// out by a replica long gone. Session settings: set again after every
// reconnect.
constexpr char kLeaderKeepalives[] =
    "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; "
    "SET tcp_keepalives_count = 3";

}  // namespace

int PostgresDatabase::SchemaVersion() {
  return static_cast<int>(sizeof(kMigrations) / sizeof(kMigrations[0]));
}

absl::StatusOr<std::unique_ptr<Database>> PostgresDatabase::Open(const std::string& uri) {
  PGconn* conn = ConnectTo(uri);
  if (conn == nullptr || PQstatus(conn) != CONNECTION_OK) {
    absl::Status s =
        absl::UnavailableError(absl::StrCat("cannot connect to PostgreSQL at ", Redacted(uri), ": ",
                                            conn ? PQerrorMessage(conn) : "out of memory"));
    PQfinish(conn);
    return s;
  }
  std::unique_ptr<PostgresDatabase> d(new PostgresDatabase(conn, uri));
  absl::MutexLock lock(&d->mu_);
  // Notices (e.g. "relation already exists, skipping") are not errors.
  PQsetNoticeProcessor(
      conn, [](void*, const char*) {}, nullptr);
  if (absl::Status s = d->Migrate(); !s.ok()) return s;
  // Uploads a dead replica left unfinished were never acknowledged.
  if (auto r = d->Run(kAbandonedUploads); !r.ok()) return r.status();
  return std::unique_ptr<Database>(std::move(d));
}

PostgresDatabase::~PostgresDatabase() {
  StopListening();
  {
    // Released now, not when the server notices the connection closed: a
    // replica started right after this one (a restart) finds it free.
    absl::MutexLock lock(&leader_mu_);
    if (leader_conn_ != nullptr && PQstatus(leader_conn_) == CONNECTION_OK) {
      PQclear(PQexec(leader_conn_, "SELECT pg_advisory_unlock_all()"));
    }
    PQfinish(leader_conn_);
  }
  absl::MutexLock lock(&mu_);
  PQfinish(conn_);
}

int PostgresDatabase::Subscribe(RecordChanged changed) {
  absl::MutexLock lock(&subscribers_mu_);
  const int token = next_subscriber_++;
  subscribers_[token] = std::move(changed);
  if (!listener_.joinable()) listener_ = std::thread([this] { Listen(); });
  return token;
}

void PostgresDatabase::Unsubscribe(int token) {
  absl::MutexLock lock(&subscribers_mu_);
  subscribers_.erase(token);
}

void PostgresDatabase::StopListening() {
  std::thread listener;
  {
    absl::MutexLock lock(&subscribers_mu_);
    stop_listening_ = true;
    listener = std::move(listener_);
  }
  if (listener.joinable()) listener.join();
}

absl::StatusOr<bool> PostgresDatabase::TryReplicaLock(bool shared) {
  absl::MutexLock lock(&leader_mu_);
  if (leader_conn_ == nullptr || PQstatus(leader_conn_) != CONNECTION_OK) {
    PQfinish(leader_conn_);
    attached_ = false;  // the lock went with the session
    leader_conn_ = ConnectTo(uri_);
    if (PQstatus(leader_conn_) != CONNECTION_OK) {
      return absl::UnavailableError(absl::StrCat("cannot connect to PostgreSQL at ", Redacted(uri_),
                                                 ": ", PQerrorMessage(leader_conn_)));
    }
    PQclear(PQexec(leader_conn_, kLeaderKeepalives));
  }
  // "tlsjobs" in ASCII: one lock per database, shared by the replicas,
  // exclusive for a copy.
  PgResult r(PQexec(leader_conn_, shared ? "SELECT pg_try_advisory_lock_shared(32770340261159539)"
                                         : "SELECT pg_try_advisory_lock(32770340261159539)"));
  if (PQresultStatus(r.get()) != PGRES_TUPLES_OK || PQntuples(r.get()) != 1) {
    return PgStatus("SELECT", PQresultErrorField(r.get(), PG_DIAG_SQLSTATE),
                    PQresultErrorMessage(r.get()));
  }
  return std::string(PQgetvalue(r.get(), 0, 0)) == "t";
}

absl::Status PostgresDatabase::AttachReplica() {
  {
    absl::MutexLock lock(&leader_mu_);
    if (attached_ && leader_conn_ != nullptr && PQstatus(leader_conn_) == CONNECTION_OK) {
      return absl::OkStatus();
    }
  }
  // A copy that just ended (or a replica's restart after kill -9) may hold
  // it for a moment longer: a few seconds' grace.
  auto held = TryReplicaLock(/*shared=*/true);
  for (absl::Time end = absl::Now() + absl::Seconds(5); held.ok() && !*held && absl::Now() < end;) {
    absl::SleepFor(absl::Milliseconds(100));
    held = TryReplicaLock(/*shared=*/true);
  }
  if (!held.ok()) return held.status();
  if (!*held) {
    return absl::FailedPreconditionError(
        absl::StrCat("tlserve migrate is copying into the database at ", Redacted(uri_),
                     ": start the replicas when it has finished"));
  }
  absl::MutexLock lock(&leader_mu_);
  attached_ = true;
  return absl::OkStatus();
}

absl::StatusOr<bool> PostgresDatabase::LockForCopy() { return TryReplicaLock(/*shared=*/false); }

namespace {

std::string Millis(absl::Duration d) { return absl::StrCat(absl::ToInt64Milliseconds(d)); }

// Jobs nobody holds: never claimed, released, or their lease ran out.
constexpr char kUnclaimed[] = "(owner = '' OR lease_until < now())";

}  // namespace

absl::Status PostgresDatabase::QueueJob(const QueuedJob& job, const std::string& record) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = Begin(); !s.ok()) return s;
  auto q =
      Run("INSERT INTO job_queue(id, model, tenant, claims) VALUES ($1::text, $2::text, $3::text, "
          "$4::integer) ON CONFLICT DO NOTHING",
          {Text(job.id), Text(job.model), Text(job.tenant), Text(int64_t{job.claims})});
  if (!q.ok()) return Rollback(q.status());
  const char* affected = PQcmdTuples(q->get());
  if (affected == nullptr || std::strcmp(affected, "0") == 0) {
    auto other = Run("SELECT id FROM job_queue WHERE model = $1::text", {Text(job.model)});
    const std::string which = other.ok() && other->rows() > 0 ? other->Bytes(0, 0) : "?";
    return Rollback(absl::AlreadyExistsError(
        absl::StrCat("model \"", job.model, "\" already has an unfinished job (", which, ")")));
  }
  auto r =
      Run("INSERT INTO records(kind, key, json) VALUES ('job', $1::text, $2::text) "
          "ON CONFLICT (kind, key) DO UPDATE SET json = EXCLUDED.json",
          {Text(job.id), Text(record)});
  if (!r.ok()) return Rollback(r.status());
  return Commit();
}

absl::StatusOr<std::vector<Database::QueuedJob>> PostgresDatabase::ListQueuedJobs() {
  absl::MutexLock lock(&mu_);
  // Without parameters: a text result (PgResult::Int reads both).
  auto r = Run(absl::StrCat("SELECT id, model, tenant, CASE WHEN ", kUnclaimed,
                            " THEN '' ELSE owner END, claims FROM job_queue ORDER BY seq"));
  if (!r.ok()) return r.status();
  std::vector<QueuedJob> out;
  for (int i = 0; i < r->rows(); ++i) {
    out.push_back({r->Bytes(i, 0), r->Bytes(i, 1), r->Bytes(i, 2), r->Bytes(i, 3),
                   static_cast<int>(r->Int(i, 4))});
  }
  return out;
}

absl::StatusOr<std::optional<Database::QueuedJob>> PostgresDatabase::ClaimJob(
    const std::string& owner, absl::Duration lease, const PickJob& pick) {
  absl::MutexLock lock(&mu_);
  // Idle replicas look often: one plain statement when there is nothing to
  // claim, a transaction only when there may be.
  auto any = Run(absl::StrCat("SELECT 1 FROM job_queue WHERE ", kUnclaimed, " LIMIT 1"));
  if (!any.ok()) return any.status();
  if (any->rows() == 0) return std::nullopt;
  if (absl::Status s = Begin(); !s.ok()) return s;
  // Rows another replica is claiming at this moment are skipped, not waited
  // for: each claim takes a different job.
  auto free = Run(absl::StrCat("SELECT id, model, tenant, owner, claims FROM job_queue WHERE ",
                               kUnclaimed, " ORDER BY seq LIMIT 100 FOR UPDATE SKIP LOCKED"));
  if (!free.ok()) return Rollback(free.status());
  if (free->rows() == 0) {
    (void)Rollback(absl::OkStatus());
    return std::nullopt;
  }
  std::vector<QueuedJob> jobs;
  for (int i = 0; i < free->rows(); ++i) {
    jobs.push_back({free->Bytes(i, 0), free->Bytes(i, 1), free->Bytes(i, 2), free->Bytes(i, 3),
                    static_cast<int>(free->Int(i, 4))});
  }
  QueuedJob job = jobs[std::min(pick(jobs), jobs.size() - 1)];
  auto r =
      Run("UPDATE job_queue SET owner = $1::text, lease_until = now() + $2::bigint * interval '1 "
          "millisecond', claims = claims + 1 WHERE id = $3::text",
          {Text(owner), Text(Millis(lease)), Text(job.id)});
  if (!r.ok()) return Rollback(r.status());
  if (absl::Status s = Commit(); !s.ok()) return s;
  return job;
}

absl::StatusOr<std::vector<std::string>> PostgresDatabase::RenewJobLeases(
    const std::string& owner, absl::Duration lease, const std::vector<std::string>& ids) {
  std::vector<std::string> held;
  if (ids.empty()) return held;
  // ids as a text array literal: quoted, with \ and " escaped.
  std::string array = "{";
  for (const std::string& id : ids) {
    std::string quoted;
    for (char c : id) {
      if (c == '"' || c == '\\') quoted += '\\';
      quoted += c;
    }
    absl::StrAppend(&array, array.size() > 1 ? "," : "", "\"", quoted, "\"");
  }
  array += "}";
  // On the replica lock's own connection: never behind a long write on the
  // main one (a job's checkpoint of a hundred megabytes), which would let
  // the lease run out while the job is alive.
  if (absl::Status s = AttachReplica(); !s.ok()) return s;  // (again, if its session was lost)
  absl::MutexLock lock(&leader_mu_);
  const std::string millis = Millis(lease);
  const char* values[] = {millis.c_str(), owner.c_str(), array.c_str()};
  PgResult r(PQexecParams(
      leader_conn_,
      "UPDATE job_queue SET lease_until = now() + $1::bigint * interval '1 millisecond' "
      "WHERE owner = $2::text AND id = ANY($3::text[]) RETURNING id",
      3, nullptr, values, nullptr, nullptr, 0));
  if (PQresultStatus(r.get()) != PGRES_TUPLES_OK) {
    return PgStatus("UPDATE", PQresultErrorField(r.get(), PG_DIAG_SQLSTATE),
                    PQresultErrorMessage(r.get()));
  }
  for (int i = 0; i < r.rows(); ++i) held.push_back(r.Bytes(i, 0));
  return held;
}

absl::Status PostgresDatabase::PutClaimedJob(const std::string& id, const std::string& owner,
                                             const std::string& record, JobEnd end) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = Begin(); !s.ok()) return s;
  // The row stays locked until the commit: a claim by another replica waits
  // for this write, then finds the lease (or the row) as it left it.
  const char* sql =
      end == JobEnd::kFinish ? "DELETE FROM job_queue WHERE id = $1::text AND owner = $2::text"
      : end == JobEnd::kRelease
          ? "UPDATE job_queue SET owner = '', lease_until = '-infinity' WHERE id = $1::text AND "
            "owner = $2::text"
          : "SELECT 1 FROM job_queue WHERE id = $1::text AND owner = $2::text FOR UPDATE";
  auto q = Run(sql, {Text(id), Text(owner)});
  if (!q.ok()) return Rollback(q.status());
  const char* affected = PQcmdTuples(q->get());
  if (affected == nullptr || std::strcmp(affected, "0") == 0) {
    return Rollback(
        absl::AbortedError(absl::StrCat("job ", id, ": this replica no longer holds its lease")));
  }
  if (!record.empty()) {
    auto r =
        Run("INSERT INTO records(kind, key, json) VALUES ('job', $1::text, $2::text) "
            "ON CONFLICT (kind, key) DO UPDATE SET json = EXCLUDED.json",
            {Text(id), Text(record)});
    if (!r.ok()) return Rollback(r.status());
  }
  return Commit();
}

absl::StatusOr<bool> PostgresDatabase::EndUnclaimedJob(const std::string& id,
                                                       const std::string& owner,
                                                       const std::string& record) {
  (void)owner;  // another replica's lease is its own until it runs out
  absl::MutexLock lock(&mu_);
  if (absl::Status s = Begin(); !s.ok()) return s;
  auto q =
      Run(absl::StrCat("DELETE FROM job_queue WHERE id = $1::text AND ", kUnclaimed), {Text(id)});
  if (!q.ok()) return Rollback(q.status());
  const char* affected = PQcmdTuples(q->get());
  if (affected == nullptr || std::strcmp(affected, "0") == 0) {
    (void)Rollback(absl::OkStatus());
    return false;
  }
  auto r =
      Run("INSERT INTO records(kind, key, json) VALUES ('job', $1::text, $2::text) "
          "ON CONFLICT (kind, key) DO UPDATE SET json = EXCLUDED.json",
          {Text(id), Text(record)});
  if (!r.ok()) return Rollback(r.status());
  if (absl::Status s = Commit(); !s.ok()) return s;
  return true;
}

void PostgresDatabase::Listen() {
  PGconn* c = nullptr;
  int failures = 0;
  while (!stop_listening_) {
    if (c == nullptr || PQstatus(c) != CONNECTION_OK) {
      PQfinish(c);
      c = ConnectTo(uri_);
      PGresult* r = PQstatus(c) == CONNECTION_OK ? PQexec(c, "LISTEN tlserve_records") : nullptr;
      const bool listening = r != nullptr && PQresultStatus(r) == PGRES_COMMAND_OK;
      PQclear(r);
      if (!listening) {
        if (failures++ % 30 == 0) {
          LogWarning("cannot listen for changes at %s (retrying every second): %s", Redacted(uri_),
                     PQerrorMessage(c));
        }
        for (int i = 0; i < 10 && !stop_listening_; ++i) {
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
        continue;
      }
      if (failures > 0) LogInfo("listening for changes at %s again", Redacted(uri_));
      failures = 0;
      // Whatever changed before LISTEN took effect (at start: since the
      // subscriber read its state; after a lost connection: meanwhile).
      absl::MutexLock lock(&subscribers_mu_);
      for (auto& [token, changed] : subscribers_) changed("", "");
    }
    pollfd fd{PQsocket(c), POLLIN, 0};
    if (::poll(&fd, 1, 200) < 0 && errno != EINTR) {
      PQfinish(c);
      c = nullptr;
      continue;
    }
    if (PQconsumeInput(c) == 0) {  // the connection is gone: reconnect
      PQfinish(c);
      c = nullptr;
      continue;
    }
    while (PGnotify* n = PQnotifies(c)) {
      const std::string payload = n->extra;
      PQfreemem(n);
      const size_t slash = payload.find('/');
      if (slash == std::string::npos) continue;
      absl::MutexLock lock(&subscribers_mu_);
      for (auto& [token, changed] : subscribers_) {
        changed(payload.substr(0, slash), payload.substr(slash + 1));
      }
    }
  }
  PQfinish(c);
}

absl::Status PostgresDatabase::Migrate() {
  // Replicas starting at once: one applies the migrations, the others wait
  // for the lock and then find nothing left to do.
  if (auto r = Run(kMigrationLock); !r.ok()) return r.status();
  auto unlock = [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { (void)Run(kMigrationUnlock); };
  auto created =
      Run("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
          "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())");
  if (!created.ok()) {
    unlock();
    return created.status();
  }
  auto stored = Run("SELECT COALESCE(max(version), 0)::bigint FROM schema_migrations");
  if (!stored.ok()) {
    unlock();
    return stored.status();
  }
  const int64_t version = stored->Int(0, 0);
  if (version > SchemaVersion()) {
    unlock();
    return absl::FailedPreconditionError(
        absl::StrCat("the database's schema is version ", version, ", newer than this tlserve's (",
                     SchemaVersion(), "): upgrade tlserve, or point it at another database"));
  }
  for (int v = static_cast<int>(version) + 1; v <= SchemaVersion(); ++v) {
    absl::Status s = Begin();
    if (s.ok()) {
      auto applied = Run(kMigrations[v - 1]);
      if (applied.ok()) {
        applied = Run("INSERT INTO schema_migrations(version) VALUES ($1)", {Text(v)});
      }
      s = applied.ok() ? Commit() : Rollback(applied.status());
    }
    if (!s.ok()) {
      unlock();
      return absl::Status(s.code(), absl::StrCat("schema migration ", v, ": ", s.message()));
    }
  }
  unlock();
  return absl::OkStatus();
}

absl::StatusOr<int> PostgresDatabase::StoredSchemaVersion() {
  absl::MutexLock lock(&mu_);
  auto r = Run("SELECT COALESCE(max(version), 0)::bigint FROM schema_migrations");
  if (!r.ok()) return r.status();
  return static_cast<int>(r->Int(0, 0));
}

absl::StatusOr<PgResult> PostgresDatabase::Run(const std::string& sql,
                                               const std::vector<Param>& params, bool retry) {
  std::vector<const char*> values;
  std::vector<int> lengths, formats;
  for (const Param& p : params) {
    values.push_back(p.value.data());
    lengths.push_back(static_cast<int>(p.value.size()));
    formats.push_back(p.binary ? 1 : 0);
  }
  for (int attempt = 0;; ++attempt) {
    if (PQstatus(conn_) != CONNECTION_OK) {
      if (in_transaction_) {
        return absl::UnavailableError("postgresql: the connection was lost in a transaction");
      }
      PQreset(conn_);
      if (PQstatus(conn_) != CONNECTION_OK) {
        return absl::UnavailableError(absl::StrCat("cannot reach PostgreSQL at ", Redacted(uri_),
                                                   ": ", PQerrorMessage(conn_)));
      }
    }
    // Parameterless statements go through the simple query protocol, which
    // takes several commands at once (a migration); results come back as text.
    PgResult r(params.empty() ? PQexec(conn_, sql.c_str())
                              : PQexecParams(conn_, sql.c_str(), static_cast<int>(params.size()),
                                             nullptr, values.data(), lengths.data(), formats.data(),
                                             /*resultFormat=*/1));
    const PGresult* raw = r.get();
    const ExecStatusType st = PQresultStatus(raw);
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) return r;
    const bool lost = PQstatus(conn_) != CONNECTION_OK;
    if (lost && retry && !in_transaction_ && attempt == 0) continue;  // reconnect, once more
    return PgStatus(Verb(sql), raw ? PQresultErrorField(raw, PG_DIAG_SQLSTATE) : nullptr,
                    raw ? PQresultErrorMessage(raw) : PQerrorMessage(conn_));
  }
}

absl::Status PostgresDatabase::Begin() {
  auto r = Run("BEGIN");
  if (!r.ok()) return r.status();
  in_transaction_ = true;
  return absl::OkStatus();
}

absl::Status PostgresDatabase::Commit() {
  auto r = Run("COMMIT");
  in_transaction_ = false;
  return r.status();
}

absl::Status PostgresDatabase::Rollback(absl::Status cause) {
  if (in_transaction_) {
    if (PQstatus(conn_) == CONNECTION_OK) (void)Run("ROLLBACK");
    in_transaction_ = false;
  }
  return cause;
}

int64_t PostgresDatabase::BeginUpload() {
  // Unique across replicas without a round trip: 62 random bits.
  static thread_local std::mt19937_64 rng{std::random_device{}() ^
                                          (static_cast<uint64_t>(std::random_device{}()) << 32)};
  return static_cast<int64_t>(rng() >> 2) + 1;
}

absl::Status PostgresDatabase::StageExamples(int64_t upload,
                                             const std::vector<StoredExample>& examples) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = Begin(); !s.ok()) return s;
  for (const StoredExample& e : examples) {
    auto r =
        Run("INSERT INTO staged_examples(upload, name, label, bytes, hash) "
            "VALUES ($1::bigint, $2::text, $3::text, $4::bytea, $5::bigint)",
            {Text(upload), Text(e.name), Text(e.label), Blob(e.bytes),
             Text(static_cast<int64_t>(e.hash))});
    if (!r.ok()) return Rollback(r.status());
  }
  return Commit();
}

absl::StatusOr<int64_t> PostgresDatabase::CommitUpload(int64_t upload, const std::string& dataset,
                                                       const UploadQuota& quota) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = Begin(); !s.ok()) return s;
  // Commits to one dataset take turns (on every replica): the quota is
  // checked against the dataset as it is at commit (no check-then-act race).
  if (auto r = Run("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))", {Text(dataset)});
      !r.ok()) {
    return Rollback(r.status());
  }
  auto count = [&](const char* sql, std::vector<Param> params)
                   ABSL_NO_THREAD_SAFETY_ANALYSIS -> absl::StatusOr<int64_t> {
    auto r = Run(sql, params);
    if (!r.ok()) return r.status();
    return r->Int(0, 0);
  };
  auto added = count("SELECT COUNT(*)::bigint FROM staged_examples WHERE upload = $1::bigint",
                     {Text(upload)});
  if (!added.ok()) return Rollback(added.status());
  auto images =
      count("SELECT COUNT(*)::bigint FROM examples WHERE dataset = $1::text", {Text(dataset)});
  if (!images.ok()) return Rollback(images.status());
  if (*images + *added > quota.max_images) {
    return Rollback(absl::ResourceExhaustedError(
        absl::StrCat("dataset \"", dataset, "\" would hold ", *images + *added,
                     " images, over the limit of ", quota.max_images, " (--max_dataset_images)")));
  }
  auto classes = count(
      "SELECT COUNT(*)::bigint FROM (SELECT label FROM examples WHERE dataset = $1::text "
      "UNION SELECT label FROM staged_examples WHERE upload = $2::bigint) AS labels",
      {Text(dataset), Text(upload)});
  if (!classes.ok()) return Rollback(classes.status());
  if (*classes > quota.max_classes) {
    return Rollback(absl::ResourceExhaustedError(absl::StrCat(
        "dataset \"", dataset, "\" would have ", *classes, " classes, over the limit of ",
        quota.max_classes, " (--max_dataset_classes)")));
  }
  if (*added > 0) {
    for (const auto& [sql, params] : std::vector<std::pair<const char*, std::vector<Param>>>{
             {"INSERT INTO datasets(name, created_unix) VALUES ($1::text, $2::bigint) "
              "ON CONFLICT (name) DO NOTHING",
              {Text(dataset), Text(static_cast<int64_t>(std::time(nullptr)))}},
             {"INSERT INTO examples(dataset, name, label, bytes, hash) "
              "SELECT $1::text, name, label, bytes, hash FROM staged_examples "
              "WHERE upload = $2::bigint ORDER BY seq",
              {Text(dataset), Text(upload)}},
             {"DELETE FROM staged_examples WHERE upload = $1::bigint", {Text(upload)}}}) {
      if (auto r = Run(sql, params); !r.ok()) return Rollback(r.status());
    }
  }
  if (absl::Status s = Commit(); !s.ok()) return s;
  return *added;
}

void PostgresDatabase::AbortUpload(int64_t upload) {
  absl::MutexLock lock(&mu_);
  (void)Run("DELETE FROM staged_examples WHERE upload = $1::bigint", {Text(upload)});
}

absl::StatusOr<DatasetInfo> PostgresDatabase::GetDatasetLocked(const std::string& name) {
  DatasetInfo info;
  {
    auto r = Run("SELECT created_unix FROM datasets WHERE name = $1::text", {Text(name)});
    if (!r.ok()) return r.status();
    if (r->rows() == 0) {
      return absl::NotFoundError(absl::StrCat("dataset \"", name, "\" does not exist"));
    }
    info.name = name;
    info.created_unix = r->Int(0, 0);
  }
  // octet_length of an out-of-line value reads its header, not the bytes.
  auto r =
      Run("SELECT label, COUNT(*)::bigint, COALESCE(SUM(octet_length(bytes)), 0)::bigint "
          "FROM examples WHERE dataset = $1::text GROUP BY label",
          {Text(name)});
  if (!r.ok()) return r.status();
  for (int i = 0; i < r->rows(); ++i) {
    const std::string label = r->Bytes(i, 0);
    if (label.empty()) {
      info.unlabelled = r->Int(i, 1);
    } else {
      info.class_counts[label] = r->Int(i, 1);
    }
    info.images += r->Int(i, 1);
    info.bytes += r->Int(i, 2);
  }
  return info;
}

absl::StatusOr<DatasetInfo> PostgresDatabase::GetDataset(const std::string& name) {
  absl::MutexLock lock(&mu_);
  return GetDatasetLocked(name);
}

absl::StatusOr<std::vector<DatasetInfo>> PostgresDatabase::ListDatasets() {
  absl::MutexLock lock(&mu_);
  // COLLATE "C": byte order, as SQLite sorts (not the server's locale).
  auto r = Run("SELECT name FROM datasets ORDER BY name COLLATE \"C\"");
  if (!r.ok()) return r.status();
  std::vector<DatasetInfo> out;
  for (int i = 0; i < r->rows(); ++i) {
    auto info = GetDatasetLocked(r->Bytes(i, 0));
    if (info.status().code() == absl::StatusCode::kNotFound) continue;  // deleted meanwhile
    if (!info.ok()) return info.status();
    out.push_back(std::move(*info));
  }
  return out;
}

absl::StatusOr<std::vector<StoredExample>> PostgresDatabase::Examples(const std::string& dataset,
                                                                      bool bytes) {
  absl::MutexLock lock(&mu_);
  // One snapshot: the dataset and its examples as of one moment.
  if (absl::Status s = Begin(); !s.ok()) return s;
  if (auto r = Run("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"); !r.ok()) {
    return Rollback(r.status());
  }
  if (auto info = GetDatasetLocked(dataset); !info.ok()) return Rollback(info.status());
  auto r = Run(bytes ? "SELECT id, name, label, hash, bytes FROM examples WHERE dataset = $1::text "
                       "ORDER BY id"
                     : "SELECT id, name, label, hash FROM examples WHERE dataset = $1::text "
                       "ORDER BY id",
               {Text(dataset)});
  if (!r.ok()) return Rollback(r.status());
  if (absl::Status s = Commit(); !s.ok()) return s;
  std::vector<StoredExample> out;
  out.reserve(static_cast<size_t>(r->rows()));
  for (int i = 0; i < r->rows(); ++i) {
    out.push_back({r->Int(i, 0), r->Bytes(i, 1), r->Bytes(i, 2), bytes ? r->Bytes(i, 4) : "",
                   static_cast<uint64_t>(r->Int(i, 3))});
  }
  return out;
}

absl::StatusOr<std::vector<StoredExample>> PostgresDatabase::LoadExamples(
    const std::string& dataset) {
  return Examples(dataset, /*bytes=*/true);
}

absl::StatusOr<std::vector<StoredExample>> PostgresDatabase::ListExamples(
    const std::string& dataset) {
  return Examples(dataset, /*bytes=*/false);
}

absl::StatusOr<std::vector<std::string>> PostgresDatabase::ReadExampleBytes(
    const std::vector<int64_t>& ids) {
  absl::MutexLock lock(&mu_);
  auto r = Run("SELECT id, bytes FROM examples WHERE id = ANY($1::bigint[])",
               {Text(absl::StrCat("{", absl::StrJoin(ids, ","), "}"))});
  if (!r.ok()) return r.status();
  std::unordered_map<int64_t, int> row_of;
  for (int i = 0; i < r->rows(); ++i) row_of[r->Int(i, 0)] = i;
  std::vector<std::string> out;
  out.reserve(ids.size());
  for (int64_t id : ids) {
    auto it = row_of.find(id);
    if (it == row_of.end()) {
      return absl::NotFoundError(absl::StrCat("example ", id, " no longer exists"));
    }
    out.push_back(r->Bytes(it->second, 1));
  }
  return out;
}

absl::Status PostgresDatabase::DeleteDataset(const std::string& name) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = Begin(); !s.ok()) return s;
  // The examples go with their dataset (ON DELETE CASCADE).
  auto r = Run("DELETE FROM datasets WHERE name = $1::text", {Text(name)});
  if (!r.ok()) return Rollback(r.status());
  const char* affected = PQcmdTuples(r->get());
  if (affected == nullptr || std::strcmp(affected, "0") == 0) {
    return Rollback(absl::NotFoundError(absl::StrCat("dataset \"", name, "\" does not exist")));
  }
  return Commit();
}

absl::Status PostgresDatabase::PutRecord(const std::string& kind, const std::string& key,
                                         const std::string& json) {
  absl::MutexLock lock(&mu_);
  return Run("INSERT INTO records(kind, key, json) VALUES ($1::text, $2::text, $3::text) "
             "ON CONFLICT (kind, key) DO UPDATE SET json = EXCLUDED.json",
             {Text(kind), Text(key), Text(json)})
      .status();
}

absl::Status PostgresDatabase::CreateRecord(const std::string& kind, const std::string& key,
                                            const std::string& json) {
  absl::MutexLock lock(&mu_);
  // Not retried on a lost connection: a first attempt that committed would
  // make the retry report ALREADY_EXISTS for this very create.
  auto r =
      Run("INSERT INTO records(kind, key, json) VALUES ($1::text, $2::text, $3::text) "
          "ON CONFLICT (kind, key) DO NOTHING",
          {Text(kind), Text(key), Text(json)}, /*retry=*/false);
  if (!r.ok()) return r.status();
  const char* affected = PQcmdTuples(r->get());
  if (affected == nullptr || std::strcmp(affected, "0") == 0) {
    return absl::AlreadyExistsError(absl::StrCat(kind, " \"", key, "\" already exists"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> PostgresDatabase::GetRecord(const std::string& kind,
                                                        const std::string& key) {
  absl::MutexLock lock(&mu_);
  auto r = Run("SELECT json FROM records WHERE kind = $1::text AND key = $2::text",
               {Text(kind), Text(key)});
  if (!r.ok()) return r.status();
  if (r->rows() == 0) {
    return absl::NotFoundError(absl::StrCat(kind, " \"", key, "\" does not exist"));
  }
  return r->Bytes(0, 0);
}

absl::Status PostgresDatabase::DeleteRecords(const std::string& kind, const std::string& key) {
  absl::MutexLock lock(&mu_);
  return Run("DELETE FROM records WHERE kind = $1::text AND (key = $2::text OR "
             "starts_with(key, $3::text))",
             {Text(kind), Text(key), Text(key + "/")})
      .status();
}

absl::StatusOr<std::vector<std::pair<std::string, std::string>>> PostgresDatabase::ListRecords(
    const std::string& kind) {
  absl::MutexLock lock(&mu_);
  auto r = Run("SELECT key, json FROM records WHERE kind = $1::text ORDER BY key COLLATE \"C\"",
               {Text(kind)});
  if (!r.ok()) return r.status();
  std::vector<std::pair<std::string, std::string>> out;
  out.reserve(static_cast<size_t>(r->rows()));
  for (int i = 0; i < r->rows(); ++i) out.emplace_back(r->Bytes(i, 0), r->Bytes(i, 1));
  return out;
}

absl::StatusOr<std::vector<std::string>> PostgresDatabase::ListRecordKinds() {
  absl::MutexLock lock(&mu_);
  auto r = Run("SELECT DISTINCT kind COLLATE \"C\" AS k FROM records ORDER BY k", {});
  if (!r.ok()) return r.status();
  std::vector<std::string> out;
  for (int i = 0; i < r->rows(); ++i) out.push_back(r->Bytes(i, 0));
  return out;
}

absl::Status PostgresDatabase::PutBlob(const std::string& name, absl::string_view bytes) {
  if (absl::Status s = ValidateBlobName(name); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  return Run("INSERT INTO blobs(name, bytes) VALUES ($1::text, $2::bytea) "
             "ON CONFLICT (name) DO UPDATE SET bytes = EXCLUDED.bytes",
             {Text(name), Blob(bytes)})
      .status();
}

absl::StatusOr<std::string> PostgresDatabase::GetBlob(const std::string& name) {
  if (absl::Status s = ValidateBlobName(name); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  auto r = Run("SELECT bytes FROM blobs WHERE name = $1::text", {Text(name)});
  if (!r.ok()) return r.status();
  if (r->rows() == 0) return absl::NotFoundError(absl::StrCat("blob ", name, " does not exist"));
  return r->Bytes(0, 0);
}

absl::Status PostgresDatabase::DeleteBlob(const std::string& name) {
  if (absl::Status s = ValidateBlobName(name); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  return Run("DELETE FROM blobs WHERE name = $1::text", {Text(name)}).status();
}

absl::StatusOr<std::vector<std::string>> PostgresDatabase::ListBlobs(const std::string& prefix) {
  if (absl::Status s = ValidateBlobName(prefix); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  auto r =
      Run("SELECT name FROM blobs WHERE starts_with(name, $1::text) ORDER BY name COLLATE \"C\"",
          {Text(prefix + "/")});
  if (!r.ok()) return r.status();
  std::vector<std::string> out;
  out.reserve(static_cast<size_t>(r->rows()));
  for (int i = 0; i < r->rows(); ++i) out.push_back(r->Bytes(i, 0));
  return out;
}

}  // namespace tlserve
