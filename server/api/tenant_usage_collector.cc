// tlserve_tenant_usage and tlserve_tenant_quota: each tenant's use of each
// quota, and the quota where it has a limit, counted at scrape time.
#include <prometheus/client_metric.h>
#include <prometheus/metric_family.h>

#include "server/api/security.h"

namespace tlserve {
namespace {

class TenantUsageCollector final : public prometheus::Collectable {
 public:
  TenantUsageCollector(const Security* security, Security::UsageAllFn usage_all,
                       std::function<std::map<std::string, int64_t>()> inflight)
      : security_(security), usage_all_(std::move(usage_all)), inflight_(std::move(inflight)) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    prometheus::MetricFamily use, quota;
    use.name = "tlserve_tenant_usage";
    use.help = "What each tenant uses of each quota (storage_mb in bytes).";
    use.type = prometheus::MetricType::Gauge;
    quota.name = "tlserve_tenant_quota";
    quota.help = "Each tenant's quotas that have a limit (storage_mb in bytes).";
    quota.type = prometheus::MetricType::Gauge;
    auto all = usage_all_();
    if (!all.ok()) return {};
    const auto inflight = inflight_();
    for (const auto& [t, n] : inflight) (*all)[t];
    for (const auto& t : security_->KnownTenants()) (*all)[t];
    for (const auto& [tenant, u] : *all) {
      const QuotaLimits q = security_->QuotasOf(tenant);
      auto it = inflight.find(tenant);
      const std::pair<const char*, std::pair<int64_t, int64_t>> rows[] = {
          {"storage_mb", {u.storage_bytes, q.storage_bytes}},
          {"datasets", {u.datasets, q.datasets}},
          {"images", {u.images, q.images}},
          {"models", {u.models, q.models}},
          {"private_params", {u.private_params, q.private_params}},
          {"jobs", {u.jobs, q.jobs}},
          {"inflight_images", {it == inflight.end() ? 0 : it->second, q.inflight_images}},
      };
      for (const auto& [name, v] : rows) {
        prometheus::ClientMetric m;
        m.label = {{"tenant", tenant}, {"quota", name}};
        m.gauge.value = static_cast<double>(v.first);
        use.metric.push_back(m);
        if (v.second > 0) {
          m.gauge.value = static_cast<double>(v.second);
          quota.metric.push_back(m);
        }
      }
    }
    return {use, quota};
  }

 private:
  const Security* security_;
  Security::UsageAllFn usage_all_;
  std::function<std::map<std::string, int64_t>()> inflight_;
};

}  // namespace

std::shared_ptr<prometheus::Collectable> Security::UsageCollector(UsageAllFn usage_all) {
  return std::make_shared<TenantUsageCollector>(this, std::move(usage_all), [this] {
    absl::MutexLock lock(&mu_);
    return inflight_;
  });
}

}  // namespace tlserve
