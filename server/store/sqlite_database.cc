#include "server/store/sqlite_database.h"

#include <sqlite3.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/store/data_dir.h"

namespace tlserve {
namespace {

constexpr char kSchema[] = R"sql(
CREATE TABLE IF NOT EXISTS datasets (
  name TEXT PRIMARY KEY,
  created_unix INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS examples (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  dataset TEXT NOT NULL REFERENCES datasets(name) ON DELETE CASCADE,
  name TEXT NOT NULL,
  label TEXT NOT NULL,
  bytes BLOB NOT NULL,
  hash INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS examples_by_dataset ON examples(dataset, id);
CREATE TABLE IF NOT EXISTS staged_examples (
  upload INTEGER NOT NULL,
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL,
  label TEXT NOT NULL,
  bytes BLOB NOT NULL,
  hash INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS staged_by_upload ON staged_examples(upload, seq);
CREATE TABLE IF NOT EXISTS records (
  kind TEXT NOT NULL,
  key TEXT NOT NULL,
  json TEXT NOT NULL,
  PRIMARY KEY (kind, key)
);
CREATE TABLE IF NOT EXISTS job_queue (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  model TEXT NOT NULL UNIQUE,
  tenant TEXT NOT NULL,
  owner TEXT NOT NULL DEFAULT '',
  lease_until_ms INTEGER NOT NULL DEFAULT 0,
  claims INTEGER NOT NULL DEFAULT 0
);
)sql";

// Jobs nobody holds: in SQLite one process owns the file, so a claim of
// any other owner is a dead process's.
constexpr char kUnclaimed[] = "(owner = '' OR owner <> ?1 OR lease_until_ms < ?2)";

// A prepared statement finalised on scope exit.
class Statement {
 public:
  Statement(sqlite3* db, const char* sql) : db_(db) {
    rc_ = sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr);
  }
  ~Statement() { sqlite3_finalize(stmt_); }
  absl::Status status() const {
    return rc_ == SQLITE_OK ? absl::OkStatus()
                            : absl::InternalError(absl::StrCat("sqlite: ", sqlite3_errmsg(db_)));
  }
  sqlite3_stmt* get() { return stmt_; }
  void Bind(int i, const std::string& s) {
    sqlite3_bind_text(stmt_, i, s.data(), static_cast<int>(s.size()), SQLITE_TRANSIENT);
  }
  void BindBlob(int i, const std::string& s) {
    sqlite3_bind_blob(stmt_, i, s.data(), static_cast<int>(s.size()), SQLITE_STATIC);
  }
  void Bind(int i, int64_t v) { sqlite3_bind_int64(stmt_, i, v); }
  std::string Text(int col) {
    const auto* p = static_cast<const char*>(sqlite3_column_blob(stmt_, col));
    return p ? std::string(p, static_cast<size_t>(sqlite3_column_bytes(stmt_, col))) : "";
  }
  int64_t Int(int col) { return sqlite3_column_int64(stmt_, col); }

 private:
  sqlite3* db_;
  sqlite3_stmt* stmt_ = nullptr;
  int rc_;
};

// A failed SQLite call as a status that keeps its real cause; call it
// before anything else (a ROLLBACK) touches the connection's error state.
absl::Status SqliteStatus(int rc, const std::string& what, const std::string& message) {
  const std::string text = absl::StrCat("sqlite ", what, ": ", message);
  switch (rc & 0xff) {
    case SQLITE_FULL:
      return absl::ResourceExhaustedError(
          absl::StrCat(text,
                       " (the data directory's disk is full; delete datasets or models, "
                       "or give it more space)"));
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return absl::UnavailableError(text);
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
      return absl::DataLossError(text);
    case SQLITE_READONLY:
    case SQLITE_PERM:
    case SQLITE_CANTOPEN:
      return absl::PermissionDeniedError(text);
    default:
      return absl::InternalError(text);
  }
}

absl::Status SqliteError(sqlite3* db, const std::string& what) {
  return SqliteStatus(sqlite3_extended_errcode(db), what, sqlite3_errmsg(db));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Database>> SqliteDatabase::Open(const std::string& path) {
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
                      nullptr) != SQLITE_OK) {
    absl::Status s = absl::UnavailableError(
        absl::StrCat("cannot open database ", path, ": ", db ? sqlite3_errmsg(db) : "no memory"));
    sqlite3_close(db);
    return s;
  }
  const size_t slash = path.rfind('/');
  std::unique_ptr<SqliteDatabase> d(
      new SqliteDatabase(db, slash == std::string::npos ? "." : path.substr(0, slash)));
  absl::MutexLock lock(&d->mu_);
  // FULL: a commit is fsync'd before it returns, so an acknowledged write
  // survives a crash or power loss.
  // journal_size_limit: the write-ahead log is cut back to 64 MiB after a
  // checkpoint instead of keeping the size of the largest upload.
  for (const char* pragma :
       {"PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", "PRAGMA foreign_keys=ON",
        "PRAGMA busy_timeout=5000", "PRAGMA journal_size_limit=67108864"}) {
    if (absl::Status s = d->Exec(pragma); !s.ok()) return s;
  }
  if (absl::Status s = d->Exec(kSchema); !s.ok()) return s;
  // Uploads a previous process left unfinished were never acknowledged.
  // (Only when there are some: a start on a full disk must not write.)
  {
    Statement any(d->db_, "SELECT EXISTS (SELECT 1 FROM staged_examples)");
    if (sqlite3_step(any.get()) == SQLITE_ROW && any.Int(0) != 0) {
      if (absl::Status s = d->Exec("DELETE FROM staged_examples"); !s.ok()) return s;
    }
  }
  return std::unique_ptr<Database>(std::move(d));
}

SqliteDatabase::~SqliteDatabase() {
  absl::MutexLock lock(&mu_);
  sqlite3_close(db_);
}

absl::Status SqliteDatabase::Exec(const std::string& sql) {
  char* error = nullptr;
  const int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &error);
  if (rc != SQLITE_OK) {
    absl::Status s = SqliteStatus(rc, sql.substr(0, sql.find(' ')), error ? error : "?");
    sqlite3_free(error);
    return s;
  }
  return absl::OkStatus();
}

absl::Status SqliteDatabase::Rollback(absl::Status cause) {
  // After SQLITE_FULL and some other errors SQLite has already rolled back;
  // then ROLLBACK itself fails ("no transaction is active"): the cause is
  // what the caller needs, so it is what comes back either way.
  if (sqlite3_get_autocommit(db_) == 0) (void)Exec("ROLLBACK");
  return cause;
}

int64_t SqliteDatabase::ReusableBytes() {
  absl::MutexLock lock(&mu_);
  Statement pages(db_, "PRAGMA freelist_count");
  Statement size(db_, "PRAGMA page_size");
  if (sqlite3_step(pages.get()) != SQLITE_ROW || sqlite3_step(size.get()) != SQLITE_ROW) return 0;
  return pages.Int(0) * size.Int(0);
}

int64_t SqliteDatabase::BeginUpload() {
  absl::MutexLock lock(&mu_);
  return next_upload_++;
}

absl::Status SqliteDatabase::StageExamples(int64_t upload,
                                           const std::vector<StoredExample>& examples) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = Exec("BEGIN IMMEDIATE"); !s.ok()) return s;
  Statement insert(db_,
                   "INSERT INTO staged_examples(upload, name, label, bytes, hash) "
                   "VALUES (?, ?, ?, ?, ?)");
  if (!insert.status().ok()) return Rollback(insert.status());
  for (const StoredExample& e : examples) {
    sqlite3_reset(insert.get());
    insert.Bind(1, upload);
    insert.Bind(2, e.name);
    insert.Bind(3, e.label);
    insert.BindBlob(4, e.bytes);
    insert.Bind(5, static_cast<int64_t>(e.hash));
    if (sqlite3_step(insert.get()) != SQLITE_DONE) {
      return Rollback(SqliteError(db_, "stage upload"));
    }
  }
  if (absl::Status s = Exec("COMMIT"); !s.ok()) return Rollback(s);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> SqliteDatabase::CommitUpload(int64_t upload, const std::string& dataset,
                                                     const UploadQuota& quota) {
  absl::MutexLock lock(&mu_);
  // One write transaction: the quota is checked against the dataset as it
  // is at commit, with every other writer held off (no check-then-act race).
  if (absl::Status s = Exec("BEGIN IMMEDIATE"); !s.ok()) return s;
  // A single number from `sql`, whose parameters are (dataset, upload).
  auto count = [this, &dataset, upload](const char* sql)
                   ABSL_NO_THREAD_SAFETY_ANALYSIS -> absl::StatusOr<int64_t> {
    Statement q(db_, sql);
    if (!q.status().ok()) return q.status();
    const int params = sqlite3_bind_parameter_count(q.get());
    if (params >= 1) q.Bind(1, dataset);
    if (params >= 2) q.Bind(2, upload);
    if (sqlite3_step(q.get()) != SQLITE_ROW) return SqliteError(db_, "count");
    return q.Int(0);
  };
  auto added = count("SELECT COUNT(*) FROM staged_examples WHERE upload = ?2");
  if (!added.ok()) return Rollback(added.status());
  auto images = count("SELECT COUNT(*) FROM examples WHERE dataset = ?1");
  if (!images.ok()) return Rollback(images.status());
  if (*images + *added > quota.max_images) {
    return Rollback(absl::ResourceExhaustedError(
        absl::StrCat("dataset \"", dataset, "\" would hold ", *images + *added,
                     " images, over the limit of ", quota.max_images, " (--max_dataset_images)")));
  }
  auto classes = count(
      "SELECT COUNT(*) FROM (SELECT label FROM examples WHERE dataset = ?1 "
      "UNION SELECT label FROM staged_examples WHERE upload = ?2)");
  if (!classes.ok()) return Rollback(classes.status());
  if (*classes > quota.max_classes) {
    return Rollback(absl::ResourceExhaustedError(absl::StrCat(
        "dataset \"", dataset, "\" would have ", *classes, " classes, over the limit of ",
        quota.max_classes, " (--max_dataset_classes)")));
  }
  if (*added > 0) {
    Statement create(db_, "INSERT OR IGNORE INTO datasets(name, created_unix) VALUES (?, ?)");
    create.Bind(1, dataset);
    create.Bind(2, static_cast<int64_t>(std::time(nullptr)));
    if (sqlite3_step(create.get()) != SQLITE_DONE) return Rollback(SqliteError(db_, "insert"));
    Statement move(db_,
                   "INSERT INTO examples(dataset, name, label, bytes, hash) "
                   "SELECT ?, name, label, bytes, hash FROM staged_examples WHERE upload = ? "
                   "ORDER BY seq");
    move.Bind(1, dataset);
    move.Bind(2, upload);
    if (sqlite3_step(move.get()) != SQLITE_DONE) return Rollback(SqliteError(db_, "commit upload"));
    Statement drop(db_, "DELETE FROM staged_examples WHERE upload = ?");
    drop.Bind(1, upload);
    if (sqlite3_step(drop.get()) != SQLITE_DONE) return Rollback(SqliteError(db_, "commit upload"));
  }
  if (absl::Status s = Exec("COMMIT"); !s.ok()) return Rollback(s);
  return *added;
}

