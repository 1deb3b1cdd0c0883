#include "server/api/security.h"

#include <grpcpp/security/auth_context.h>
#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "server/core/catalog/tenant_key.h"
#include "server/core/contain.h"
#include "server/core/datasets.h"
#include "server/core/log.h"

namespace tlserve {
namespace {

// Every method of tlserve.v1 and of the Open Inference Protocol's service
// (tests/integration/security_test.cc checks
// that the services have no other).
const std::map<std::string, MethodRule>& Rules() {
  static const auto* rules = new std::map<std::string, MethodRule>{
      {"DescribeBackbone", {Access::kRead, false}},
      {"Embed", {Access::kRead, false}},
      {"StreamEmbed", {Access::kRead, false}},
      {"UploadDataset", {Access::kWrite, true}},
      {"ListDatasets", {Access::kRead, false}},
      {"GetDataset", {Access::kRead, false}},
      {"DeleteDataset", {Access::kWrite, true}},
      {"CreateModel", {Access::kWrite, true}},
      {"GetModel", {Access::kRead, false}},
      {"ListModels", {Access::kRead, false}},
      {"DeleteModel", {Access::kWrite, true}},
      {"UnfreezeLayers", {Access::kWrite, true}},
      {"FreezeLayers", {Access::kWrite, true}},
      {"StartTraining", {Access::kWrite, true}},
      {"WatchJob", {Access::kRead, false}},
      {"GetJob", {Access::kRead, false}},
      {"ListJobs", {Access::kRead, false}},
      {"CancelJob", {Access::kWrite, true}},
      {"Classify", {Access::kRead, false}},
      {"StreamClassify", {Access::kRead, false}},
      // An export hands out the model's weights: write, and audited.
      {"ExportModel", {Access::kWrite, true}},
      // Evaluation and suggestions only read, but spend the device a while.
      {"Evaluate", {Access::kRead, false}},
      {"SuggestLabels", {Access::kRead, false}},
      // Which version answers, and when it says "unknown": changes, audited.
      {"SetServedVersion", {Access::kWrite, true}},
      {"SetThresholds", {Access::kWrite, true}},
      // inference.GRPCInferenceService (the Open Inference Protocol): reads.
      {"ServerLive", {Access::kRead, false}},
      {"ServerReady", {Access::kRead, false}},
      {"ModelReady", {Access::kRead, false}},
      {"ServerMetadata", {Access::kRead, false}},
      {"ModelMetadata", {Access::kRead, false}},
      {"ModelInfer", {Access::kRead, false}},
  };
  return *rules;
}

std::string Stamp(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return "missing";
  return absl::StrCat(st.st_mtim.tv_sec, ".", st.st_mtim.tv_nsec, "/", st.st_size, "/", st.st_ino);
}

absl::StatusOr<std::string> ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

bool Allows(Role role, Access access) {
  switch (access) {
    case Access::kOpen:
    case Access::kRead:
      return true;
    case Access::kWrite:
      return role == Role::kWrite || role == Role::kAdmin;
    case Access::kAdmin:
      return role == Role::kAdmin;
  }
  return false;
}

const char* AccessName(Access a) {
  switch (a) {
    case Access::kOpen:
      return "none";
    case Access::kRead:
      return "read";
    case Access::kWrite:
      return "write";
    case Access::kAdmin:
      return "admin";
  }
  return "?";
}

}  // namespace

absl::StatusOr<MethodRule> RuleOf(const std::string& method) {
  auto it = Rules().find(method);
  if (it == Rules().end()) {
    return absl::NotFoundError(absl::StrCat("method ", method, " has no access rule"));
  }
  return it->second;
}

absl::StatusOr<std::string> Caller::Qualify(const std::string& name, const char* field) const {
  if (all_tenants) {
    if (const auto slash = name.find('/'); slash != std::string::npos) {
      const std::string tenant = name.substr(0, slash);
      const std::string rest = name.substr(slash + 1);
      if (absl::Status s = ValidateTenant(tenant); !s.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(field, ": ", s.message()));
      }
      if (rest.find(':') != std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat(
            field, " \"", Bounded(name), "\": name another tenant's object TENANT/NAME"));
      }
      if (absl::Status s = DatasetCatalog::ValidateName(rest, field); !s.ok()) return s;
      return TenantKey(tenant, rest);
    }
  }
  // A plain name: ':' would make it a key of another tenant.
  std::string plain = name;
  std::replace(plain.begin(), plain.end(), ':', '?');
  if (absl::Status s = DatasetCatalog::ValidateName(plain, field); !s.ok()) {
    return absl::Status(s.code(), absl::StrReplaceAll(s.message(), {{plain, name}}));
  }
  return TenantKey(tenant, name);
}

