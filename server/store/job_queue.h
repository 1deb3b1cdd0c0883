// The job queue's rows from the job records: what a store written before the
// queue existed (or copied by `tlserve migrate`) needs so that its
// unfinished jobs are claimed and resumed (Database::QueueJob).
#ifndef TLSERVE_SERVER_STORE_JOB_QUEUE_H_
#define TLSERVE_SERVER_STORE_JOB_QUEUE_H_

#include "absl/status/statusor.h"
#include "server/store/database.h"

namespace tlserve {

// Queues every unfinished job ("job" records in state queued or running)
// that has no row in the queue yet: a running one as claimed once before (it
// was interrupted), a queued one as never claimed. Returns how many it
// queued. Only while no replica runs jobs on `db` (a SQLite store's own
// process at start, a copy's destination): a job that ends meanwhile would
// be queued again.
absl::StatusOr<int> QueueUnfinishedJobs(Database& db);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_STORE_JOB_QUEUE_H_