void SqliteDatabase::AbortUpload(int64_t upload) {
  absl::MutexLock lock(&mu_);
  Statement drop(db_, "DELETE FROM staged_examples WHERE upload = ?");
  drop.Bind(1, upload);
  (void)sqlite3_step(drop.get());
}

absl::StatusOr<DatasetInfo> SqliteDatabase::GetDatasetLocked(const std::string& name) {
  DatasetInfo info;
  {
    Statement q(db_, "SELECT created_unix FROM datasets WHERE name = ?");
    if (!q.status().ok()) return q.status();
    q.Bind(1, name);
    if (sqlite3_step(q.get()) != SQLITE_ROW) {
      return absl::NotFoundError(absl::StrCat("dataset \"", name, "\" does not exist"));
    }
    info.name = name;
    info.created_unix = q.Int(0);
  }
  Statement q(db_,
              "SELECT label, COUNT(*), SUM(LENGTH(bytes)) FROM examples WHERE dataset = ? "
              "GROUP BY label ORDER BY label");
  if (!q.status().ok()) return q.status();
  q.Bind(1, name);
  while (sqlite3_step(q.get()) == SQLITE_ROW) {
    if (q.Text(0).empty()) {
      info.unlabelled = q.Int(1);  // the pool SuggestLabels ranks
    } else {
      info.class_counts[q.Text(0)] = q.Int(1);
    }
    info.images += q.Int(1);
    info.bytes += q.Int(2);
  }
  return info;
}

