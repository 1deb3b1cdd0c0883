// The named classifiers: each is the shared backbone plus a head of its own
// and its class names, with trained versions kept on disk (weights file
// fsync'd and renamed into place, then its record committed). Classify holds
// a shared_ptr to the version it started with; a new version is swapped in
// atomically, so an in-flight call never sees half a model.
//
// Thread-safe.
#ifndef TLSERVE_SERVER_CORE_MODELS_H_
#define TLSERVE_SERVER_CORE_MODELS_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/core/head.h"
#include "server/core/head_trainer.h"
#include "server/store/database.h"

namespace tlserve {

struct VersionInfo {
  int version = 0;
  int64_t created_unix = 0;
  std::string job_id;
  double train_accuracy = 0;
  Evaluation validation;
};

// An immutable trained version: what Classify runs.
struct ServableVersion {
  std::string model;
  int version = 0;
  std::vector<std::string> classes;
  torch::nn::Sequential head;  // eval mode; forward only
};

struct ModelInfo {
  std::string name;
  std::vector<std::string> classes;
  HeadSpec head;
  int64_t head_params = 0;
  std::vector<VersionInfo> versions;
  int served_version = 0;
  bool training = false;
};

class ModelRegistry {
 public:
  // Loads every model and the weights of every served version.
  static absl::StatusOr<std::unique_ptr<ModelRegistry>> Open(Database* db,
                                                             const std::string& weights_dir,
                                                             int64_t embedding_dim);

  // ALREADY_EXISTS; INVALID_ARGUMENT for a bad name, < 2 classes or a
  // repeated class name.
  absl::StatusOr<ModelInfo> Create(const std::string& name, std::vector<std::string> classes,
                                   const HeadSpec& head);
  absl::StatusOr<ModelInfo> Get(const std::string& name) const;
  std::vector<ModelInfo> List() const;
  // FAILED_PRECONDITION while it trains.
  absl::Status Delete(const std::string& name);
  int size() const;

  // The served version (`version` 0) or a given one. NOT_FOUND for an unknown
  // model or version; FAILED_PRECONDITION when it has no trained version.
  absl::StatusOr<std::shared_ptr<const ServableVersion>> Servable(const std::string& name,
                                                                  int version) const;

  // One training at a time per model: FAILED_PRECONDITION when one runs.
  absl::Status BeginTraining(const std::string& name);
  void EndTraining(const std::string& name);

  // Stores `head` as the next version, durably, and serves it.
  absl::StatusOr<int> AddVersion(const std::string& name, const torch::nn::Sequential& head,
                                 VersionInfo info);

 private:
  struct Entry {
    ModelInfo info;
    std::map<int, std::shared_ptr<const ServableVersion>> loaded;
  };
  ModelRegistry(Database* db, std::string dir, int64_t dim)
      : db_(db), dir_(std::move(dir)), dim_(dim) {}
  absl::Status Persist(const ModelInfo& info) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::shared_ptr<const ServableVersion>> LoadVersion(const ModelInfo& info,
                                                                     int version) const;
  std::string WeightsPath(const std::string& model, int version) const;

  Database* db_;
  const std::string dir_;
  const int64_t dim_;
  mutable absl::Mutex mu_;
  std::map<std::string, Entry> models_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_MODELS_H_
