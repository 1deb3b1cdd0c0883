#include "server/store/job_queue.h"

#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "server/core/catalog/tenant_key.h"
#include "server/core/log.h"

namespace tlserve {

absl::StatusOr<int> QueueUnfinishedJobs(Database& db) {
  auto records = db.ListRecords("job");
  if (!records.ok()) return records.status();
  auto queued = db.ListQueuedJobs();
  if (!queued.ok()) return queued.status();
  std::set<std::string> in_queue;
  for (const Database::QueuedJob& q : *queued) in_queue.insert(q.id);
  int added = 0;
  for (const auto& [id, json] : *records) {
    if (in_queue.count(id) > 0) continue;
    const auto j = nlohmann::json::parse(json, nullptr, false);
    // The record's states (server/core/jobs.h): 0 queued, 1 running.
    const int state = j.is_object() && j.contains("state") && j["state"].is_number_integer()
                          ? j["state"].get<int>()
                          : -1;
    if (state != 0 && state != 1) continue;  // ended, or unreadable (skipped where it is read)
    Database::QueuedJob job;
    job.id = id;
    job.model = j.contains("model") && j["model"].is_string() ? j["model"].get<std::string>() : "";
    job.tenant = TenantOf(job.model);
    job.claims = state == 1 ? 1 : 0;
    absl::Status s = db.QueueJob(job, json);
    if (s.code() == absl::StatusCode::kAlreadyExists) {
      LogError("job %s: left out of the queue: %s", id, s.message());
      continue;
    }
    if (!s.ok()) return s;
    ++added;
  }
  return added;
}

}  // namespace tlserve