bool Caller::Sees(const std::string& key) const { return all_tenants || TenantOf(key) == tenant; }

std::string Caller::Name(const std::string& key) const {
  auto [t, name] = SplitTenantKey(key);
  if (t == tenant) return name;
  return absl::StrCat(t, "/", name);
}

absl::Status Caller::Scrub(const absl::Status& status) const {
  if (status.ok() || tenant == kDefaultTenant) return status;
  return absl::Status(status.code(),
                      absl::StrReplaceAll(status.message(), {{absl::StrCat(tenant, ":"), ""}}));
}

Security::Security(const Options& options, Metrics* metrics)
    : options_(options), metrics_(metrics) {}

absl::StatusOr<std::unique_ptr<Security>> Security::Create(const Options& options,
                                                           Metrics* metrics) {
  std::unique_ptr<Security> s(new Security(options, metrics));
  {
    absl::MutexLock lock(&s->mu_);
    s->keys_ = std::make_shared<const ApiKeys>();
    s->quotas_ = std::make_shared<const QuotaTable>(options.defaults);
  }
  auto load = [](const std::string& path, const char* flag) -> absl::StatusOr<std::string> {
    auto text = ReadAll(path);
    if (!text.ok()) return absl::InvalidArgumentError(absl::StrCat(flag, ": cannot read ", path));
    return text;
  };
  if (!options.api_keys_file.empty()) {
    auto text = load(options.api_keys_file, "--api_keys");
    if (!text.ok()) return text.status();
    auto keys = ApiKeys::Parse(*text);
    if (!keys.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--api_keys ", options.api_keys_file, ": ", keys.status().message()));
    }
    if (keys->size() == 0) {
      LogWarning("--api_keys %s has no keys: every call will be UNAUTHENTICATED",
                 options.api_keys_file);
    }
    absl::MutexLock lock(&s->mu_);
    s->keys_ = std::make_shared<const ApiKeys>(std::move(*keys));
    s->keys_stamp_ = Stamp(options.api_keys_file);
  }
  if (!options.quotas_file.empty()) {
    auto text = load(options.quotas_file, "--quotas");
    if (!text.ok()) return text.status();
    auto quotas = QuotaTable::Parse(*text, options.defaults);
    if (!quotas.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--quotas ", options.quotas_file, ": ", quotas.status().message()));
    }
    absl::MutexLock lock(&s->mu_);
    s->quotas_ = std::make_shared<const QuotaTable>(std::move(*quotas));
    s->quotas_stamp_ = Stamp(options.quotas_file);
  }
  if (!options.audit_log_file.empty()) {
    FILE* f = std::fopen(options.audit_log_file.c_str(), "ae");
    if (f == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("--audit_log: cannot open ", options.audit_log_file, " for appending"));
    }
    absl::MutexLock lock(&s->audit_mu_);
    s->audit_file_ = f;
  }
  if (!options.api_keys_file.empty() || !options.quotas_file.empty()) {
    s->watcher_ = std::thread([p = s.get()] { p->Watch(); });
  }
  return s;
}

Security::~Security() {
  {
    absl::MutexLock lock(&stop_mu_);
    stopping_ = true;
  }
  if (watcher_.joinable()) watcher_.join();
  absl::MutexLock lock(&audit_mu_);
  if (audit_file_ != nullptr) std::fclose(audit_file_);
}

void Security::Watch() {
  absl::MutexLock lock(&stop_mu_);
  while (!stopping_) {
    stop_mu_.AwaitWithTimeout(absl::Condition(&stopping_), absl::Seconds(1));
    if (stopping_) break;
    stop_mu_.Unlock();
    ReloadIfChanged(false);
    stop_mu_.Lock();
  }
}

void Security::Reload() { ReloadIfChanged(true); }

template <typename T, typename Parse, typename Describe>
void Security::ReloadFile(const char* name, const std::string& path, std::string* stamp,
                          std::shared_ptr<const T>* current, bool force, Parse parse,
                          Describe describe) {
  if (path.empty()) return;
  const std::string now = Stamp(path);
  {
    absl::MutexLock lock(&mu_);
    if (!force && now == *stamp) return;
    *stamp = now;
  }
  auto text = ReadAll(path);
  absl::StatusOr<T> value = text.ok() ? parse(*text) : absl::StatusOr<T>(text.status());
  metrics_->RecordConfigReload(name, value.ok());
  if (!value.ok()) {
    LogError("--%s %s: %s; keeping what was read before", name, path, value.status().ToString());
    return;
  }
  LogInfo("--%s %s re-read: %s", name, path, describe(*value));
  absl::MutexLock lock(&mu_);
  *current = std::make_shared<const T>(std::move(*value));
}

