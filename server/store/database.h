// The server's durable catalogue behind one interface, with two
// implementations: SQLite (one file under the data directory: the embedded
// default, server/store/sqlite_database.h) and PostgreSQL (a database shared
// by several replicas, server/store/postgres_database.h). It holds datasets
// and their examples (the encoded image bytes themselves), and small JSON
// records: models, versions, jobs, and the job queue. Every mutating method is one transaction,
// committed — on disk — before it returns OK; on an error nothing of it is
// written. Errors keep the engine's cause: RESOURCE_EXHAUSTED for a full
// disk, UNAVAILABLE for busy or an unreachable server, DATA_LOSS for a
// corrupt file, INTERNAL otherwise.
//
// Thread-safe.
#ifndef TLSERVE_SERVER_STORE_DATABASE_H_
#define TLSERVE_SERVER_STORE_DATABASE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

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
  // `location` is a file path (SQLite; created if missing) or a libpq
  // connection URI starting "postgresql://" or "postgres://" (PostgreSQL;
  // the database must exist, its schema is created or brought up to date).
  static absl::StatusOr<std::unique_ptr<Database>> Open(const std::string& location);
  // Whether `location` names a PostgreSQL database rather than a file.
  static bool IsPostgresUri(const std::string& location);

  virtual ~Database() = default;
  Database() = default;
  Database(const Database&) = delete;
  Database& operator=(const Database&) = delete;

  // "sqlite" or "postgresql".
  virtual const char* kind() const = 0;

  // Uploads are staged in bounded chunks (invisible to every reader) and
  // moved into their dataset in one transaction at commit, when the quota is
  // checked; an upload that is aborted, or left by a crash, stores nothing.
  virtual int64_t BeginUpload() = 0;
  virtual absl::Status StageExamples(int64_t upload,
                                     const std::vector<StoredExample>& examples) = 0;
  // The number of examples added; RESOURCE_EXHAUSTED (nothing stored) over
  // the quota.
  virtual absl::StatusOr<int64_t> CommitUpload(int64_t upload, const std::string& dataset,
                                               const UploadQuota& quota) = 0;
  virtual void AbortUpload(int64_t upload) = 0;

  // NOT_FOUND for an unknown name.
  virtual absl::StatusOr<DatasetInfo> GetDataset(const std::string& name) = 0;
  virtual absl::StatusOr<std::vector<DatasetInfo>> ListDatasets() = 0;
  // Examples in insertion order (bytes included). NOT_FOUND for an unknown name.
  virtual absl::StatusOr<std::vector<StoredExample>> LoadExamples(const std::string& dataset) = 0;
  // The same without the image bytes (`bytes` empty): what a training job
  // plans with. Jobs read the bytes a batch at a time with ReadExampleBytes.
  virtual absl::StatusOr<std::vector<StoredExample>> ListExamples(const std::string& dataset) = 0;
  // The encoded bytes of examples by id, in the order given; NOT_FOUND when
  // one no longer exists.
  virtual absl::StatusOr<std::vector<std::string>> ReadExampleBytes(
      const std::vector<int64_t>& ids) = 0;
  virtual absl::Status DeleteDataset(const std::string& name) = 0;

  // Bytes inside the database's local file that will be reused before it
  // grows (free pages, e.g. of deleted datasets): free space for the disk
  // budget. 0 for a database on another machine.
  virtual int64_t ReusableBytes() = 0;

  // Small JSON documents by kind ("model", "version", "job") and key, for
  // the catalogue of models, their versions and the job history.
  virtual absl::Status PutRecord(const std::string& kind, const std::string& key,
                                 const std::string& json) = 0;
  // Writes a record that must not exist yet: ALREADY_EXISTS (nothing
  // written) when it does — also when another replica wrote it first.
  virtual absl::Status CreateRecord(const std::string& kind, const std::string& key,
                                    const std::string& json) = 0;
  // The record's JSON; NOT_FOUND when there is none.
  virtual absl::StatusOr<std::string> GetRecord(const std::string& kind,
                                                const std::string& key) = 0;
  // Deletes the records of `kind` whose key is `key` or starts with `key` + "/".
  virtual absl::Status DeleteRecords(const std::string& kind, const std::string& key) = 0;
  // (key, json) of every record of `kind`, by key.
  virtual absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ListRecords(
      const std::string& kind) = 0;
  // Every kind that has at least one record, sorted (to copy a whole store).
  virtual absl::StatusOr<std::vector<std::string>> ListRecordKinds() = 0;

  // Named binary objects too big for a record: a version's weights
  // ("models/NAME/vN.PART.pt") and a running job's checkpoint
  // ("checkpoints/ID.ckpt"). Names are relative paths of letters, digits and
  // "._-:" separated by "/" (INVALID_ARGUMENT otherwise). SQLite keeps each as
  // a file of that name beside the database file (written to a temporary
  // file, fsync'd and renamed into place); PostgreSQL as a row of its blobs
  // table, so that every replica reads it. Durable when PutBlob returns OK.
  // GetBlob is NOT_FOUND for a name never written or deleted; deleting a
  // missing name is OK.
  virtual absl::Status PutBlob(const std::string& name, absl::string_view bytes) = 0;
  virtual absl::StatusOr<std::string> GetBlob(const std::string& name) = 0;
  virtual absl::Status DeleteBlob(const std::string& name) = 0;
  // The names of the blobs under the folder `prefix` (a valid blob name such
  // as "models"; INVALID_ARGUMENT otherwise), sorted bytewise. SQLite skips
  // what is not a blob: temporary files that a crash left ("*.tmp").
  virtual absl::StatusOr<std::vector<std::string>> ListBlobs(const std::string& prefix) = 0;

  // Calls `changed(kind, key)` after each committed change of a record by
  // anyone (another replica included), on a thread of the database's own, in
  // commit order; `changed("", "")` when changes may have been missed (the
  // connection was lost and is back): re-read everything. SQLite has no other
  // writer and never calls it. Subscribe returns a token for Unsubscribe,
  // which stops the calls (and waits for one under way) before the
  // subscriber goes; a callback must not (un)subscribe.
  using RecordChanged = std::function<void(const std::string& kind, const std::string& key)>;
  virtual int Subscribe(RecordChanged changed) {
    (void)changed;
    return 0;
  }
  virtual void Unsubscribe(int token) { (void)token; }

  // The job queue: a row per unfinished job, beside its record ("job"). A
  // replica that runs jobs claims one (ClaimJob) and holds it by a lease it
  // renews (RenewJobLeases); a job whose lease ran out — its replica died or
  // lost the database — is claimed again by another, which resumes it. Every
  // write of a claimed job's record is fenced by its lease: only the replica
  // holding it writes (ABORTED otherwise).
  struct QueuedJob {
    std::string id, model, tenant;
    std::string owner;  // the replica that holds its lease (empty: none)
    int claims = 0;     // how many times it was claimed before
  };
  // Writes the job's record and queues it, in one transaction.
  // ALREADY_EXISTS (nothing written) when the model has an unfinished job,
  // the message naming it.
  virtual absl::Status QueueJob(const QueuedJob& job, const std::string& record) = 0;
  // Every queued job, oldest first.
  virtual absl::StatusOr<std::vector<QueuedJob>> ListQueuedJobs() = 0;
  // Claims one job for `owner` with a lease of `lease`: among those nobody
  // holds (never claimed, released, or their lease ran out; in SQLite also
  // those of any other owner, a process that died: one process owns the
  // file), oldest first, the one `pick` chooses (an index into what it is
  // given). nullopt when there is none. Replicas claiming at once never get
  // the same job (PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED). The job
  // comes back with `claims` as it was before this claim.
  using PickJob = std::function<size_t(const std::vector<QueuedJob>&)>;
  virtual absl::StatusOr<std::optional<QueuedJob>> ClaimJob(const std::string& owner,
                                                            absl::Duration lease,
                                                            const PickJob& pick) = 0;
  // Extends the leases of `ids` that `owner` still holds; returns those
  // (the others were lost: claimed again by another replica, or ended).
  virtual absl::StatusOr<std::vector<std::string>> RenewJobLeases(
      const std::string& owner, absl::Duration lease, const std::vector<std::string>& ids) = 0;
  // Writes a claimed job's record while `owner` holds its lease; ABORTED
  // (nothing written) when it does not. `end`: kKeep (the job goes on),
  // kRelease (it stops unfinished: the lease is given up so that any
  // replica resumes it at once), kFinish (it ended: out of the queue, the
  // model free for its next job). An empty `record` only changes the queue.
  enum class JobEnd { kKeep, kRelease, kFinish };
  virtual absl::Status PutClaimedJob(const std::string& id, const std::string& owner,
                                     const std::string& record, JobEnd end) = 0;
  // Ends a job nobody holds (as ClaimJob would find it, `owner` being the
  // caller) with `record`, out of the queue: true; false (nothing written)
  // when a replica holds it or it is not queued.
  virtual absl::StatusOr<bool> EndUnclaimedJob(const std::string& id, const std::string& owner,
                                               const std::string& record) = 0;

  // PostgreSQL: every replica holds a shared lock on the database for as
  // long as it runs (on a connection of its own, kept open; a replica that
  // dies, kill -9 included, loses it once its server sees the connection
  // closed), and `tlserve migrate` takes it exclusively while it copies.
  // AttachReplica: FAILED_PRECONDITION while a copy holds it. LockForCopy:
  // false while a replica holds it. SQLite: the data directory's own lock
  // does this; both succeed.
  virtual absl::Status AttachReplica() { return absl::OkStatus(); }
  virtual absl::StatusOr<bool> LockForCopy() { return true; }

  // INVALID_ARGUMENT unless `name` is a blob name as above.
  static absl::Status ValidateBlobName(const std::string& name);
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_STORE_DATABASE_H_
