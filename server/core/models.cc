#include "server/core/models.h"

#include <ctime>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "server/core/datasets.h"
#include "server/store/data_dir.h"

namespace tlserve {
namespace {

nlohmann::json ToJson(const ModelInfo& m) {
  nlohmann::json versions = nlohmann::json::array();
  for (const auto& v : m.versions) {
    versions.push_back({{"version", v.version},
                        {"created_unix", v.created_unix},
                        {"job_id", v.job_id},
                        {"train_accuracy", v.train_accuracy},
                        {"validation_accuracy", v.validation.accuracy},
                        {"precision", v.validation.precision},
                        {"recall", v.validation.recall},
                        {"support", v.validation.support},
                        {"confusion", v.validation.confusion}});
  }
  return {{"name", m.name},          {"classes", m.classes},
          {"hidden", m.head.hidden}, {"dropout", m.head.dropout},
          {"versions", versions},    {"served_version", m.served_version}};
}

ModelInfo FromJson(const nlohmann::json& j) {
  ModelInfo m;
  m.name = j.at("name").get<std::string>();
  m.classes = j.at("classes").get<std::vector<std::string>>();
  m.head.hidden = j.at("hidden").get<std::vector<int>>();
  m.head.dropout = j.at("dropout").get<float>();
  m.served_version = j.at("served_version").get<int>();
  for (const auto& v : j.at("versions")) {
    VersionInfo vi;
    vi.version = v.at("version").get<int>();
    vi.created_unix = v.at("created_unix").get<int64_t>();
    vi.job_id = v.at("job_id").get<std::string>();
    vi.train_accuracy = v.at("train_accuracy").get<double>();
    vi.validation.accuracy = v.at("validation_accuracy").get<double>();
    vi.validation.precision = v.at("precision").get<std::vector<double>>();
    vi.validation.recall = v.at("recall").get<std::vector<double>>();
    vi.validation.support = v.at("support").get<std::vector<int64_t>>();
    vi.validation.confusion = v.at("confusion").get<std::vector<int64_t>>();
    m.versions.push_back(std::move(vi));
  }
  return m;
}

}  // namespace

absl::StatusOr<std::unique_ptr<ModelRegistry>> ModelRegistry::Open(Database* db,
                                                                   const std::string& weights_dir,
                                                                   int64_t embedding_dim) {
  std::unique_ptr<ModelRegistry> r(new ModelRegistry(db, weights_dir, embedding_dim));
  auto records = db->ListRecords("model");
  if (!records.ok()) return records.status();
  absl::MutexLock lock(&r->mu_);
  for (const auto& [key, json] : *records) {
    const auto j = nlohmann::json::parse(json, nullptr, false);
    if (j.is_discarded())
      return absl::DataLossError(absl::StrCat("model record ", key, " is corrupt"));
    Entry e;
    e.info = FromJson(j);
    e.info.head_params = ParamCount(MakeHead(e.info.head, embedding_dim, e.info.classes.size()));
    if (e.info.served_version > 0) {
      auto v = r->LoadVersion(e.info, e.info.served_version);
      if (!v.ok()) return v.status();
      e.loaded[e.info.served_version] = *v;
    }
    r->models_[key] = std::move(e);
  }
  return r;
}

std::string ModelRegistry::WeightsPath(const std::string& model, int version) const {
  return absl::StrCat(dir_, "/", model, "/v", version, ".pt");
}

absl::StatusOr<std::shared_ptr<const ServableVersion>> ModelRegistry::LoadVersion(
    const ModelInfo& info, int version) const {
  std::ifstream in(WeightsPath(info.name, version), std::ios::binary);
  if (!in) {
    return absl::DataLossError(absl::StrCat("weights of ", info.name, " v", version,
                                            " are missing: ", WeightsPath(info.name, version)));
  }
  std::stringstream bytes;
  bytes << in.rdbuf();
  auto v = std::make_shared<ServableVersion>();
  v->model = info.name;
  v->version = version;
  v->classes = info.classes;
  v->head = MakeHead(info.head, dim_, info.classes.size());
  if (absl::Status s = LoadHead(bytes.str(), v->head); !s.ok()) return s;
  v->head->eval();
  return std::shared_ptr<const ServableVersion>(std::move(v));
}

absl::Status ModelRegistry::Persist(const ModelInfo& info) {
  return db_->PutRecord("model", info.name, ToJson(info).dump());
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
  std::set<std::string> seen;
  for (size_t i = 0; i < classes.size(); ++i) {
    if (classes[i].empty() || !seen.insert(classes[i]).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("classes[", i, "] \"", classes[i], "\" is empty or repeated"));
    }
  }
  absl::MutexLock lock(&mu_);
  if (models_.count(name)) {
    return absl::AlreadyExistsError(absl::StrCat("model \"", name, "\" already exists"));
  }
  Entry e;
  e.info.name = name;
  e.info.classes = std::move(classes);
  e.info.head = head;
  e.info.head_params = ParamCount(MakeHead(head, dim_, e.info.classes.size()));
  if (absl::Status s = Persist(e.info); !s.ok()) return s;
  ModelInfo out = e.info;
  models_[name] = std::move(e);
  return out;
}

