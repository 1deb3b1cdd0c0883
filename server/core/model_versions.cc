// Which version of a model is served, and each version's confidence
// thresholds: choices users make after training (models.cc has the rest of
// ModelRegistry). Both are durable before they are visible, and both swap an
// immutable ServableVersion in, so an in-flight Classify keeps the one it
// started with.
#include <cmath>

#include "absl/strings/str_cat.h"
#include "server/core/models.h"

namespace tlserve {

absl::StatusOr<ModelInfo> ModelRegistry::Serve(const std::string& name, int version) {
  CatchUp(name);
  absl::MutexLock write(&write_mu_);
  ModelInfo next;
  std::shared_ptr<const ServableVersion> loaded;
  {
    absl::MutexLock lock(&mu_);
    auto entry = Idle(name, "choose the served version after the job");
    if (!entry.ok()) return entry.status();
    if (!(*entry)->info.problem.ok()) return (*entry)->info.problem;
    next = (*entry)->info;
    if (auto it = (*entry)->loaded.find(version); it != (*entry)->loaded.end()) loaded = it->second;
  }
  bool exists = false;
  for (const auto& v : next.versions) exists = exists || v.version == version;
  if (!exists) {
    return absl::NotFoundError(absl::StrCat("model \"", name, "\" has no version ", version,
                                            "; GetModel lists its versions"));
  }
  if (next.served_version == version) return next;
  // The served version is always loaded (Classify never waits for a read):
  // read it first, under no lock that serving takes.
  if (!loaded) {
    auto read = LoadVersion(next, version);
    if (!read.ok()) return read.status();
    loaded = *std::move(read);
  }
  const int previous = next.served_version;
  next.served_version = version;
  if (absl::Status s = Persist(next); !s.ok()) return s;
  Describe(next);
  absl::MutexLock lock(&mu_);
  Entry& e = models_[name];  // not deleted: Delete needs write_mu_
  e.info = next;
  e.loaded[version] = loaded;
  e.last_use.erase(version);
  if (previous > 0 && e.loaded.count(previous)) e.last_use[previous] = ++use_clock_;
  TrimOlder(e);
  return next;
}

absl::StatusOr<ModelInfo> ModelRegistry::SetThresholds(const std::string& name, int version,
                                                       std::vector<float> thresholds) {
  CatchUp(name);
  absl::MutexLock write(&write_mu_);
  ModelInfo next;
  {
    absl::MutexLock lock(&mu_);
    auto entry = Idle(name, "set thresholds after the job");
    if (!entry.ok()) return entry.status();
    if (!(*entry)->info.problem.ok()) return (*entry)->info.problem;
    next = (*entry)->info;
    if (version == 0) version = next.served_version;
  }
  if (version == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("model \"", name, "\" has no trained version yet; train it first"));
  }
  VersionInfo* vi = nullptr;
  for (auto& v : next.versions) vi = v.version == version ? &v : vi;
  if (vi == nullptr) {
    return absl::NotFoundError(absl::StrCat("model \"", name, "\" has no version ", version));
  }
  if (!thresholds.empty() && thresholds.size() != next.classes.size()) {
    return absl::InvalidArgumentError(absl::StrCat("thresholds: ", thresholds.size(),
                                                   " values for ", next.classes.size(),
                                                   " classes; give one per class or none"));
  }
  for (size_t i = 0; i < thresholds.size(); ++i) {
    if (!(thresholds[i] >= 0 && thresholds[i] <= 1)) {
      return absl::InvalidArgumentError(absl::StrCat("thresholds[", i, "] (class \"",
                                                     next.classes[i], "\") = ", thresholds[i],
                                                     " is not a probability in [0, 1]"));
    }
  }
  vi->calibration.thresholds = std::move(thresholds);
  const Calibration calibration = vi->calibration;
  if (absl::Status s = Persist(next); !s.ok()) return s;
  Describe(next);
  absl::MutexLock lock(&mu_);
  Entry& e = models_[name];  // not deleted: Delete needs write_mu_
  e.info = next;
  // The copy loaded now (not the one seen before the write: the loader may
  // have installed one meanwhile) gets the new thresholds, with the same
  // modules; one not loaded reads them with its record when it is.
  if (auto it = e.loaded.find(version); it != e.loaded.end()) {
    const auto& now = it->second;
    it->second = std::make_shared<const ServableVersion>(now->model, now->version, now->classes,
                                                         now->plan, calibration);
  }
  return next;
}

}  // namespace tlserve