absl::StatusOr<DatasetInfo> SqliteDatabase::GetDataset(const std::string& name) {
  absl::MutexLock lock(&mu_);
  return GetDatasetLocked(name);
}

absl::StatusOr<std::vector<DatasetInfo>> SqliteDatabase::ListDatasets() {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> names;
  {
    Statement q(db_, "SELECT name FROM datasets ORDER BY name");
    if (!q.status().ok()) return q.status();
    while (sqlite3_step(q.get()) == SQLITE_ROW) names.push_back(q.Text(0));
  }
  std::vector<DatasetInfo> out;
  for (const auto& n : names) {
    auto info = GetDatasetLocked(n);
    if (!info.ok()) return info.status();
    out.push_back(std::move(*info));
  }
  return out;
}

absl::StatusOr<std::vector<StoredExample>> SqliteDatabase::LoadExamples(
    const std::string& dataset) {
  absl::MutexLock lock(&mu_);
  if (auto info = GetDatasetLocked(dataset); !info.ok()) return info.status();
  Statement q(db_,
              "SELECT id, name, label, bytes, hash FROM examples WHERE dataset = ? ORDER BY id");
  if (!q.status().ok()) return q.status();
  q.Bind(1, dataset);
  std::vector<StoredExample> out;
  while (sqlite3_step(q.get()) == SQLITE_ROW) {
    out.push_back({q.Int(0), q.Text(1), q.Text(2), q.Text(3), static_cast<uint64_t>(q.Int(4))});
  }
  return out;
}

