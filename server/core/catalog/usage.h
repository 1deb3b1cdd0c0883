// What each tenant uses of what its quotas limit, counted from the
// catalogue as it is (datasets, models, jobs): nothing to keep in step.
#ifndef TLSERVE_SERVER_CORE_CATALOG_USAGE_H_
#define TLSERVE_SERVER_CORE_CATALOG_USAGE_H_

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "server/core/datasets.h"
#include "server/core/jobs.h"
#include "server/core/models.h"

namespace tlserve {

struct TenantUsage {
  int64_t storage_bytes = 0;  // encoded images in its datasets
  int64_t datasets = 0;
  int64_t images = 0;
  int64_t models = 0;
  int64_t private_params = 0;  // its models' private stages
  int64_t jobs = 0;            // queued or running
};

// Every tenant with an object. Reads the database (datasets): not on a gRPC thread.
absl::StatusOr<std::map<std::string, TenantUsage>> UsageByTenant(const DatasetCatalog& datasets,
                                                                 const ModelRegistry& models,
                                                                 const JobRunner& jobs);
absl::StatusOr<TenantUsage> UsageOf(const std::string& tenant, const DatasetCatalog& datasets,
                                    const ModelRegistry& models, const JobRunner& jobs);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_CATALOG_USAGE_H_
