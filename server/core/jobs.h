// Training jobs: queued -> running -> succeeded / failed / cancelled, run one
// at a time on one worker thread, a client of the device engine at training
// priority (its forwards queue behind serving's), with its own LibTorch
// intra-op threads (--train_threads) and, on CUDA, its own low-priority
// stream. A run is contained: any exception (a CUDA out-of-memory included),
// error or non-finite loss fails that job with a message, and its model keeps
// its last good version. A job reads its dataset itself when it runs. A
// head-only job computes the frozen backbone's features of every example
// once, through the engine in large batches (cached in memory by backbone
// and example, up to a bound in bytes), fits the head on the device, and
// stores the best version. Every
// state change is written to the Database before watchers hear of it; at
// start, jobs left queued or running by a previous process are marked failed
// ("interrupted"). Records carry the job's options and every epoch, NaN
// losses included.
//
// Thread-safe.
#ifndef TLSERVE_SERVER_CORE_JOBS_H_
#define TLSERVE_SERVER_CORE_JOBS_H_

#include <atomic>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/core/backbone.h"
#include "server/core/datasets.h"
#include "server/core/engine/engine.h"
#include "server/core/feature_cache.h"
#include "server/core/head_trainer.h"
#include "server/core/models.h"
#include "server/core/training/sweep.h"
#include "server/store/disk_budget.h"

namespace tlserve {

class Metrics;

struct JobRecord {
  enum class State { kQueued, kRunning, kSucceeded, kFailed, kCancelled };
  std::string id, model, dataset;
  State state = State::kQueued;
  std::string phase;
  std::vector<EpochStats> epochs;
  std::string error;
  int version = 0;
  // What became of the version it made: served or not, and why.
  std::string outcome;
  // CancelJob was called (recorded before it is acknowledged).
  bool cancel_requested = false;
  // A sweep's candidates so far, best first.
  std::vector<SweepEntry> leaderboard;
  int64_t created_unix = 0;
  TrainOptions options;
  bool final() const { return state > State::kRunning; }
};

const char* StateName(JobRecord::State s);

class JobRunner {
 public:
  struct Options {
    int64_t feature_cache_bytes = int64_t{1} << 30;  // the in-memory feature cache (0: none)
    // Fine-tuning's prefix activations kept on a CUDA device (then in host
    // memory up to feature_cache_bytes).
    int64_t prefix_cache_device_bytes = int64_t{1} << 30;
    int train_threads = 1;                  // LibTorch intra-op threads of the job thread
    int64_t max_image_pixels = 40'000'000;  // decoded and resized, per image
    const DiskBudget* disk = nullptr;       // checked before a job is accepted
    // Whether running jobs keep their last epoch's checkpoint (the
    // database's blob "checkpoints/ID.ckpt"); without, jobs start over after
    // a restart.
    bool checkpoints = false;
    // Whether this replica may run jobs (--max_concurrent_jobs=1). One
    // replica per database runs them (Database::TryLeadJobs); a replica that
    // may but does not lead now stands by, and takes over — resuming the
    // jobs the runner left — when the lock is free (the runner died or
    // stopped). Until it leads, and always without run_jobs (a serving-only
    // replica), StartTraining is refused with FAILED_PRECONDITION, CancelJob
    // leaves a request in the database (a "cancel" record) that the runner
    // hears and carries out, and GetJob, ListJobs and WatchJob follow the
    // records the runner writes.
    bool run_jobs = true;
    // Tests only: called before each training step of a fine-tune with the
    // model's name; what it throws fails that job.
    std::function<void(const std::string&)> before_step;
    // Called (once, on a thread of the runner's) when the runner of a shared
    // database finds its job lock gone (Database::CheckLeadJobs, every 2 s):
    // another replica may be running the same jobs now, so this one must
    // stop at once — the server exits (a supervisor restarts it, and it then
    // stands by). Unset: only logged.
    std::function<void(const absl::Status&)> on_lost_lead;
  };
  JobRunner(Database* db, DatasetCatalog* datasets, ModelRegistry* models, Engine* engine,
            Metrics* metrics, const Options& options);
  ~JobRunner();  // cancels what runs, then joins