absl::StatusOr<std::vector<StoredExample>> SqliteDatabase::ListExamples(
    const std::string& dataset) {
  absl::MutexLock lock(&mu_);
  if (auto info = GetDatasetLocked(dataset); !info.ok()) return info.status();
  Statement q(db_, "SELECT id, name, label, hash FROM examples WHERE dataset = ? ORDER BY id");
  if (!q.status().ok()) return q.status();
  q.Bind(1, dataset);
  std::vector<StoredExample> out;
  while (sqlite3_step(q.get()) == SQLITE_ROW) {
    out.push_back({q.Int(0), q.Text(1), q.Text(2), "", static_cast<uint64_t>(q.Int(3))});
  }
  return out;
}

absl::StatusOr<std::vector<std::string>> SqliteDatabase::ReadExampleBytes(
    const std::vector<int64_t>& ids) {
  absl::MutexLock lock(&mu_);
  Statement q(db_, "SELECT bytes FROM examples WHERE id = ?");
  if (!q.status().ok()) return q.status();
  std::vector<std::string> out;
  out.reserve(ids.size());
  for (int64_t id : ids) {
    sqlite3_reset(q.get());
    q.Bind(1, id);
    if (sqlite3_step(q.get()) != SQLITE_ROW) {
      return absl::NotFoundError(absl::StrCat("example ", id, " no longer exists"));
    }
    out.push_back(q.Text(0));
  }
  return out;
}

absl::Status SqliteDatabase::DeleteDataset(const std::string& name) {
  absl::MutexLock lock(&mu_);
  if (auto info = GetDatasetLocked(name); !info.ok()) return info.status();
  if (absl::Status s = Exec("BEGIN IMMEDIATE"); !s.ok()) return s;
  for (const char* sql :
       {"DELETE FROM examples WHERE dataset = ?", "DELETE FROM datasets WHERE name = ?"}) {
    Statement d(db_, sql);
    d.Bind(1, name);
    if (sqlite3_step(d.get()) != SQLITE_DONE) return Rollback(SqliteError(db_, "delete"));
  }
  if (absl::Status s = Exec("COMMIT"); !s.ok()) return Rollback(s);
  return absl::OkStatus();
}

absl::Status SqliteDatabase::PutRecord(const std::string& kind, const std::string& key,
                                       const std::string& json) {
  absl::MutexLock lock(&mu_);
  return PutRecordLocked(kind, key, json);
}

