// Who is calling and what they may do: authentication (bearer API keys from
// --api_keys, or a verified client certificate's common name), roles per
// method, the caller's tenant (which names it can see), per-tenant quotas
// (--quotas and the --tenant_* defaults), and the audit trail (--audit_log).
// The key and quota files are re-read when they change (checked every
// second) and on SIGHUP (Reload); a file that does not parse keeps the last
// good version and logs why.
//
// Without --api_keys every caller is the implicit `default` tenant with
// every right, as before keys existed.
//
// Thread-safe.
#ifndef TLSERVE_SERVER_API_SECURITY_H_
#define TLSERVE_SERVER_API_SECURITY_H_

#include <grpcpp/server_context.h>
#include <prometheus/collectable.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/api/rpc_timer.h"
#include "server/core/catalog/access.h"
#include "server/core/catalog/usage.h"
#include "server/core/metrics.h"

namespace tlserve {

// What a method needs: kRead, kWrite or kAdmin; kOpen for none.
enum class Access { kOpen, kRead, kWrite, kAdmin };

// The methods of tlserve.v1 (by their short names, as RpcTimer has them):
// the access each needs and whether a call is written to the audit trail
// (state-changing ones and exports). NOT_FOUND for a method not listed.
struct MethodRule {
  Access access;
  bool audited;
};
absl::StatusOr<MethodRule> RuleOf(const std::string& method);

struct Caller {
  std::string tenant = "default";
  Role role = Role::kAdmin;
  std::string label = "anonymous";
  std::string peer;
  // Admins with keys see every tenant's objects; without keys the implicit
  // caller sees the default tenant's only.
  bool all_tenants = false;
  uint64_t lane = 1;  // the engine's and the preprocessing pool's fairness lane

  // The key (server/core/catalog/tenant_key.h) of the object this caller
  // names `name`: its own tenant's; an admin may name another tenant's as
  // TENANT/NAME. INVALID_ARGUMENT naming `field` for a bad name.
  absl::StatusOr<std::string> Qualify(const std::string& name, const char* field) const;
  bool Sees(const std::string& key) const;
  // What the caller sees for a key: the object's name (its tenant is shown
  // in the messages' `tenant` field); admins see TENANT/NAME for other
  // tenants' objects, so that what they list they can name.
  std::string Name(const std::string& key) const;
  // Messages name objects by key: the caller's own tenant prefix goes.
  absl::Status Scrub(const absl::Status& status) const;
};

class Security {
 public:
  struct Options {
    std::string api_keys_file;   // empty: no keys, one implicit tenant
    std::string quotas_file;     // empty: the defaults for every tenant
    std::string audit_log_file;  // empty: audit lines go to the log only
    QuotaLimits defaults;        // from the --tenant_* flags
    bool tls = false;            // for tlserve_security_info
    bool client_certificates = false;
  };
  static absl::StatusOr<std::unique_ptr<Security>> Create(const Options& options, Metrics* metrics);
  ~Security();
  Security(const Security&) = delete;
  Security& operator=(const Security&) = delete;

  Metrics* metrics() const { return metrics_; }
  bool keys() const { return !options_.api_keys_file.empty(); }

  // Authenticates the call and checks its role for the timer's method;
  // the call's audit record (for audited methods and for every denied call)
  // is attached to `timer`. UNAUTHENTICATED for a missing or unknown key,
  // PERMISSION_DENIED for a role without the right. `object` is the name
  // the request is about (for the audit trail).
  absl::StatusOr<Caller> Admit(const grpc::ServerContextBase& context, RpcTimer* timer,
                               const std::string& object = "");

  // Counts `images` against the caller's in-flight images quota until the
  // returned handle goes (RESOURCE_EXHAUSTED over it).
  absl::StatusOr<std::shared_ptr<const void>> AdmitImages(const Caller& caller, int64_t images);
  QuotaLimits QuotasOf(const std::string& tenant) const;
  // The quota's RESOURCE_EXHAUSTED when `use + more > limit` (limit 0: none).
  static absl::Status CheckQuota(const std::string& tenant, const char* quota, int64_t use,
                                 int64_t more, int64_t limit, const char* unit = "");
  // Tenants named in the keys or quotas file (for the tenant metrics).
  std::vector<std::string> KnownTenants() const;
  // Quota checks that count and then write (a model, a job, an upload's
  // commit) hold this for the tenant, so that two racing calls cannot both
  // pass the check.
  absl::Mutex* QuotaLock(const std::string& tenant);