void Security::ReloadIfChanged(bool force) {
  ReloadFile(
      "api_keys", options_.api_keys_file, &keys_stamp_, &keys_, force,
      [](const std::string& text) -> absl::StatusOr<ApiKeys> {
        auto keys = ApiKeys::Parse(text);
        if (keys.ok() && keys->size() == 0) {
          // An empty file is more likely a write caught half-way than a wish
          // to lock every caller out (stop the server for that).
          return absl::FailedPreconditionError("the file has no keys");
        }
        return keys;
      },
      [](const ApiKeys& keys) { return absl::StrCat(keys.size(), " keys"); });
  ReloadFile(
      "quotas", options_.quotas_file, &quotas_stamp_, &quotas_, force,
      [this](const std::string& text) { return QuotaTable::Parse(text, options_.defaults); },
      [](const QuotaTable& quotas) {
        return absl::StrCat(quotas.overrides().size(), " tenants with their own quotas");
      });
}

absl::StatusOr<Caller> Security::Admit(const grpc::ServerContextBase& context, RpcTimer* timer,
                                       const std::string& object) {
  Caller caller;
  caller.peer = context.peer();
  const std::string method = timer->method();
  auto rule = RuleOf(method);
  // A method without a rule is a bug: closed, not open.
  const MethodRule r = rule.ok() ? *rule : MethodRule{Access::kAdmin, true};
  auto audit = [this, method, object](const Caller& c) {
    return [this, c, method, object](const absl::Status& s) { Audit(c, method, object, s); };
  };
  if (!keys()) {
    caller.lane = std::hash<std::string>{}(caller.peer) | 1;  // by connection
    if (r.audited) timer->OnDone(audit(caller));
    return caller;
  }
  std::shared_ptr<const ApiKeys> keys;
  {
    absl::MutexLock lock(&mu_);
    keys = keys_;
  }
  std::optional<Principal> who;
  const auto& md = context.client_metadata();
  auto it = md.find("authorization");
  if (it != md.end()) {
    const absl::string_view value(it->second.data(), it->second.size());
    constexpr absl::string_view kBearer = "Bearer ";
    if (absl::StartsWith(value, kBearer)) who = keys->FindKey(value.substr(kBearer.size()));
  } else if (options_.client_certificates && context.auth_context() != nullptr) {
    // Only a certificate the TLS handshake verified gets here.
    for (const auto& cn : context.auth_context()->FindPropertyValues("x509_common_name")) {
      who = keys->FindCommonName(absl::string_view(cn.data(), cn.size()));
      if (who) break;
    }
  }
  caller.label = "(none)";
  caller.role = Role::kRead;
  caller.tenant = "(unknown)";
  if (!who) {
    const absl::Status denied = absl::UnauthenticatedError(
        it == md.end()
            ? "this server needs an API key: send the metadata `authorization: Bearer KEY`"
            : "the API key is not known to this server (or is not `Bearer KEY`)");
    timer->OnDone(audit(caller));
    return denied;
  }
  caller.tenant = who->tenant;
  caller.role = who->role;
  caller.label = who->label;
  caller.all_tenants = who->role == Role::kAdmin;
  caller.lane = std::hash<std::string>{}(absl::StrCat("tenant:", caller.tenant)) | 1;
  if (!Allows(caller.role, r.access)) {
    timer->OnDone(audit(caller));
    return absl::PermissionDeniedError(absl::StrCat(method, " needs a ", AccessName(r.access),
                                                    " key; key \"", caller.label, "\" is ",
                                                    RoleName(caller.role)));
  }
  if (r.audited) timer->OnDone(audit(caller));
  return caller;
}

void Security::AttachAudit(RpcTimer* timer, const Caller& caller, const std::string& object) {
  timer->OnDone([this, caller, method = timer->method(), object](const absl::Status& s) {
    Audit(caller, method, object, s);
  });
}