absl::Status SqliteDatabase::PutRecordLocked(const std::string& kind, const std::string& key,
                                             const std::string& json) {
  Statement q(db_, "INSERT OR REPLACE INTO records(kind, key, json) VALUES (?, ?, ?)");
  if (!q.status().ok()) return q.status();
  q.Bind(1, kind);
  q.Bind(2, key);
  q.Bind(3, json);
  if (sqlite3_step(q.get()) != SQLITE_DONE) return SqliteError(db_, "put");
  return absl::OkStatus();
}

absl::Status SqliteDatabase::CreateRecord(const std::string& kind, const std::string& key,
                                          const std::string& json) {
  absl::MutexLock lock(&mu_);
  Statement q(db_, "INSERT OR IGNORE INTO records(kind, key, json) VALUES (?, ?, ?)");
  if (!q.status().ok()) return q.status();
  q.Bind(1, kind);
  q.Bind(2, key);
  q.Bind(3, json);
  if (sqlite3_step(q.get()) != SQLITE_DONE) return SqliteError(db_, "put");
  if (sqlite3_changes(db_) == 0) {
    return absl::AlreadyExistsError(absl::StrCat(kind, " \"", key, "\" already exists"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> SqliteDatabase::GetRecord(const std::string& kind,
                                                      const std::string& key) {
  absl::MutexLock lock(&mu_);
  Statement q(db_, "SELECT json FROM records WHERE kind = ? AND key = ?");
  if (!q.status().ok()) return q.status();
  q.Bind(1, kind);
  q.Bind(2, key);
  const int rc = sqlite3_step(q.get());
  if (rc == SQLITE_ROW) return q.Text(0);
  if (rc == SQLITE_DONE) {
    return absl::NotFoundError(absl::StrCat(kind, " \"", key, "\" does not exist"));
  }
  return SqliteError(db_, "get");
}

absl::Status SqliteDatabase::DeleteRecords(const std::string& kind, const std::string& key) {
  absl::MutexLock lock(&mu_);
  Statement q(db_, "DELETE FROM records WHERE kind = ? AND (key = ? OR substr(key, 1, ?) = ?)");
  if (!q.status().ok()) return q.status();
  q.Bind(1, kind);
  q.Bind(2, key);
  q.Bind(3, static_cast<int64_t>(key.size() + 1));
  q.Bind(4, key + "/");
  if (sqlite3_step(q.get()) != SQLITE_DONE) return SqliteError(db_, "delete");
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::pair<std::string, std::string>>> SqliteDatabase::ListRecords(
    const std::string& kind) {
  absl::MutexLock lock(&mu_);
  Statement q(db_, "SELECT key, json FROM records WHERE kind = ? ORDER BY key");
  if (!q.status().ok()) return q.status();
  q.Bind(1, kind);
  std::vector<std::pair<std::string, std::string>> out;
  while (sqlite3_step(q.get()) == SQLITE_ROW) out.emplace_back(q.Text(0), q.Text(1));
  return out;
}

absl::StatusOr<std::vector<std::string>> SqliteDatabase::ListRecordKinds() {
  absl::MutexLock lock(&mu_);
  Statement q(db_, "SELECT DISTINCT kind FROM records ORDER BY kind");
  if (!q.status().ok()) return q.status();
  std::vector<std::string> out;
  int rc;
  while ((rc = sqlite3_step(q.get())) == SQLITE_ROW) out.push_back(q.Text(0));
  if (rc != SQLITE_DONE) return SqliteError(db_, "list record kinds");
  return out;
}

absl::Status SqliteDatabase::PutBlob(const std::string& name, absl::string_view bytes) {
  if (absl::Status s = ValidateBlobName(name); !s.ok()) return s;
  const std::string path = absl::StrCat(blob_dir_, "/", name);
  if (absl::Status s = MakeDirectories(path.substr(0, path.rfind('/'))); !s.ok()) return s;
  return WriteFileAtomically(path, bytes);
}

absl::StatusOr<std::string> SqliteDatabase::GetBlob(const std::string& name) {
  if (absl::Status s = ValidateBlobName(name); !s.ok()) return s;
  const std::string path = absl::StrCat(blob_dir_, "/", name);
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat(path, " does not exist"));
    return absl::InternalError(absl::StrCat("cannot read ", path, ": ", std::strerror(errno)));
  }
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::DataLossError(absl::StrCat("cannot read ", path));
  return bytes;
}

absl::Status SqliteDatabase::DeleteBlob(const std::string& name) {
  if (absl::Status s = ValidateBlobName(name); !s.ok()) return s;
  const std::string path = absl::StrCat(blob_dir_, "/", name);
  if (std::remove(path.c_str()) != 0 && errno != ENOENT) {
    return absl::InternalError(absl::StrCat("cannot delete ", path, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> SqliteDatabase::ListBlobs(const std::string& prefix) {
  if (absl::Status s = ValidateBlobName(prefix); !s.ok()) return s;
  namespace fs = std::filesystem;
  const fs::path root(blob_dir_);
  std::vector<std::string> out;
  std::error_code ec;
  fs::recursive_directory_iterator it(root / prefix,
                                      fs::directory_options::follow_directory_symlink, ec),
      end;
  if (ec == std::errc::no_such_file_or_directory) return out;
  for (; !ec && it != end; it.increment(ec)) {
    // Directories are walked; anything else but a file (through symlinks)
    // is no blob the server wrote, and is an error rather than a silent gap
    // in a copy.
    if (it->is_directory(ec)) continue;
    if (!it->is_regular_file(ec)) {
      if (!ec) {
        return absl::FailedPreconditionError(
            absl::StrCat(it->path().string(), " is neither a file nor a directory: not a blob"));
      }
      break;
    }
    std::string name = it->path().lexically_relative(root).generic_string();
    if (absl::EndsWith(name, ".tmp") || !ValidateBlobName(name).ok()) continue;
    out.push_back(std::move(name));
  }
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot list ", (root / prefix).string(), ": ", ec.message()));
  }
  std::sort(out.begin(), out.end());
  return out;
}

namespace {

int64_t NowMs() { return absl::ToUnixMillis(absl::Now()); }

}  // namespace

absl::Status SqliteDatabase::QueueJob(const QueuedJob& job, const std::string& record) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = Exec("BEGIN IMMEDIATE"); !s.ok()) return s;
  {
    Statement busy(db_, "SELECT id FROM job_queue WHERE model = ?");
    if (!busy.status().ok()) return Rollback(busy.status());
    busy.Bind(1, job.model);
    if (sqlite3_step(busy.get()) == SQLITE_ROW) {
      return Rollback(absl::AlreadyExistsError(absl::StrCat(
          "model \"", job.model, "\" already has an unfinished job (", busy.Text(0), ")")));
    }
    Statement q(db_, "INSERT INTO job_queue(id, model, tenant, claims) VALUES (?, ?, ?, ?)");
    if (!q.status().ok()) return Rollback(q.status());
    q.Bind(1, job.id);
    q.Bind(2, job.model);
    q.Bind(3, job.tenant);
    q.Bind(4, static_cast<int64_t>(job.claims));
    if (sqlite3_step(q.get()) != SQLITE_DONE) return Rollback(SqliteError(db_, "queue job"));
  }
  if (absl::Status s = PutRecordLocked("job", job.id, record); !s.ok()) return Rollback(s);
  if (absl::Status s = Exec("COMMIT"); !s.ok()) return Rollback(s);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Database::QueuedJob>> SqliteDatabase::QueuedJobsLocked(
    const std::string& where, const std::string& owner) {
  Statement q(db_, absl::StrCat("SELECT id, model, tenant, owner, claims FROM job_queue WHERE ",
                                where, " ORDER BY seq")
                       .c_str());
  if (!q.status().ok()) return q.status();
  if (!owner.empty()) {
    q.Bind(1, owner);
    q.Bind(2, NowMs());
  }
  std::vector<QueuedJob> out;
  int rc;
  while ((rc = sqlite3_step(q.get())) == SQLITE_ROW) {
    out.push_back({q.Text(0), q.Text(1), q.Text(2), q.Text(3), static_cast<int>(q.Int(4))});
  }
  if (rc != SQLITE_DONE) return SqliteError(db_, "list queued jobs");
  return out;
}

absl::StatusOr<std::vector<Database::QueuedJob>> SqliteDatabase::ListQueuedJobs() {
  absl::MutexLock lock(&mu_);
  return QueuedJobsLocked("1", "");
}

absl::StatusOr<std::optional<Database::QueuedJob>> SqliteDatabase::ClaimJob(
    const std::string& owner, absl::Duration lease, const PickJob& pick) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = Exec("BEGIN IMMEDIATE"); !s.ok()) return s;
  auto free = QueuedJobsLocked(kUnclaimed, owner);
  if (!free.ok()) return Rollback(free.status());
  if (free->empty()) {
    (void)Rollback(absl::OkStatus());
    return std::nullopt;
  }
  const size_t chosen = std::min(pick(*free), free->size() - 1);
  QueuedJob job = (*free)[chosen];
  Statement q(db_,
              "UPDATE job_queue SET owner = ?, lease_until_ms = ?, claims = claims + 1 "
              "WHERE id = ?");
  if (!q.status().ok()) return Rollback(q.status());
  q.Bind(1, owner);
  q.Bind(2, NowMs() + absl::ToInt64Milliseconds(lease));
  q.Bind(3, job.id);
  if (sqlite3_step(q.get()) != SQLITE_DONE) return Rollback(SqliteError(db_, "claim job"));
  if (absl::Status s = Exec("COMMIT"); !s.ok()) return Rollback(s);
  return job;
}

absl::StatusOr<std::vector<std::string>> SqliteDatabase::RenewJobLeases(
    const std::string& owner, absl::Duration lease, const std::vector<std::string>& ids) {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> held;
  for (const std::string& id : ids) {
    Statement q(db_, "UPDATE job_queue SET lease_until_ms = ? WHERE id = ? AND owner = ?");
    if (!q.status().ok()) return q.status();
    q.Bind(1, NowMs() + absl::ToInt64Milliseconds(lease));
    q.Bind(2, id);
    q.Bind(3, owner);
    if (sqlite3_step(q.get()) != SQLITE_DONE) return SqliteError(db_, "renew job lease");
    if (sqlite3_changes(db_) > 0) held.push_back(id);
  }
  return held;
}

absl::Status SqliteDatabase::PutClaimedJob(const std::string& id, const std::string& owner,
                                           const std::string& record, JobEnd end) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = Exec("BEGIN IMMEDIATE"); !s.ok()) return s;
  {
    const char* sql = end == JobEnd::kFinish ? "DELETE FROM job_queue WHERE id = ?1 AND owner = ?2"
                      : end == JobEnd::kRelease
                          ? "UPDATE job_queue SET owner = '', lease_until_ms = 0 "
                            "WHERE id = ?1 AND owner = ?2"
                          : "UPDATE job_queue SET id = id WHERE id = ?1 AND owner = ?2";
    Statement q(db_, sql);
    if (!q.status().ok()) return Rollback(q.status());
    q.Bind(1, id);
    q.Bind(2, owner);
    if (sqlite3_step(q.get()) != SQLITE_DONE) return Rollback(SqliteError(db_, "job queue"));
    if (sqlite3_changes(db_) == 0) {
      return Rollback(
          absl::AbortedError(absl::StrCat("job ", id, ": this replica no longer holds its lease")));
    }
  }
  if (!record.empty()) {
    if (absl::Status s = PutRecordLocked("job", id, record); !s.ok()) return Rollback(s);
  }
  if (absl::Status s = Exec("COMMIT"); !s.ok()) return Rollback(s);
  return absl::OkStatus();
}

absl::StatusOr<bool> SqliteDatabase::EndUnclaimedJob(const std::string& id,
                                                     const std::string& owner,
                                                     const std::string& record) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = Exec("BEGIN IMMEDIATE"); !s.ok()) return s;
  {
    Statement q(db_, absl::StrCat("DELETE FROM job_queue WHERE id = ?3 AND ", kUnclaimed).c_str());
    if (!q.status().ok()) return Rollback(q.status());
    q.Bind(1, owner);
    q.Bind(2, NowMs());
    q.Bind(3, id);
    if (sqlite3_step(q.get()) != SQLITE_DONE) return Rollback(SqliteError(db_, "end job"));
    if (sqlite3_changes(db_) == 0) {
      (void)Rollback(absl::OkStatus());
      return false;
    }
  }
  if (absl::Status s = PutRecordLocked("job", id, record); !s.ok()) return Rollback(s);
  if (absl::Status s = Exec("COMMIT"); !s.ok()) return Rollback(s);
  return true;
}

}  // namespace tlserve
