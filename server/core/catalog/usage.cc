#include "server/core/catalog/usage.h"

#include "server/core/catalog/tenant_key.h"

namespace tlserve {

absl::StatusOr<std::map<std::string, TenantUsage>> UsageByTenant(const DatasetCatalog& datasets,
                                                                 const ModelRegistry& models,
                                                                 const JobRunner& jobs) {
  std::map<std::string, TenantUsage> out;
  auto list = datasets.List();
  if (!list.ok()) return list.status();
  for (const auto& d : *list) {
    TenantUsage& u = out[TenantOf(d.name)];
    ++u.datasets;
    u.images += d.images;
    u.storage_bytes += d.bytes;
  }
  for (const auto& m : models.List()) {
    TenantUsage& u = out[TenantOf(m.name)];
    ++u.models;
    const int64_t params = ModelParams(m);
    u.private_params += params;
    // Every version's weights are kept on disk (fp32): its private stages
    // and its own head (a sweep may have chosen a larger one).
    for (const VersionInfo& v : m.versions) {
      const int64_t head = v.head_params > 0 ? v.head_params : m.head_params;
      u.storage_bytes += (params - m.head_params + head) * 4;
    }
  }
  for (const auto& j : jobs.List("")) {
    if (j.state == JobRecord::State::kQueued || j.state == JobRecord::State::kRunning) {
      ++out[TenantOf(j.model)].jobs;
    }
  }
  return out;
}

int64_t ModelParams(const ModelInfo& model) {
  int64_t params = model.head_params;
  for (const auto& st : model.stages) {
    if (st.is_private) params += st.params;
  }
  return params;
}

absl::StatusOr<TenantUsage> UsageOf(const std::string& tenant, const DatasetCatalog& datasets,
                                    const ModelRegistry& models, const JobRunner& jobs) {
  auto all = UsageByTenant(datasets, models, jobs);
  if (!all.ok()) return all.status();
  auto it = all->find(tenant);
  return it == all->end() ? TenantUsage{} : it->second;
}

}  // namespace tlserve
