// The server's durable catalogue in one SQLite database under the data
// directory (WAL journal, synchronous=FULL): datasets and their examples
// (the encoded image bytes themselves), and later models, versions and jobs.
// Every mutating method is one transaction, committed — on disk — before it
// returns OK; on an error nothing of it is written. Errors keep SQLite's
// cause: RESOURCE_EXHAUSTED for a full disk, UNAVAILABLE for busy, DATA_LOSS
// for a corrupt file, INTERNAL otherwise.
//
// Thread-safe: calls are serialised on one connection.
#ifndef TLSERVE_SERVER_STORE_DATABASE_H_
#define TLSERVE_SERVER_STORE_DATABASE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

struct sqlite3;

namespace tlserve {

struct StoredExample {
  int64_t id = 0;
  std::string name;
  std::string label;
  std::string bytes;  // the encoded image
  uint64_t hash = 0;  // of the bytes and name: decides the train/validation split
};

struct DatasetInfo {
  std::string name;
  int64_t created_unix = 0;
  int64_t images = 0;
  int64_t bytes = 0;
  std::map<std::string, int64_t> class_counts;  // labelled images by label
  int64_t unlabelled = 0;                       // images with no label (a pool)
};

// What one dataset may hold, checked when an upload commits.
struct UploadQuota {
  int64_t max_images = 1'000'000;
  int64_t max_classes = 1000;
};

class Database {
 public:
  // Opens or creates `path` and brings its schema up to date.
  static absl::StatusOr<std::unique_ptr<Database>> Open(const std::string& path);
  ~Database();
  Database(const Database&) = delete;
  Database& operator=(const Database&) = delete;

  // Uploads are staged in bounded chunks (invisible to every reader) and
  // moved into their dataset in one transaction at commit, when the quota is
  // checked; an upload that is aborted, or left by a crash, stores nothing.
  int64_t BeginUpload();
  absl::Status StageExamples(int64_t upload, const std::vector<StoredExample>& examples);
  // The number of examples added; RESOURCE_EXHAUSTED (nothing stored) over
  // the quota.
  absl::StatusOr<int64_t> CommitUpload(int64_t upload, const std::string& dataset,
                                       const UploadQuota& quota);
  void AbortUpload(int64_t upload);

  // NOT_FOUND for an unknown name.
  absl::StatusOr<DatasetInfo> GetDataset(const std::string& name);
  absl::StatusOr<std::vector<DatasetInfo>> ListDatasets();
  // Examples in insertion order (bytes included). NOT_FOUND for an unknown name.
  absl::StatusOr<std::vector<StoredExample>> LoadExamples(const std::string& dataset);
  // The same without the image bytes (`bytes` empty): what a training job
  // plans with. Jobs read the bytes a batch at a time with ReadExampleBytes.
  absl::StatusOr<std::vector<StoredExample>> ListExamples(const std::string& dataset);
  // The encoded bytes of examples by id, in the order given; NOT_FOUND when
  // one no longer exists.
  absl::StatusOr<std::vector<std::string>> ReadExampleBytes(const std::vector<int64_t>& ids);
  absl::Status DeleteDataset(const std::string& name);

  // Bytes inside the database file that SQLite will reuse before growing
  // it (free pages, e.g. of deleted datasets): free space for the disk budget.
  int64_t ReusableBytes();

  // Small JSON documents by kind ("model", "version", "job") and key, for
  // the catalogue of models, their versions and the job history.
  absl::Status PutRecord(const std::string& kind, const std::string& key, const std::string& json);
  // Deletes the records of `kind` whose key is `key` or starts with `key` + "/".
  absl::Status DeleteRecords(const std::string& kind, const std::string& key);
  // (key, json) of every record of `kind`, by key.
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ListRecords(
      const std::string& kind);

 private:
  explicit Database(sqlite3* db) : db_(db) {}
  absl::Status Exec(const std::string& sql) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Ends a failed transaction; returns `cause`.
  absl::Status Rollback(absl::Status cause) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<DatasetInfo> GetDatasetLocked(const std::string& name)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Mutex mu_;
  sqlite3* db_ ABSL_GUARDED_BY(mu_);
  int64_t next_upload_ ABSL_GUARDED_BY(mu_) = 1;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_STORE_DATABASE_H_
