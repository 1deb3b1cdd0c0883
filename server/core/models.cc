#include "server/core/models.h"

#include <torch/script.h>

#include <ctime>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "server/core/contain.h"
#include "server/core/datasets.h"
#include "server/core/log.h"
#include "server/core/model_json.h"

namespace tlserve {
namespace {

absl::Status NoSuchModel(const std::string& name) {
  return absl::NotFoundError(absl::StrCat("model \"", Bounded(name), "\" does not exist"));
}

// A weights blob that cannot be read: missing is lost data (DATA_LOSS);
// anything else (a database out of reach) keeps its code.
absl::Status ReadError(const absl::Status& read, const std::string& what) {
  return absl::Status(
      read.code() == absl::StatusCode::kNotFound ? absl::StatusCode::kDataLoss : read.code(),
      absl::StrCat(what, read.message()));
}

absl::Status Damaged(const ModelInfo& info) {
  if (info.problem.ok()) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("model \"", info.name, "\" could not be loaded (", info.problem.message(),
                   "); delete it and create it again"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<ModelRegistry>> ModelRegistry::Open(Database* db,
                                                                   const Backbone* backbone,
                                                                   ModelLimits limits,
                                                                   const DiskBudget* disk) {
  std::unique_ptr<ModelRegistry> r(new ModelRegistry(db, backbone, limits, disk));
  auto records = db->ListRecords("model");
  if (!records.ok()) return records.status();
  {
    absl::MutexLock lock(&r->mu_);
    for (const auto& [key, json] : *records) {
      Entry e = r->LoadEntry(key, json);
      e.generation = ++r->generations_;
      r->models_[key] = std::move(e);
    }
  }
  // Other replicas' changes (PostgreSQL): reread the model they touched.
  ModelRegistry* registry = r.get();
  r->subscription_ = db->Subscribe([registry](const std::string& kind, const std::string& key) {
    if (kind.empty()) {
      registry->RefreshAll();
    } else if (kind == "model") {
      registry->Refresh(key);
    }
  });
  return r;
}

ModelRegistry::~ModelRegistry() { db_->Unsubscribe(subscription_); }

ModelRegistry::Entry ModelRegistry::LoadEntry(const std::string& key,
                                              const std::string& json) const {
  Entry e;
  e.info.name = key;
  e.record = json;
  absl::Status loaded = Contain("cannot load model", [&]() -> absl::Status {
    const auto j = nlohmann::json::parse(json, nullptr, false);
    try {
      if (j.is_discarded()) throw std::runtime_error("not JSON");
      e.info = ModelFromJson(j);
    } catch (const std::exception& ex) {
      return absl::DataLossError(
          absl::StrCat("model record \"", key, "\" is corrupt: ", Bounded(ex.what(), 200)));
    }
    if (absl::Status s = ValidateHeadSpec(e.info.head); !s.ok()) {
      return absl::DataLossError(
          absl::StrCat("model record \"", key, "\" has an invalid head: ", s.message()));
    }
    e.info.head_params = ParamCount(MakeHead(e.info.head, dim_, e.info.classes.size()));
    if (e.info.served_version > 0) {
      auto v = LoadVersion(e.info, e.info.served_version);
      if (!v.ok()) return v.status();
      e.loaded[e.info.served_version] = *v;
    }
    return absl::OkStatus();
  });
  if (!loaded.ok()) {
    LogError("model %s is unavailable (the others are served): %s", key, loaded.ToString());
    e.info = ModelInfo();
    e.info.name = key;
    e.info.problem = loaded;
    e.loaded.clear();
  }
  Describe(e.info);
  return e;
}

void ModelRegistry::Refresh(const std::string& name) {
  // Serialised with this replica's own writes: what is installed is what the
  // database holds after them, never an older read.
  absl::MutexLock write(&write_mu_);
  auto json = db_->GetRecord("model", name);
  if (!json.ok() && json.status().code() != absl::StatusCode::kNotFound) {
    LogWarning("cannot reread model %s after a change: %s", name, json.status().ToString());
    return;
  }
  {
    absl::MutexLock lock(&mu_);
    auto it = models_.find(name);
    if (!json.ok()) {  // deleted
      if (it != models_.end() && !it->second.info.training) models_.erase(it);
      return;
    }
    if (it != models_.end() && (it->second.record == *json || it->second.info.training)) return;
  }
  // Read (weights too) outside the lock that serving takes.
  Entry fresh = LoadEntry(name, *json);
  if (!fresh.info.problem.ok() && fresh.info.problem.code() != absl::StatusCode::kDataLoss) {
    // Out of reach for a moment (not damaged): keep what serves now; the
    // next change of the model, or the next reconnection, reads it again.
    LogWarning("cannot reread model %s now: %s", name, fresh.info.problem.ToString());
    return;
  }
  absl::MutexLock lock(&mu_);
  auto it = models_.find(name);
  if (it != models_.end() && it->second.info.training) return;  // began here meanwhile
  if (it != models_.end() && it->second.info.created == fresh.info.created) {
    // The same model, changed: older versions already read stay when the
    // record still has them (with the record's thresholds).
    Entry& e = it->second;
    for (auto& [version, servable] : e.loaded) {
      if (fresh.loaded.count(version)) continue;
      for (const auto& v : fresh.info.versions) {
        if (v.version != version) continue;
        fresh.loaded[version] = v.calibration.thresholds == servable->calibration.thresholds
                                    ? servable
                                    : std::make_shared<const ServableVersion>(
                                          servable->model, servable->version, servable->classes,
                                          servable->plan, v.calibration);
        if (e.last_use.count(version)) fresh.last_use[version] = e.last_use[version];
      }
    }
    fresh.generation = e.generation;
  } else {
    fresh.generation = ++generations_;  // new, or deleted and made again
  }
  models_[name] = std::move(fresh);
  TrimOlder(models_[name]);
}

void ModelRegistry::CatchUp(const std::string& name) const {
  if (subscription_ == 0) return;
  {
    absl::MutexLock lock(&mu_);
    if (models_.count(name) > 0) return;
  }
  // A name that exists nowhere costs one read, and no lock a writer holds.
  if (auto json = db_->GetRecord("model", name);
      !json.ok() && json.status().code() == absl::StatusCode::kNotFound) {
    return;
  }
  // The cache of what the database holds; reading it again changes no state
  // that a caller could tell from the database's.
  const_cast<ModelRegistry*>(this)->Refresh(name);
}

void ModelRegistry::RefreshAll() {
  auto records = db_->ListRecords("model");
  if (!records.ok()) {
    LogWarning("cannot reread the models: %s", records.status().ToString());
    return;
  }
  std::set<std::string> names;
  for (const auto& record : *records) names.insert(record.first);
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [name, e] : models_) names.insert(name);  // deleted ones too
  }
  for (const auto& name : names) Refresh(name);
}

std::string ModelRegistry::WeightsBlob(const std::string& model, int version,
                                       const std::string& part) {
  return absl::StrCat("models/", model, "/v", version, ".", part, ".pt");
}

absl::StatusOr<std::vector<int>> ModelRegistry::StageIndices(
    const std::vector<std::string>& names) const {
  std::vector<int> out;
  for (size_t k = 0; k < names.size(); ++k) {
    auto i = backbone_->EmbeddableStage(names[k]);
    if (!i.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("stages[", k, "]: ", i.status().message()));
    }
    out.push_back(*i);
  }
  if (out.empty()) return absl::InvalidArgumentError("stages: name at least one stage");
  return out;
}

absl::StatusOr<std::vector<std::string>> ModelRegistry::StagesFrom(const std::string& first) const {
  auto i = backbone_->EmbeddableStage(first);
  if (!i.ok()) return absl::InvalidArgumentError(absl::StrCat("from: ", i.status().message()));
  return std::vector<std::string>(backbone_->stage_names().begin() + *i,
                                  backbone_->stage_names().end() - 1);
}

void ModelRegistry::Describe(ModelInfo& info) const {
  info.stages.clear();
  auto plan = StagePlan::Declare(*backbone_, info.private_stages);
  const auto& names = backbone_->stage_names();
  for (int i = 0; i < backbone_->head_index(); ++i) {
    ModelStage st;
    st.name = names[i];
    st.is_private = plan.ok() && plan->is_private(i);
    st.trainable = plan.ok() && plan->kind(i) == StagePlan::Kind::kTrainable;
    for (const auto& p : backbone_->stage(i).parameters()) st.params += p.numel();
    info.stages.push_back(st);
  }
  const int64_t classes = static_cast<int64_t>(info.classes.size());
  for (VersionInfo& v : info.versions) {
    // 0 for a layer the backbone does not have (loading it is DATA_LOSS).
    auto layer = ResolveFeatureLayer(v.feature_layer);
    v.head_params = layer.ok() ? HeadParams(v.head ? *v.head : info.head, layer->dim, classes) : 0;
  }
}

absl::StatusOr<ModelRegistry::FeatureLayer> ModelRegistry::ResolveFeatureLayer(
    const std::string& layer) const {
  if (layer.empty()) return FeatureLayer{-1, dim_};
  auto stage = backbone_->EmbeddableStage(layer);
  if (!stage.ok()) return stage.status();
  auto dim = backbone_->PooledDim(*stage);
  if (!dim.ok()) return dim.status();
  return FeatureLayer{*stage, *dim};
}

const HeadSpec& VersionHead(const ModelInfo& info, int version) {
  for (const auto& v : info.versions) {
    if (v.version == version && v.head) return *v.head;
  }
  return info.head;
}

absl::StatusOr<std::shared_ptr<const ServableVersion>> ModelRegistry::LoadVersion(
    const ModelInfo& info, int version) const {
  const VersionInfo* vi = nullptr;
  for (const auto& v : info.versions) vi = v.version == version ? &v : vi;
  auto bytes = db_->GetBlob(WeightsBlob(info.name, version));
  if (!bytes.ok()) {
    return ReadError(bytes.status(),
                     absl::StrCat("weights of ", info.name, " v", version, " cannot be read: "));
  }

  const HeadSpec& spec = VersionHead(info, version);
  if (absl::Status s = ValidateHeadSpec(spec); !s.ok()) {
    return absl::DataLossError(
        absl::StrCat("the head of ", info.name, " v", version, " in its record: ", s.message()));
  }
  auto layer = ResolveFeatureLayer(vi ? vi->feature_layer : "");
  if (!layer.ok()) {
    return absl::DataLossError(absl::StrCat("the feature layer of ", info.name, " v", version,
                                            " in its record: ", layer.status().message()));
  }
  torch::nn::Sequential head = MakeHead(spec, layer->dim, info.classes.size());
  if (absl::Status s = LoadHead(*bytes, head); !s.ok()) return s;
  head->eval();
  StagePlan::Stages own;
  for (const std::string& stage : vi ? vi->private_stages : std::vector<std::string>{}) {
    auto index = backbone_->EmbeddableStage(stage);
    if (!index.ok()) return index.status();
    try {
      // The host copy, in float32 whatever the file holds (a version trained
      // under another --precision loads too); the engine makes the device one.
      auto stage_bytes = db_->GetBlob(WeightsBlob(info.name, version, stage));
      if (!stage_bytes.ok()) {
        return ReadError(stage_bytes.status(), absl::StrCat("stage ", stage, " of ", info.name,
                                                            " v", version, " cannot be read: "));
      }
      std::istringstream in(*stage_bytes);
      auto m =
          std::make_shared<torch::jit::Module>(torch::jit::load(in, torch::Device(torch::kCPU)));
      m->to(torch::kFloat);
      for (const auto& p : m->parameters()) p.set_requires_grad(false);
      m->eval();
      own[*index] = std::move(m);
    } catch (const c10::Error& e) {
      return absl::DataLossError(absl::StrCat("cannot load stage ", stage, " of ", info.name, " v",
                                              version, ": ", Bounded(e.msg(), 200)));
    }
  }
  return std::make_shared<const ServableVersion>(
      info.name, version, info.classes, StagePlan(*backbone_, std::move(own), head, layer->stage),
      vi ? vi->calibration : Calibration{});
}

absl::Status ModelRegistry::Persist(const ModelInfo& info) {
  const std::string record = ModelToJson(info).dump();
  if (disk_ != nullptr) {
    if (absl::Status s = disk_->Check(2 * static_cast<int64_t>(record.size()), "the model record");
        !s.ok()) {
      return s;
    }
  }
  if (absl::Status s = db_->PutRecord("model", info.name, record); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  if (auto it = models_.find(info.name); it != models_.end()) it->second.record = record;
  return absl::OkStatus();
}

absl::StatusOr<ModelInfo> ModelRegistry::Create(const std::string& name,
                                                std::vector<std::string> classes,
                                                const HeadSpec& head) {
  if (absl::Status s = DatasetCatalog::ValidateName(name, "name"); !s.ok()) return s;
  if (absl::Status s = ValidateHeadSpec(head); !s.ok()) return s;
  if (classes.size() < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("classes: a classifier needs at least 2 classes, got ", classes.size()));
  }
  if (static_cast<int64_t>(classes.size()) > limits_.max_classes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("classes: ", classes.size(), " classes, over the limit of ",
                     limits_.max_classes, " (--max_model_classes)"));
  }
  std::set<std::string> seen;
  for (size_t i = 0; i < classes.size(); ++i) {
    if (classes[i].empty() || classes[i].size() > 128 || !seen.insert(classes[i]).second) {
      return absl::InvalidArgumentError(absl::StrCat("classes[", i, "] \"", Bounded(classes[i]),
                                                     "\" is empty, over 128 bytes or repeated"));
    }
  }
  const int64_t params = HeadParams(head, dim_, static_cast<int64_t>(classes.size()));
  if (params > limits_.max_head_params) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "head: ", params, " parameters (embedding ", dim_, " -> hidden -> ", classes.size(),
        " classes), over the limit of ", limits_.max_head_params, " (--max_head_params)"));
  }
  absl::MutexLock write(&write_mu_);
  {
    absl::MutexLock lock(&mu_);
    if (models_.count(name)) {
      return absl::AlreadyExistsError(absl::StrCat("model \"", name, "\" already exists"));
    }
  }
  Entry e;
  e.info.name = name;
  e.info.classes = std::move(classes);
  e.info.head = head;
  e.info.head_params = ParamCount(MakeHead(head, dim_, e.info.classes.size()));
  e.info.created = absl::StrCat(std::time(nullptr), "-", std::random_device{}());
  e.record = ModelToJson(e.info).dump();
  if (disk_ != nullptr) {
    if (absl::Status s =
            disk_->Check(2 * static_cast<int64_t>(e.record.size()), "the model record");
        !s.ok()) {
      return s;
    }
  }
  // Atomic: another replica creating the same name at once gets ALREADY_EXISTS.
  if (absl::Status s = db_->CreateRecord("model", name, e.record); !s.ok()) return s;
  Describe(e.info);
  ModelInfo out = e.info;
  absl::MutexLock lock(&mu_);
  e.generation = ++generations_;
  models_[name] = std::move(e);
  return out;
}

