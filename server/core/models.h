// The named classifiers: each is the shared backbone plus a head of its own
// and its class names, with trained versions kept on disk (weights file
// fsync'd and renamed into place, then its record committed). Classify holds
// a shared_ptr to the version it started with; a new version is swapped in
// atomically, so an in-flight call never sees half a model.
//
// Disk I/O happens with no lock that serving needs held: mutations are
// serialised by their own lock (write_mu_), write and fsync under it, then
// install the result under the short lock (mu_) that Servable takes. Loaded
// versions (host copies) are kept: every served version, and up to
// kMaxOlderVersions older ones (least recently used first out); an older
// version not loaded yet is read on the loader thread, never the caller's.
//
// Thread-safe.
#ifndef TLSERVE_SERVER_CORE_MODELS_H_
#define TLSERVE_SERVER_CORE_MODELS_H_

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/core/backbone.h"
#include "server/core/engine/servable.h"
#include "server/core/head.h"
#include "server/core/head_trainer.h"
#include "server/core/thread_pool.h"
#include "server/store/database.h"
#include "server/store/disk_budget.h"

namespace tlserve {

struct VersionInfo {
  int version = 0;
  // Stages stored with this version: the model's own trained copies.
  std::vector<std::string> private_stages;
  int64_t created_unix = 0;
  std::string job_id;
  double train_accuracy = 0;
  Evaluation validation;
  // Temperature (fitted on the validation split) and confidence thresholds.
  Calibration calibration;
  // Expected calibration error on the validation split before and after the
  // temperature (0 without a validation split).
  double validation_ece_uncalibrated = 0;
  double validation_ece = 0;
  // This version's head when it is not the model's (a sweep chose another
  // shape); unset: ModelInfo::head.
  std::optional<HeadSpec> head;
  // The backbone stage whose output, average-pooled, its head reads (a
  // sweep's choice); empty: the embedding (the backbone's own pooling).
  std::string feature_layer;
  int64_t head_params = 0;  // of its head; filled by the registry (Describe)
};

// One stage of a model as DescribeModel shows it.
struct ModelStage {
  std::string name;
  bool is_private = false;  // the model's own copy
  bool trainable = false;
  int64_t params = 0;
};

struct ModelInfo {
  std::string name;
  std::vector<std::string> classes;
  HeadSpec head;
  // Stages with a private copy, and whether each trains (FreezeLayers keeps
  // the copy but stops training it).
  std::map<std::string, bool> private_stages;
  std::vector<ModelStage> stages;  // filled by the registry
  int64_t head_params = 0;
  std::vector<VersionInfo> versions;
  int served_version = 0;
  bool training = false;
  // Which creation of the name this is ("UNIXTIME-RANDOM"; empty for models
  // made before it was recorded): a model deleted and made again elsewhere
  // (another replica) is another model.
  std::string created;
  // Set when the model could not be loaded at start (a corrupt record, a
  // missing or corrupt weight file): the status every use of it returns.
  // Such a model can be described and deleted, nothing else.
  absl::Status problem;
};

// The head shape of `version` (the model's own when the version has none
// of its own, or is not found).
const HeadSpec& VersionHead(const ModelInfo& info, int version);

// What one model may cost (flags --max_head_params, --max_model_classes).
struct ModelLimits {
  int64_t max_head_params = 16'000'000;  // 64 MB of fp32 weights
  int64_t max_classes = 10'000;
};

class ModelRegistry {
 public:
  // Loads every model and the weights of every served version. A model that
  // cannot be loaded does not stop the others: it is kept with its
  // `problem` (DATA_LOSS naming the record or file) for describe and delete.
  // Weights are the database's blobs "models/NAME/vN.PART.pt".
  static absl::StatusOr<std::unique_ptr<ModelRegistry>> Open(Database* db, const Backbone* backbone,
                                                             ModelLimits limits = {},
                                                             const DiskBudget* disk = nullptr);

