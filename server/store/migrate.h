// Copies one store into another, verified: what `tlserve migrate` runs to
// move a single-node deployment (SQLite and files in its data directory)
// into a PostgreSQL database that several replicas share.
#ifndef TLSERVE_SERVER_STORE_MIGRATE_H_
#define TLSERVE_SERVER_STORE_MIGRATE_H_

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "server/store/database.h"

namespace tlserve {

// The blob folders the server writes: versions' weights
// ("models/NAME/vN.PART.pt", server/core/models.cc) and running jobs'
// checkpoints ("checkpoints/ID.ckpt", server/core/jobs.cc).
inline constexpr const char* kBlobFolders[] = {"models", "checkpoints"};

struct MigrationReport {
  int64_t datasets = 0;
  int64_t examples = 0;       // images, labelled or not
  int64_t example_bytes = 0;  // their encoded bytes
  int64_t records = 0;        // models (with their versions), jobs, ...
  int64_t blobs = 0;
  int64_t blob_bytes = 0;
  int64_t queued_jobs = 0;  // unfinished jobs, queued in the copy to resume
};

// Copies every dataset (each image with its name, label and split hash, in
// order), every record and every blob of the folders above from `from` into
// `to`, then reads all of it back from `to` and compares: the datasets'
// counts, the examples' names, labels and hashes, and the SHA-256 of every
// image and every blob; the records byte for byte. `to` must be empty
// (FAILED_PRECONDITION otherwise: a failed copy leaves a partial one, so a
// new try needs a new, empty database). DATA_LOSS when the read-back
// differs. `progress` is told what is being copied, a line at a time.
// Datasets get the copy's time as their creation time. Unfinished jobs are
// queued in `to` (QueueUnfinishedJobs). Nothing else may write `from`
// meanwhile (`tlserve migrate` holds the data directory's lock), and no
// replica may start on `to` (it holds Database::LockForCopy until the copy
// goes: a replica started early would resume half-copied jobs).
absl::StatusOr<MigrationReport> CopyStore(Database& from, Database& to,
                                          const std::function<void(const std::string&)>& progress);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_STORE_MIGRATE_H_