void Security::Audit(const Caller& caller, const std::string& method, const std::string& object,
                     const absl::Status& outcome) {
  const bool denied = outcome.code() == absl::StatusCode::kUnauthenticated ||
                      outcome.code() == absl::StatusCode::kPermissionDenied;
  int64_t suppressed = 0;
  {
    // A flood of denied calls costs a client nothing: at most
    // kDeniedLinesPerSecond lines a second, then one line that counts the
    // rest (written with the next audit line after the second).
    absl::MutexLock lock(&audit_mu_);
    const absl::Time now = absl::Now();
    if (now - denied_window_ >= absl::Seconds(1)) {
      suppressed = denied_suppressed_;
      denied_suppressed_ = 0;
      denied_in_window_ = 0;
      denied_window_ = now;
    }
    if (denied && ++denied_in_window_ > kDeniedLinesPerSecond) {
      ++denied_suppressed_;
      return;
    }
  }
  if (suppressed > 0) {
    LogWarning("audit: %d more denied calls in the last second were not written",
               static_cast<int>(suppressed));
    WriteAudit(nlohmann::json{
        {"time", absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone())},
        {"suppressed_denied_calls", suppressed}}
                   .dump());
  }
  nlohmann::json line = {
      {"time", absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone())},
      {"tenant", caller.tenant},
      {"key", caller.label},
      {"peer", caller.peer},
      {"method", method},
      {"object", Bounded(object, 256)},
      {"outcome", outcome.ok() ? std::string("OK") : absl::StatusCodeToString(outcome.code())},
  };
  if (!outcome.ok()) line["message"] = std::string(outcome.message().substr(0, 300));
  const std::string text = line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  LogInfo("audit %s", text);
  WriteAudit(text);
}

void Security::WriteAudit(const std::string& line) {
  absl::MutexLock lock(&audit_mu_);
  if (audit_file_ != nullptr) {
    std::fputs((line + "\n").c_str(), audit_file_);
    std::fflush(audit_file_);
  }
}

absl::StatusOr<std::shared_ptr<const void>> Security::AdmitSlot(const Caller& caller,
                                                                const char* what, int limit) {
  if (!keys() || limit <= 0) return std::shared_ptr<const void>();
  const std::string key = absl::StrCat(what, "/", caller.tenant);
  {
    absl::MutexLock lock(&mu_);
    int64_t& use = slots_[key];
    if (use >= limit) {
      return absl::ResourceExhaustedError(
          absl::StrCat("tenant ", caller.tenant, " has ", use, " ", what,
                       " in progress, its most at once (half the server's); retry when one ends"));
    }
    ++use;
  }
  struct Slot {
    Security* security;
    std::string key;
    ~Slot() {
      absl::MutexLock lock(&security->mu_);
      --security->slots_[key];
    }
  };
  return std::shared_ptr<const void>(new Slot{this, key});
}

QuotaLimits Security::QuotasOf(const std::string& tenant) const {
  absl::MutexLock lock(&mu_);
  return quotas_->For(tenant);
}

std::vector<std::string> Security::KnownTenants() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> out;
  for (const auto& [t, q] : quotas_->overrides()) out.push_back(t);
  return out;
}

absl::Mutex* Security::QuotaLock(const std::string& tenant) {
  absl::MutexLock lock(&mu_);
  auto& m = quota_locks_[tenant];
  if (m == nullptr) m = std::make_unique<absl::Mutex>();
  return m.get();
}

absl::Status Security::CheckQuota(const std::string& tenant, const char* quota, int64_t use,
                                  int64_t more, int64_t limit, const char* unit) {
  if (limit <= 0 || use + more <= limit) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      "quota ", quota, " of tenant ", tenant, " is full: ", use, unit, " in use + ", more, unit,
      " asked > ", limit, unit, " (--tenant_", quota, " or the --quotas file)"));
}

absl::StatusOr<std::shared_ptr<const void>> Security::AdmitImages(const Caller& caller,
                                                                  int64_t images) {
  const int64_t limit = QuotasOf(caller.tenant).inflight_images;
  {
    absl::MutexLock lock(&mu_);
    int64_t& use = inflight_[caller.tenant];
    if (absl::Status s = CheckQuota(caller.tenant, "inflight_images", use, images, limit);
        !s.ok()) {
      return s;
    }
    use += images;
  }
  struct Lease {
    Security* security;
    std::string tenant;
    int64_t images;
    ~Lease() {
      absl::MutexLock lock(&security->mu_);
      security->inflight_[tenant] -= images;
    }
  };
  return std::shared_ptr<const void>(new Lease{this, caller.tenant, images});
}

}  // namespace tlserve