  ~ModelRegistry();
  ModelRegistry(const ModelRegistry&) = delete;
  ModelRegistry& operator=(const ModelRegistry&) = delete;

  // Rereads a model's record after another replica changed it (PostgreSQL's
  // notifications call these): a new or changed model is installed with its
  // served version loaded, a deleted one goes. A model training here is left
  // as it is (this replica writes it).
  void Refresh(const std::string& name);
  void RefreshAll();
  // On a shared database, a model another replica made (or changed) a
  // moment ago may be committed before its notification arrives: a name
  // this replica does not know is read from the database before it is
  // called missing (read-your-writes across replicas). Nothing on SQLite.
  // Call without locks held.
  void CatchUp(const std::string& name) const;

  // ALREADY_EXISTS; INVALID_ARGUMENT for a bad name, < 2 classes, a
  // repeated class name or one over 128 bytes; RESOURCE_EXHAUSTED for more
  // classes or head parameters than the limits allow.
  absl::StatusOr<ModelInfo> Create(const std::string& name, std::vector<std::string> classes,
                                   const HeadSpec& head);
  absl::StatusOr<ModelInfo> Get(const std::string& name) const;
  std::vector<ModelInfo> List() const;
  // FAILED_PRECONDITION while it trains.
  absl::Status Delete(const std::string& name);
  int size() const;
  const Backbone& backbone() const { return *backbone_; }

  static constexpr int kMaxOlderVersions = 8;
  static constexpr size_t kMaxLoadsQueued = 64;  // distinct versions being read at once
  using ServableDone = std::function<void(absl::StatusOr<std::shared_ptr<const ServableVersion>>)>;
  // The served version (`version` 0) or a given one. NOT_FOUND for an unknown
  // model or version; FAILED_PRECONDITION when it has no trained version.
  // `done` runs on the calling thread when the version is loaded (always
  // for the served one), else on the loader thread once it is read.
  void Servable(const std::string& name, int version, ServableDone done);
  // The same, waiting for the load (job and export threads, tests).
  absl::StatusOr<std::shared_ptr<const ServableVersion>> ServableNow(const std::string& name,
                                                                     int version);

  // Gives the model its own trainable copies of `stages` (names; the head or
  // an unknown name is INVALID_ARGUMENT); FAILED_PRECONDITION while training.
  absl::StatusOr<ModelInfo> Unfreeze(const std::string& name,
                                     const std::vector<std::string>& stages);
  // The stages from `first` to the last before the head (for "from layer4 on").
  absl::StatusOr<std::vector<std::string>> StagesFrom(const std::string& first) const;
  // Stops training `stages`; with `drop`, goes back to the shared stages.
  absl::StatusOr<ModelInfo> Freeze(const std::string& name, const std::vector<std::string>& stages,
                                   bool drop);

  // Where a training job starts from: copies of the private stages (from
  // the served version where it has them, else from the shared backbone) on
  // the backbone's device in float32 (the master weights; trainable ones
  // require grad), and the served version, if any (null otherwise).
  struct StartingPoint {
    std::map<int, std::shared_ptr<torch::jit::Module>> stages;
    std::shared_ptr<const ServableVersion> served;
  };
  absl::StatusOr<StartingPoint> Start(const std::string& name) const;

  // One training at a time per model: FAILED_PRECONDITION when one runs.
  absl::Status BeginTraining(const std::string& name);
  void EndTraining(const std::string& name);

  // Stores `head` and the private `stages` (on any device) as the next
  // version, durably, and serves it when `serve` (or when nothing is served
  // yet). The model must be training (one version is added at a time per
  // model).
  absl::StatusOr<int> AddVersion(const std::string& name, const torch::nn::Sequential& head,
                                 const std::map<int, std::shared_ptr<torch::jit::Module>>& stages,
                                 VersionInfo info, bool serve = true);

