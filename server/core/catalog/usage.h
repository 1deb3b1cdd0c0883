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
  // Encoded images in its datasets, and the weights of its models' versions.
  int64_t storage_bytes = 0;
  int64_t datasets = 0;
  int64_t images = 0;
  int64_t models = 0;
  int64_t private_params = 0;  // its models' own parameters: private stages and heads
  int64_t jobs = 0;            // queued or running
};

// A model's own parameters (its private stages and its head): what each of
// its versions stores and what it takes on the device.
int64_t ModelParams(const ModelInfo& model);

// Every tenant with an object. Reads the database (datasets): not on a gRPC thread.
absl::StatusOr<std::map<std::string, TenantUsage>> UsageByTenant(const DatasetCatalog& datasets,
                                                                 const ModelRegistry& models,
                                                                 const JobRunner& jobs);
absl::StatusOr<TenantUsage> UsageOf(const std::string& tenant, const DatasetCatalog& datasets,
                                    const ModelRegistry& models, const JobRunner& jobs);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_CATALOG_USAGE_H_