absl::StatusOr<ModelInfo> ModelRegistry::Get(const std::string& name) const {
  absl::MutexLock lock(&mu_);
  auto it = models_.find(name);
  if (it == models_.end()) {
    return absl::NotFoundError(absl::StrCat("model \"", name, "\" does not exist"));
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
  absl::MutexLock lock(&mu_);
  auto it = models_.find(name);
  if (it == models_.end()) {
    return absl::NotFoundError(absl::StrCat("model \"", name, "\" does not exist"));
  }
  if (it->second.info.training) {
    return absl::FailedPreconditionError(
        absl::StrCat("model \"", name, "\" is training; cancel its job first"));
  }
  if (absl::Status s = db_->DeleteRecords("model", name); !s.ok()) return s;
  for (const auto& v : it->second.info.versions) std::remove(WeightsPath(name, v.version).c_str());
  models_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const ServableVersion>> ModelRegistry::Servable(
    const std::string& name, int version) const {
  ModelInfo info;
  {
    absl::MutexLock lock(&mu_);
    auto it = models_.find(name);
    if (it == models_.end()) {
      return absl::NotFoundError(absl::StrCat("model \"", name, "\" does not exist"));
    }
    const int want = version > 0 ? version : it->second.info.served_version;
    if (want == 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "model \"", name, "\" has no trained version yet; train it first (StartTraining)"));
    }
    if (auto v = it->second.loaded.find(want); v != it->second.loaded.end()) return v->second;
    bool exists = false;
    for (const auto& v : it->second.info.versions) exists = exists || v.version == want;
    if (!exists) {
      return absl::NotFoundError(absl::StrCat("model \"", name, "\" has no version ", want));
    }
    info = it->second.info;
  }
  // An older version: loaded on demand (not cached, to bound memory).
  return LoadVersion(info, version);
}

absl::Status ModelRegistry::BeginTraining(const std::string& name) {
  absl::MutexLock lock(&mu_);
  auto it = models_.find(name);
  if (it == models_.end()) {
    return absl::NotFoundError(absl::StrCat("model \"", name, "\" does not exist"));
  }
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

absl::StatusOr<int> ModelRegistry::AddVersion(const std::string& name,
                                              const torch::nn::Sequential& head, VersionInfo info) {
  absl::MutexLock lock(&mu_);
  auto it = models_.find(name);
  if (it == models_.end()) {
    return absl::NotFoundError(absl::StrCat("model \"", name, "\" was deleted"));
  }
  ModelInfo next = it->second.info;
  info.version = next.versions.empty() ? 1 : next.versions.back().version + 1;
  info.created_unix = static_cast<int64_t>(std::time(nullptr));
  if (absl::Status s = MakeDirectories(absl::StrCat(dir_, "/", name)); !s.ok()) return s;
  // Weights first, durably; then the record that points at them.
  if (absl::Status s = WriteFileAtomically(WeightsPath(name, info.version), SaveHead(head));
      !s.ok()) {
    return s;
  }
  next.versions.push_back(info);
  next.served_version = info.version;
  if (absl::Status s = Persist(next); !s.ok()) return s;
  auto v = LoadVersion(next, info.version);
  if (!v.ok()) return v.status();
  it->second.info = std::move(next);
  it->second.loaded.clear();
  it->second.loaded[info.version] = *v;  // swapped in: new calls see it, old ones keep theirs
  return info.version;
}

}  // namespace tlserve