  // Serves `version` (promote or roll back), durably: FAILED_PRECONDITION
  // while the model trains or for a model with a problem, NOT_FOUND for a
  // version it does not have.
  absl::StatusOr<ModelInfo> Serve(const std::string& name, int version);
  // Replaces a version's confidence thresholds (one per class in [0, 1], or
  // empty for none), durably; in-flight calls keep the ones they started
  // with. INVALID_ARGUMENT for a wrong count or a value out of range.
  absl::StatusOr<ModelInfo> SetThresholds(const std::string& name, int version,
                                          std::vector<float> thresholds);

  // The stage index and head input width of a version's feature layer
  // ({-1, embedding dim} for the embedding); INVALID_ARGUMENT for a name
  // the backbone does not have.
  struct FeatureLayer {
    int stage = -1;
    int64_t dim = 0;
  };
  absl::StatusOr<FeatureLayer> ResolveFeatureLayer(const std::string& layer) const;
  const ModelLimits& limits() const { return limits_; }

 private:
  struct Entry {
    ModelInfo info;
    std::string record;  // the JSON last read or written: what the database holds
    std::map<int, std::shared_ptr<const ServableVersion>> loaded;
    std::map<int, uint64_t> last_use;  // of loaded older versions
    uint64_t generation = 0;           // a model made again under the same name is another
  };
  ModelRegistry(Database* db, const Backbone* backbone, ModelLimits limits, const DiskBudget* disk)
      : db_(db),
        disk_(disk),
        backbone_(backbone),
        dim_(backbone->embedding_dim()),
        limits_(limits) {}
  // A model from its record: loaded with its served version, or kept with
  // its `problem`.
  Entry LoadEntry(const std::string& key, const std::string& json) const;
  absl::StatusOr<std::vector<int>> StageIndices(const std::vector<std::string>& names) const;
  // Unfreeze and Freeze: validates the stage names, applies `change` for
  // each to a copy of the idle model's info, persists it, then installs it.
  absl::StatusOr<ModelInfo> ChangeStages(
      const std::string& name, const std::vector<std::string>& stages,
      const std::function<void(ModelInfo&, const std::string&)>& change);
  void Describe(ModelInfo& info) const;
  // Writes the model's record, after checking the disk budget.
  absl::Status Persist(const ModelInfo& info) ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  // The model, when it exists (NOT_FOUND) and is not training (FAILED_PRECONDITION).
  absl::StatusOr<Entry*> Idle(const std::string& name, absl::string_view advice)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::shared_ptr<const ServableVersion>> LoadVersion(const ModelInfo& info,
                                                                     int version) const;
  // The loaded version, or (when it must be read) the model's info to read it
  // with: OK with a null version and `info` set.
  absl::StatusOr<std::shared_ptr<const ServableVersion>> Lookup(const std::string& name,
                                                                int version, ModelInfo* info,
                                                                int* resolved,
                                                                uint64_t* generation);
  void TrimOlder(Entry& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Keeps a version read from disk (older versions: LRU, bounded).
  void Keep(const std::string& name, uint64_t generation,
            const std::shared_ptr<const ServableVersion>& version);
  // The name of a version's weights blob: its head ("head") or a private stage.
  static std::string WeightsBlob(const std::string& model, int version,
                                 const std::string& part = "head");

  Database* db_;
  const DiskBudget* disk_;  // may be null
  int subscription_ = 0;    // to other replicas' changes (Database::Subscribe)
  const Backbone* backbone_;
  const int64_t dim_;
  const ModelLimits limits_;
  // Serialises mutations (and their disk writes); taken before mu_.
  absl::Mutex write_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  // Guards the in-memory state only; never held across disk I/O.
  mutable absl::Mutex mu_;
  std::map<std::string, Entry> models_ ABSL_GUARDED_BY(mu_);
  uint64_t use_clock_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t generations_ ABSL_GUARDED_BY(mu_) = 0;
  // Versions being read by the loader, with the callers waiting for each.
  std::map<std::pair<std::string, int>, std::vector<ServableDone>> loading_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<ThreadPool> loader_ = std::make_unique<ThreadPool>(1);
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_MODELS_H_
