// The Database in one SQLite file (WAL journal, synchronous=FULL): the
// embedded default, for one server on one machine. Calls are serialised on
// one connection. Blobs are files beside the database file.
#ifndef TLSERVE_SERVER_STORE_SQLITE_DATABASE_H_
#define TLSERVE_SERVER_STORE_SQLITE_DATABASE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "server/store/database.h"

struct sqlite3;

namespace tlserve {

class SqliteDatabase final : public Database {
 public:
  // Opens or creates `path` and brings its schema up to date.
  static absl::StatusOr<std::unique_ptr<Database>> Open(const std::string& path);
  ~SqliteDatabase() override;

  const char* kind() const override { return "sqlite"; }
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
  int64_t ReusableBytes() override;
  absl::Status PutRecord(const std::string& kind, const std::string& key,
                         const std::string& json) override;
  absl::Status CreateRecord(const std::string& kind, const std::string& key,
                            const std::string& json) override;
  absl::StatusOr<std::string> GetRecord(const std::string& kind, const std::string& key) override;
  absl::Status DeleteRecords(const std::string& kind, const std::string& key) override;
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ListRecords(
      const std::string& kind) override;
  absl::StatusOr<std::vector<std::string>> ListRecordKinds() override;
  absl::Status PutBlob(const std::string& name, absl::string_view bytes) override;
  absl::StatusOr<std::string> GetBlob(const std::string& name) override;
  absl::Status DeleteBlob(const std::string& name) override;
  absl::StatusOr<std::vector<std::string>> ListBlobs(const std::string& prefix) override;
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

 private:
  SqliteDatabase(sqlite3* db, std::string blob_dir) : blob_dir_(std::move(blob_dir)), db_(db) {}
  absl::Status Exec(const std::string& sql) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Ends a failed transaction; returns `cause`.
  absl::Status Rollback(absl::Status cause) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<DatasetInfo> GetDatasetLocked(const std::string& name)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status PutRecordLocked(const std::string& kind, const std::string& key,
                               const std::string& json) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::vector<QueuedJob>> QueuedJobsLocked(const std::string& where,
                                                          const std::string& owner)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string blob_dir_;  // the database file's directory
  absl::Mutex mu_;
  sqlite3* db_ ABSL_GUARDED_BY(mu_);
  int64_t next_upload_ ABSL_GUARDED_BY(mu_) = 1;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_STORE_SQLITE_DATABASE_H_