  // What a tenant uses now (the server sets where it is counted; reads the
  // database: not on a gRPC thread).
  using UsageFn = std::function<absl::StatusOr<TenantUsage>(const std::string& tenant)>;
  void SetUsage(UsageFn usage) { usage_ = std::move(usage); }
  absl::StatusOr<TenantUsage> Usage(const std::string& tenant) const { return usage_(tenant); }
  // Replaces the call's audit record with one naming `object` (known only
  // later, e.g. from an upload's first message).
  void AttachAudit(RpcTimer* timer, const Caller& caller, const std::string& object);

  // Every tenant's use of each quota, and the quota where there is one:
  // tlserve_tenant_usage{tenant,quota} and tlserve_tenant_quota{tenant,quota},
  // counted at scrape time (`usage_all` reads the catalogue).
  using UsageAllFn = std::function<absl::StatusOr<std::map<std::string, TenantUsage>>()>;
  std::shared_ptr<prometheus::Collectable> UsageCollector(UsageAllFn usage_all);

  // Re-reads the key and quota files now (SIGHUP).
  void Reload();
  // With keys, one tenant may hold at most `limit` of the server's `what`
  // ("uploads", "exports") at once until the returned handle goes;
  // RESOURCE_EXHAUSTED beyond. Without keys: no limit here.
  absl::StatusOr<std::shared_ptr<const void>> AdmitSlot(const Caller& caller, const char* what,
                                                        int limit);

  // Denied calls written to the audit trail per second at most; the rest
  // are counted in one line.
  static constexpr int kDeniedLinesPerSecond = 100;
  // One audit line (JSON) to the log and to --audit_log.
  void Audit(const Caller& caller, const std::string& method, const std::string& object,
             const absl::Status& outcome);

 private:
  Security(const Options& options, Metrics* metrics);
  void ReloadIfChanged(bool force);
  // Re-reads `path` (the flag --`name`) when its stamp changed, or `force`:
  // `parse(text)` makes the new value, which replaces `*current`; a failure
  // keeps the old one, logged and counted (tlserve_config_reloads_total).
  template <typename T, typename Parse, typename Describe>
  void ReloadFile(const char* name, const std::string& path, std::string* stamp,
                  std::shared_ptr<const T>* current, bool force, Parse parse, Describe describe);
  void Watch();

  const Options options_;
  Metrics* metrics_;
  UsageFn usage_ = [](const std::string&) { return TenantUsage{}; };
  mutable absl::Mutex mu_;
  std::shared_ptr<const ApiKeys> keys_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const QuotaTable> quotas_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> inflight_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::unique_ptr<absl::Mutex>> quota_locks_ ABSL_GUARDED_BY(mu_);
  // What the watcher last read: (mtime ns, size, inode) of each file.
  std::string keys_stamp_ ABSL_GUARDED_BY(mu_);
  std::string quotas_stamp_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> slots_ ABSL_GUARDED_BY(mu_);  // "what/tenant" -> in use
  void WriteAudit(const std::string& line);
  absl::Mutex audit_mu_;
  FILE* audit_file_ ABSL_GUARDED_BY(audit_mu_) = nullptr;
  absl::Time denied_window_ ABSL_GUARDED_BY(audit_mu_) = absl::InfinitePast();
  int denied_in_window_ ABSL_GUARDED_BY(audit_mu_) = 0;
  int64_t denied_suppressed_ ABSL_GUARDED_BY(audit_mu_) = 0;
  absl::Mutex stop_mu_;
  bool stopping_ ABSL_GUARDED_BY(stop_mu_) = false;
  std::thread watcher_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_SECURITY_H_