absl::StatusOr<ModelInfo> ModelRegistry::Get(const std::string& name) const {
  CatchUp(name);
  absl::MutexLock lock(&mu_);
  auto it = models_.find(name);
  if (it == models_.end()) {
    return NoSuchModel(name);
  }
  return it->second.info;
}

std::vector<ModelInfo> ModelRegistry::List() const {
  absl::MutexLock lock(&mu_);
  std::vector<ModelInfo> out;
  for (const auto& [name, e] : models_) out.push_back(e.info);
  return out;
}

int ModelRegistry::size() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(models_.size());
}

absl::Status ModelRegistry::Delete(const std::string& name) {
  CatchUp(name);
  absl::MutexLock write(&write_mu_);
  std::vector<VersionInfo> versions;
  {
    absl::MutexLock lock(&mu_);
    auto entry = Idle(name, "cancel its job first");
    if (!entry.ok()) return entry.status();
    versions = (*entry)->info.versions;
  }
  if (absl::Status s = db_->DeleteRecords("model", name); !s.ok()) return s;
  {
    absl::MutexLock lock(&mu_);
    models_.erase(name);
  }
  // The record is gone: weights left behind by a failure here are unreachable
  // and harmless (a model made again under the name writes its own).
  for (const auto& v : versions) {
    (void)db_->DeleteBlob(WeightsBlob(name, v.version));
    for (const auto& stage : v.private_stages) {
      (void)db_->DeleteBlob(WeightsBlob(name, v.version, stage));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const ServableVersion>> ModelRegistry::Lookup(
    const std::string& name, int version, ModelInfo* info, int* resolved, uint64_t* generation) {
  // No CatchUp: serving (often on a gRPC thread) never waits on the
  // database; a model made elsewhere serves here once its notification
  // arrives (within a second).
  absl::MutexLock lock(&mu_);
  auto it = models_.find(name);
  if (it == models_.end()) return NoSuchModel(name);
  Entry& e = it->second;
  if (!e.info.problem.ok()) return e.info.problem;
  const int want = version > 0 ? version : e.info.served_version;
  if (want == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "model \"", name, "\" has no trained version yet; train it first (StartTraining)"));
  }
  bool exists = false;
  for (const auto& v : e.info.versions) exists = exists || v.version == want;
  if (!exists) {
    return absl::NotFoundError(absl::StrCat("model \"", name, "\" has no version ", want));
  }
  if (auto v = e.loaded.find(want); v != e.loaded.end()) {
    if (want != e.info.served_version) e.last_use[want] = ++use_clock_;
    return v->second;
  }
  *info = e.info;
  *resolved = want;
  *generation = e.generation;
  return std::shared_ptr<const ServableVersion>();
}

void ModelRegistry::Keep(const std::string& name, uint64_t generation,
                         const std::shared_ptr<const ServableVersion>& version) {
  absl::MutexLock lock(&mu_);
  auto it = models_.find(name);
  // Not into a model deleted (and maybe made again) while it was read.
  if (it == models_.end() || it->second.generation != generation) return;
  Entry& e = it->second;
  // Its thresholds may have changed while it was read (SetThresholds): the
  // record's win.
  std::shared_ptr<const ServableVersion> kept = version;
  for (const auto& v : e.info.versions) {
    if (v.version == version->version &&
        v.calibration.thresholds != version->calibration.thresholds) {
      kept = std::make_shared<const ServableVersion>(
          version->model, version->version, version->classes, version->plan, v.calibration);
    }
  }
  if (version->version == e.info.served_version) {
    // Served meanwhile (SetServedVersion loaded it itself): never an older
    // version to evict, and the copy already installed stays.
    if (!e.loaded.count(version->version)) e.loaded[version->version] = kept;
    return;
  }
  e.loaded[version->version] = kept;
  e.last_use[version->version] = ++use_clock_;
  TrimOlder(e);
}

void ModelRegistry::TrimOlder(Entry& e) {
  // Older versions beyond the bound go, least recently used first; the
  // served one is never among them.
  e.last_use.erase(e.info.served_version);
  while (static_cast<int>(e.last_use.size()) > kMaxOlderVersions) {
    auto lru = e.last_use.begin();
    for (auto u = e.last_use.begin(); u != e.last_use.end(); ++u) {
      if (u->second < lru->second) lru = u;
    }
    e.loaded.erase(lru->first);
    e.last_use.erase(lru);
  }
}

void ModelRegistry::Servable(const std::string& name, int version, ServableDone done) {
  ModelInfo info;
  int want = 0;
  uint64_t generation = 0;
  auto found = Lookup(name, version, &info, &want, &generation);
  if (!found.ok() || *found) {
    done(std::move(found));
    return;
  }
  // Read from disk on the loader thread, never the caller's (a gRPC thread);
  // callers of a version being read wait for that read (one per version).
  const auto key = std::make_pair(name, want);
  bool full = false;
  {
    absl::MutexLock lock(&mu_);
    auto pending = loading_.find(key);
    if (pending != loading_.end()) {
      pending->second.push_back(std::move(done));
      return;
    }
    full = loading_.size() >= kMaxLoadsQueued;
    if (!full) loading_[key].push_back(std::move(done));
  }
  if (full) {
    done(absl::ResourceExhaustedError(
        absl::StrCat(kMaxLoadsQueued, " older versions are being read; retry later")));
    return;
  }
  loader_->Schedule([this, key, info = std::move(info), generation]() {
    auto v = Contain("cannot load the version", [&] { return LoadVersion(info, key.second); });
    if (v.ok()) Keep(key.first, generation, *v);
    std::vector<ServableDone> waiting;
    {
      absl::MutexLock lock(&mu_);
      waiting = std::move(loading_[key]);
      loading_.erase(key);
    }
    for (auto& w : waiting) {
      const absl::Status s = Contain("Classify failed", [&]() -> absl::Status {
        w(v);
        return absl::OkStatus();
      });
      if (!s.ok())
        LogError("a caller of model %s v%d failed: %s", key.first, key.second, s.ToString());
    }
  });
}

absl::StatusOr<std::shared_ptr<const ServableVersion>> ModelRegistry::ServableNow(
    const std::string& name, int version) {
  ModelInfo info;
  int want = 0;
  uint64_t generation = 0;
  auto found = Lookup(name, version, &info, &want, &generation);
  if (!found.ok() || *found) return found;
  auto v = LoadVersion(info, want);
  if (v.ok()) Keep(name, generation, *v);
  return v;
}

absl::Status ModelRegistry::BeginTraining(const std::string& name) {
  CatchUp(name);
  absl::MutexLock write(&write_mu_);  // not while a Delete or a stage change is writing
  absl::MutexLock lock(&mu_);
  auto it = models_.find(name);
  if (it == models_.end()) {
    return NoSuchModel(name);
  }
  if (absl::Status s = Damaged(it->second.info); !s.ok()) return s;
  if (it->second.info.training) {
    return absl::FailedPreconditionError(
        absl::StrCat("model \"", name, "\" is already training; wait for or cancel that job"));
  }
  it->second.info.training = true;
  return absl::OkStatus();
}

void ModelRegistry::EndTraining(const std::string& name) {
  absl::MutexLock lock(&mu_);
  if (auto it = models_.find(name); it != models_.end()) it->second.info.training = false;
}

absl::StatusOr<ModelRegistry::Entry*> ModelRegistry::Idle(const std::string& name,
                                                          absl::string_view advice) {
  auto it = models_.find(name);
  if (it == models_.end()) return NoSuchModel(name);
  if (it->second.info.training) {
    return absl::FailedPreconditionError(
        absl::StrCat("model \"", name, "\" is training; ", advice));
  }
  return &it->second;
}

absl::StatusOr<ModelInfo> ModelRegistry::ChangeStages(
    const std::string& name, const std::vector<std::string>& stages,
    const std::function<void(ModelInfo&, const std::string&)>& change) {
  CatchUp(name);
  auto indices = StageIndices(stages);
  if (!indices.ok()) return indices.status();
  absl::MutexLock write(&write_mu_);
  ModelInfo next;
  {
    absl::MutexLock lock(&mu_);
    auto entry = Idle(name, "change its stages after the job");
    if (!entry.ok()) return entry.status();
    if (absl::Status s = Damaged((*entry)->info); !s.ok()) return s;
    next = (*entry)->info;
  }
  for (const auto& s : stages) change(next, s);
  if (absl::Status s = Persist(next); !s.ok()) return s;
  Describe(next);
  absl::MutexLock lock(&mu_);
  models_[name].info = next;  // not deleted: Delete needs write_mu_
  return next;
}

absl::StatusOr<ModelInfo> ModelRegistry::Unfreeze(const std::string& name,
                                                  const std::vector<std::string>& stages) {
  return ChangeStages(name, stages,
                      [](ModelInfo& m, const std::string& s) { m.private_stages[s] = true; });
}

absl::StatusOr<ModelInfo> ModelRegistry::Freeze(const std::string& name,
                                                const std::vector<std::string>& stages, bool drop) {
  return ChangeStages(name, stages, [drop](ModelInfo& m, const std::string& s) {
    auto p = m.private_stages.find(s);
    if (p == m.private_stages.end()) return;  // already the shared stage
    if (drop) {
      m.private_stages.erase(p);
    } else {
      p->second = false;
    }
  });
}

absl::StatusOr<ModelRegistry::StartingPoint> ModelRegistry::Start(const std::string& name) const {
  CatchUp(name);
  ModelInfo info;
  StartingPoint start;
  {
    absl::MutexLock lock(&mu_);
    auto it = models_.find(name);
    if (it == models_.end()) {
      return NoSuchModel(name);
    }
    info = it->second.info;
    if (auto v = it->second.loaded.find(info.served_version); v != it->second.loaded.end()) {
      start.served = v->second;
    }
  }
  auto declared = StagePlan::Declare(*backbone_, info.private_stages);
  if (!declared.ok()) return declared.status();
  for (int i : declared->private_indices()) {
    // The served version's own copy where it has one, else the shared stage.
    const torch::jit::Module& from =
        start.served ? start.served->plan.module(i) : backbone_->stage(i);
    auto copy = std::make_shared<torch::jit::Module>(backbone_->OnDevice(from, /*float32=*/true));
    const bool trainable = declared->kind(i) == StagePlan::Kind::kTrainable;
    for (const auto& p : copy->parameters()) p.set_requires_grad(trainable);
    start.stages[i] = std::move(copy);
  }
  return start;
}

absl::StatusOr<int> ModelRegistry::AddVersion(
    const std::string& name, const torch::nn::Sequential& head,
    const std::map<int, std::shared_ptr<torch::jit::Module>>& stages, VersionInfo info,
    bool serve) {
  absl::MutexLock write(&write_mu_);
  ModelInfo next;
  {
    absl::MutexLock lock(&mu_);
    auto it = models_.find(name);
    if (it == models_.end()) {
      return absl::NotFoundError(absl::StrCat("model \"", name, "\" was deleted"));
    }
    next = it->second.info;
  }
  info.version = next.versions.empty() ? 1 : next.versions.back().version + 1;
  info.created_unix = static_cast<int64_t>(std::time(nullptr));
  // The host copies (float32, CPU, frozen): what is written and what the
  // engine copies to the device.
  auto host_head = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(head->clone(torch::kCPU));
  host_head->to(torch::kFloat);
  host_head->eval();
  for (const auto& p : host_head->parameters()) p.set_requires_grad(false);
  StagePlan::Stages own;
  for (const auto& [index, module] : stages) {
    torch::NoGradGuard no_grad;
    auto copy = std::make_shared<torch::jit::Module>(module->clone());
    copy->to(torch::kCPU, torch::kFloat);
    for (const auto& p : copy->parameters()) p.set_requires_grad(false);
    copy->eval();
    own[index] = std::move(copy);
  }
  auto layer = ResolveFeatureLayer(info.feature_layer);
  if (!layer.ok()) return layer.status();
  const StagePlan plan(*backbone_, std::move(own), torch::nn::Sequential(host_head), layer->stage);
  if (disk_ != nullptr) {
    if (absl::Status s = disk_->Check(plan.bytes() + (1 << 16), "the new version's weights",
                                      DiskBudget::Into::kFile);
        !s.ok()) {
      return s;
    }
  }
  // No lock that serving takes is held from here to the swap: weights
  // first, durably; then the record that points at them.
  if (absl::Status s = db_->PutBlob(WeightsBlob(name, info.version), SaveHead(plan.head()));
      !s.ok()) {
    return s;
  }
  info.private_stages.clear();
  for (const auto& [index, module] : plan.own()) {
    const std::string& stage = backbone_->stage_names()[index];
    std::ostringstream bytes;
    module->save(bytes);
    if (absl::Status s = db_->PutBlob(WeightsBlob(name, info.version, stage), bytes.str());
        !s.ok()) {
      return s;
    }
    info.private_stages.push_back(stage);
  }
  next.versions.push_back(info);
  const int previous = next.served_version;
  if (serve || previous == 0) next.served_version = info.version;
  if (absl::Status s = Persist(next); !s.ok()) return s;
  auto version = std::make_shared<const ServableVersion>(name, info.version, next.classes, plan,
                                                         info.calibration);
  Describe(next);
  absl::MutexLock lock(&mu_);
  Entry& e = models_[name];  // not deleted: Delete needs write_mu_
  e.info = std::move(next);
  // Swapped in: new calls see it, old ones keep theirs. The version not
  // served (the previous one, or the new one when it is not served) stays
  // loaded as an older one.
  e.loaded[info.version] = version;
  const int older = e.info.served_version == info.version ? previous : info.version;
  if (older > 0 && e.loaded.count(older)) e.last_use[older] = ++use_clock_;
  TrimOlder(e);
  return info.version;
}

}  // namespace tlserve