  // Jobs a previous process left unfinished: queued again, to resume from
  // their last checkpoint (options.resume), or marked failed.
  absl::Status Recover();
  // Whether this replica runs the jobs now.
  bool leading() const { return leading_; }

  // NOT_FOUND (model, dataset), FAILED_PRECONDITION (already training; a
  // dataset class unknown to the model; a class with no training example),
  // INVALID_ARGUMENT (options).
  absl::StatusOr<JobRecord> Start(const std::string& model, const std::string& dataset,
                                  const TrainOptions& options);
  absl::StatusOr<JobRecord> Get(const std::string& id) const;
  std::vector<JobRecord> List(const std::string& model) const;
  absl::StatusOr<JobRecord> Cancel(const std::string& id);

  // Calls `update` with the job now and after every change, until it is
  // final; returns a token for Unwatch. `update` runs under no lock of the
  // caller's and must not block.
  absl::StatusOr<int> Watch(const std::string& id, std::function<void(const JobRecord&)> update);
  void Unwatch(const std::string& id, int token);

 private:
  struct Job {
    JobRecord record;
    bool cancel = false;
    std::map<int, std::function<void(const JobRecord&)>> watchers;
  };
  // A running job's last epoch, durably: which trainer ("head",
  // "fine-tune"), the job's epochs so far and the trainer's state.
  struct Checkpoint {
    std::string kind;
    std::string examples;  // ExamplesDigest of the examples it trained on
    std::vector<EpochStats> epochs;
    std::string state;
  };
  static std::string CheckpointBlob(const std::string& id);
  // Which examples a run trains on, in order, by what identifies them in
  // any copy of the store (tlserve migrate renumbers ids): their names and
  // split hashes, hashed.
  static std::string ExamplesDigest(const std::vector<StoredExample>& examples);
  // The digest of checkpoints written before: their ids (still accepted).
  static std::string ExamplesDigestById(const std::vector<StoredExample>& examples);
  // `last` is the epoch the state ends (about to be reported). A failed
  // write is logged; the job goes on.
  void SaveCheckpoint(const std::string& id, const std::string& kind, const EpochStats& last,
                      const std::string& state);
  std::optional<Checkpoint> LoadCheckpoint(const std::string& id) const;
  void DeleteCheckpoint(const std::string& id) const;
  // The Resume a trainer of `kind` gets: saves go to the job's checkpoint;
  // the state is the checkpoint's when it is of this kind.
  Resume ResumeFor(const std::string& id, const std::string& kind,
                   const std::optional<Checkpoint>& from);
  void WorkerLoop();
  void Run(const std::string& id);
  absl::StatusOr<int> Train(const std::string& id);
  // Any exception of a run becomes its FAILED state (Contain).
  absl::StatusOr<int> TrainContained(const std::string& id);
  absl::StatusOr<std::vector<std::string>> ReadBytes(const std::vector<StoredExample>& examples,
                                                     const std::vector<int64_t>& indices) const;
  // Every example's features from the frozen backbone: the embedding, or
  // (`layer` >= 0) that stage's output average-pooled over space (`dim`
  // wide); cached per example and layer.
  absl::StatusOr<at::Tensor> Features(const std::string& id,
                                      const std::vector<StoredExample>& examples, int layer = -1,
                                      int64_t dim = 0);
  absl::StatusOr<TrainedHead> FitHead(const std::string& id, const JobRecord& r,
                                      const ModelInfo& info,
                                      const std::vector<StoredExample>& examples,
                                      const TrainOptions& options, bool warmup,
                                      Resume* resume = nullptr);
  // options.sweep: heads of every L2 strength on the same features, the
  // winner by cross-validation (the leaderboard streams in the job).
  // options.sweep: INVALID_ARGUMENT for a feature layer the backbone does not
  // have, RESOURCE_EXHAUSTED for a candidate head over --max_head_params.
  absl::Status CheckSweepHeads(const TrainOptions& o, const ModelInfo& info) const;
  // The sweep's winner (its shape in `spec`, its feature layer in
  // `feature_layer`: empty for the embedding).
  absl::StatusOr<TrainedHead> SweepHead(const std::string& id, const ModelInfo& info,
                                        const std::vector<StoredExample>& examples,
                                        const TrainOptions& options, HeadSpec* spec,
                                        std::string* feature_layer);
  absl::StatusOr<int> FineTuneJob(const std::string& id, const JobRecord& r, const ModelInfo& info,
                                  const std::vector<StoredExample>& examples,
                                  const std::optional<Checkpoint>& checkpoint);
  // Calibrates the trained head (of shape `spec`) on the validation split
  // (temperature, thresholds), decides whether it is served, and stores the
  // version.
  absl::StatusOr<int> StoreVersion(const std::string& id, const JobRecord& r, const ModelInfo& info,
                                   const std::vector<StoredExample>& examples,
                                   const torch::nn::Sequential& head, const HeadSpec& spec,
                                   const std::string& feature_layer,
                                   const StagePlan::Stages& stages, double train_accuracy,
                                   Evaluation validation);
  // options.serve: whether a new version with `accuracy` on the validation
  // split `val` is served; `why` says why (the job's outcome).
  // CANCELLED when the job is cancelled (or the server stops) meanwhile.
  absl::StatusOr<bool> ShouldServe(const std::string& id, const JobRecord& r,
                                   const std::vector<StoredExample>& val,
                                   const std::vector<int64_t>& val_labels, double accuracy,
                                   std::string* why);
  // Persists and tells the watchers; call without mu_ held.
  // Writes the job's record (unless `persist` is false: a record another
  // replica wrote) and tells its watchers.
  void Publish(const std::string& id, bool persist = true);
  // A serving-only replica: the job records as the replica running them
  // wrote them (all of them when `id` is empty), then their watchers told.
  void Follow(const std::string& id);
  // The runner's side of Recover: the jobs left unfinished resume or fail.
  absl::Status RecoverAsRunner();
  // A standby's: tries the job lock every half second; takes over with it.
  void StandBy();
  // The runner's of a shared database: checks its job lock every 2 s and
  // calls on_lost_lead_ when it is gone. Returns at stop or after the call.
  void WatchLead();
  // The runner's: carries out the cancel requests that other replicas left
  // ("cancel" records), now and whenever one arrives.
  void ListenForCancels();
  void TakeCancelRequests();
  static absl::StatusOr<JobRecord> ParseRecord(const std::string& key, const std::string& json);
  void Update(const std::string& id, const std::function<void(JobRecord&)>& change);
  bool Cancelled(const std::string& id);
  // Records an epoch in the job and the training metrics.
  // `epochs` (0: the job's) and `what` ("" or e.g. "head first: ") shape the
  // phase shown to watchers.
  std::function<void(const EpochStats&)> OnEpoch(const std::string& id, const JobRecord& r,
                                                 int epochs = 0, const std::string& what = "");
  void UpdateStateMetrics() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  Database* db_;
  DatasetCatalog* datasets_;
  ModelRegistry* models_;
  Engine* engine_;
  const Backbone* backbone_;
  Metrics* metrics_;
  const int64_t max_image_pixels_;
  const int64_t prefix_cache_bytes_;  // fine-tuning's, the same budget as the feature cache
  const int64_t prefix_cache_device_bytes_;
  const int train_threads_;
  const std::function<void(const std::string&)> before_step_;
  const DiskBudget* disk_;
  const bool checkpoints_;
  const bool run_jobs_;
  std::atomic<bool> leading_{false};
  absl::Mutex follow_mu_;                    // serialises Follow
  std::atomic<int> subscription_{0};         // while following the records (Database::Subscribe)
  std::atomic<int> cancel_subscription_{0};  // while leading: other replicas' cancel requests
  const std::function<void(const absl::Status&)> on_lost_lead_;
  std::thread standby_;  // StandBy, then WatchLead (or WatchLead alone)
  mutable absl::Mutex mu_;
  std::map<std::string, Job> jobs_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> queue_ ABSL_GUARDED_BY(mu_);
  // When each tenant's last job started (a sequence number): the worker
  // takes queued jobs by tenant in turns.
  std::map<std::string, int64_t> last_start_ ABSL_GUARDED_BY(mu_);
  int64_t starts_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  int next_token_ ABSL_GUARDED_BY(mu_) = 1;
  FeatureCache feature_cache_;           // worker thread only
  std::string current_examples_digest_;  // worker thread only: the running job's
  std::thread worker_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_JOBS_H_
