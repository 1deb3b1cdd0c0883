// The Database in PostgreSQL (libpq), shared by every replica that opens the
// same URI. Schema migrations are numbered and applied at open under an
// advisory lock, so replicas starting at once agree on one schema. Commits
// are durable when they return (PostgreSQL's synchronous_commit, its
// default). Calls are serialised on one connection, re-established when the
// server went away (a call that finds it gone fails UNAVAILABLE; the next one
// reconnects).
#ifndef TLSERVE_SERVER_STORE_POSTGRES_DATABASE_H_
#define TLSERVE_SERVER_STORE_POSTGRES_DATABASE_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "server/store/database.h"

typedef struct pg_conn PGconn;

namespace tlserve {

class PgResult;

class PostgresDatabase final : public Database {
 public:
  // Connects to `uri` (a libpq connection URI) and brings the schema up to
  // date. UNAVAILABLE when the server cannot be reached.
  static absl::StatusOr<std::unique_ptr<Database>> Open(const std::string& uri);
  ~PostgresDatabase() override;

  // `uri` without its password (for messages and logs).
  static std::string Redacted(const std::string& uri);
  // The schema version this build writes (the number of migrations).
  static int SchemaVersion();
  // The schema version recorded in the database.
  absl::StatusOr<int> StoredSchemaVersion();

  const char* kind() const override { return "postgresql"; }
  int64_t BeginUpload() override;
  absl::Status StageExamples(int64_t upload, const std::vector<StoredExample>& examples) override;
  absl::StatusOr<int64_t> CommitUpload(int64_t upload, const std::string& dataset,
                                       const UploadQuota& quota) override;
  void AbortUpload(int64_t upload) override;
  absl::StatusOr<DatasetInfo> GetDataset(const std::string& name) override;
  absl::StatusOr<std::vector<DatasetInfo>> ListDatasets() override;
  absl::StatusOr<std::vector<StoredExample>> LoadExamples(const std::string& dataset) override;
  absl::StatusOr<std::vector<StoredExample>> ListExamples(const std::string& dataset) override;
  absl::StatusOr<std::vector<std::string>> ReadExampleBytes(
      const std::vector<int64_t>& ids) override;
  absl::Status DeleteDataset(const std::string& name) override;
  int64_t ReusableBytes() override { return 0; }
  absl::Status PutRecord(const std::string& kind, const std::string& key,
                         const std::string& json) override;
  absl::Status CreateRecord(const std::string& kind, const std::string& key,
                            const std::string& json) override;
  absl::StatusOr<std::string> GetRecord(const std::string& kind, const std::string& key) override;
  absl::Status DeleteRecords(const std::string& kind, const std::string& key) override;
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ListRecords(
      const std::string& kind) override;
  absl::StatusOr<std::vector<std::string>> ListRecordKinds() override;
  // LISTENs on its own connection (re-established when lost) to the
  // notifications the records table's trigger sends at each commit.
  int Subscribe(RecordChanged changed) override;
  void Unsubscribe(int token) override;
  // pg_try_advisory_lock_shared / pg_try_advisory_lock on a connection of
  // its own, kept open.
  absl::Status AttachReplica() override;
  absl::StatusOr<bool> LockForCopy() override;
  absl::Status QueueJob(const QueuedJob& job, const std::string& record) override;
  absl::StatusOr<std::vector<QueuedJob>> ListQueuedJobs() override;
  absl::StatusOr<std::optional<QueuedJob>> ClaimJob(const std::string& owner, absl::Duration lease,
                                                    const PickJob& pick) override;
  absl::StatusOr<std::vector<std::string>> RenewJobLeases(
      const std::string& owner, absl::Duration lease, const std::vector<std::string>& ids) override;
  absl::Status PutClaimedJob(const std::string& id, const std::string& owner,
                             const std::string& record, JobEnd end) override;
  absl::StatusOr<bool> EndUnclaimedJob(const std::string& id, const std::string& owner,
                                       const std::string& record) override;
  absl::Status PutBlob(const std::string& name, absl::string_view bytes) override;
  absl::StatusOr<std::string> GetBlob(const std::string& name) override;
  absl::Status DeleteBlob(const std::string& name) override;
  absl::StatusOr<std::vector<std::string>> ListBlobs(const std::string& prefix) override;

  // A statement parameter: text, or raw bytes for a bytea column.
  struct Param {
    std::string value;
    bool binary = false;
  };

 private:
  PostgresDatabase(PGconn* conn, std::string uri) : conn_(conn), uri_(std::move(uri)) {}
  // Runs one statement; with parameters, results come back in binary
  // format (PgResult::Int reads them); without, as text, and `sql` may hold
  // several statements. Outside a transaction a lost connection is
  // re-established and the statement tried once more (unless `retry` is
  // false: a statement that must not run twice).
  absl::StatusOr<PgResult> Run(const std::string& sql, const std::vector<Param>& params = {},
                               bool retry = true) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Begin() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Commit() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Ends a failed transaction; returns `cause`.
  absl::Status Rollback(absl::Status cause) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Migrate() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<DatasetInfo> GetDatasetLocked(const std::string& name)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::vector<StoredExample>> Examples(const std::string& dataset, bool bytes);
  // The lock of AttachReplica (`shared`) or LockForCopy.
  absl::StatusOr<bool> TryReplicaLock(bool shared);

  void Listen();
  void StopListening();

  absl::Mutex mu_;
  PGconn* conn_ ABSL_GUARDED_BY(mu_);
  std::atomic<bool> stop_listening_{false};
  std::thread listener_ ABSL_GUARDED_BY(subscribers_mu_);
  // Held while callbacks run: Unsubscribe waits for one under way.
  absl::Mutex subscribers_mu_;
  std::map<int, RecordChanged> subscribers_ ABSL_GUARDED_BY(subscribers_mu_);
  int next_subscriber_ ABSL_GUARDED_BY(subscribers_mu_) = 1;
  absl::Mutex leader_mu_;
  // The replica lock's connection; also renews the job leases.
  PGconn* leader_conn_ ABSL_GUARDED_BY(leader_mu_) = nullptr;
  bool attached_ ABSL_GUARDED_BY(leader_mu_) = false;  // holds the shared lock on it
  bool in_transaction_ ABSL_GUARDED_BY(mu_) = false;
  const std::string uri_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_STORE_POSTGRES_DATABASE_H_
