// Training jobs: queued -> running -> succeeded / failed / cancelled. The
// database's job queue is shared by every replica of a database; each runs
// up to --max_concurrent_jobs of them at once, on worker threads of its own,
// a client of the device engine at training priority (its forwards queue
// behind serving's), with its own LibTorch intra-op threads (--train_threads)
// and, on CUDA, its own low-priority stream. A run is contained: any
// exception (a CUDA out-of-memory included), error or non-finite loss fails
// that job with a message, and its model keeps its last good version. A job
// reads its dataset itself when it runs. A head-only job computes the frozen
// backbone's features of every example once, through the engine in large
// batches (cached in memory by backbone and example, up to a bound in
// bytes), fits the head on the device, and stores the best version. Every
// state change is written to the Database before watchers hear of it; a job
// left unfinished by a process that stopped or died resumes from its last
// checkpoint (options.resume) on whichever replica claims it, or fails as
// "interrupted". Records carry the job's options and every epoch, NaN losses
// included.
//
// Thread-safe.
#ifndef TLSERVE_SERVER_CORE_JOBS_H_
#define TLSERVE_SERVER_CORE_JOBS_H_

#include <atomic>
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
#include "absl/time/time.h"
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
    // How many jobs this replica runs at once (--max_concurrent_jobs), each
    // on a worker thread of its own; 0: a serving-only replica, which runs
    // none. The database's job queue (Database::ClaimJob) is shared by every
    // replica of a database: StartTraining through any of them queues the
    // job (durably, with its record), and a replica with a free worker
    // claims it and holds it by a lease it renews every lease/3. A replica
    // that dies (kill -9) or loses the database for longer than the lease
    // leaves its jobs to others, which resume them from their last
    // checkpoint; one that finds its lease lost stops the job at once and
    // writes nothing more of it. GetJob, ListJobs and WatchJob follow the
    // records of jobs other replicas run (LISTEN/NOTIFY); CancelJob ends a
    // job nobody holds at once, or leaves a request (a "cancel" record) that
    // the replica holding it hears and carries out.
    int max_concurrent_jobs = 1;
    absl::Duration lease = absl::Seconds(10);
    // Tests only: called before each training step of a fine-tune with the
    // model's name; what it throws fails that job.
    std::function<void(const std::string&)> before_step;
  };
  JobRunner(Database* db, DatasetCatalog* datasets, ModelRegistry* models, Engine* engine,
            Metrics* metrics, const Options& options);
  ~JobRunner();  // cancels what runs, then joins

  // Reads the jobs' records and starts the workers, which claim the jobs
  // left unfinished (by a previous process, or a replica that died) as they
  // claim new ones: those resume from their last checkpoint
  // (options.resume), or fail as interrupted. PostgreSQL: first attaches
  // this replica to the database (Database::AttachReplica).
  absl::Status Recover();
  // Who this replica is in the job queue (its leases' owner).
  const std::string& owner() const { return owner_; }

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
    // This replica holds the job's lease and runs it; otherwise its record
    // is another replica's (followed) or ended.
    bool owned = false;
    // The lease was lost while this replica ran it: it stops, writing
    // nothing more.
    bool lease_lost = false;
    std::string examples_digest;  // ExamplesDigest of the run's examples
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
  // A worker: claims a job whenever one may be free (a job queued here or
  // heard of, or every lease/2 for the leases of replicas that died) and
  // runs it.
  void WorkerLoop();
  // A job just claimed: runs it, or ends it (cancelled meanwhile, or
  // interrupted and not resumable, or already ended).
  void Take(const Database::QueuedJob& claim);
  // Renews the leases of the jobs this replica runs; the jobs whose lease
  // is lost stop.
  void RenewLoop();
  void LoseLease(const std::string& id, const std::string& why);
  // OK while this replica holds the job's lease (renewed with the database
  // now); CANCELLED, the job stopping, once it does not.
  absl::Status CheckLease(const std::string& id);
  // While this replica runs the job: its model is training (its other
  // changes refused here) and its dataset held (Release ends both).
  absl::Status Hold(const std::string& id);
  void Release(const std::string& id);
  void Wake();
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
  // Tells the job's watchers, after writing its record when this replica
  // runs it (fenced by its lease; a final state takes it out of the queue,
  // a paused one gives up its lease). Call without mu_ held.
  void Publish(const std::string& id);
  // The records of jobs other replicas run or ended (all of them when `id`
  // is empty), as they wrote them, then their watchers told.
  void Follow(const std::string& id);
  // SQLite, at start: the jobs a previous process left unfinished that may
  // not resume (resume_after_restart off, or cancelled) end now, failed as
  // interrupted or cancelled, before any new job runs.
  absl::Status EndInheritedJobs();
  // Carries out the cancel requests that other replicas left ("cancel"
  // records) for jobs this replica runs; drops those of ended jobs.
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
  const int max_concurrent_jobs_;
  const absl::Duration lease_;
  const std::string owner_;
  absl::Mutex follow_mu_;             // serialises Follow
  std::atomic<int> subscription_{0};  // Database::Subscribe
  std::thread renewer_;               // RenewLoop
  mutable absl::Mutex mu_;
  std::map<std::string, Job> jobs_ ABSL_GUARDED_BY(mu_);
  // When each tenant's last job started (a sequence number): the worker
  // takes queued jobs by tenant in turns.
  std::map<std::string, int64_t> last_start_ ABSL_GUARDED_BY(mu_);
  int64_t starts_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  int next_token_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t wakes_ ABSL_GUARDED_BY(mu_) = 0;  // the workers look for a job when it changes
  // The jobs whose model and dataset this replica holds (Hold).
  std::map<std::string, std::pair<std::string, std::string>> held_ ABSL_GUARDED_BY(mu_);
  FeatureCache feature_cache_;  // thread-safe
  std::vector<std::thread> workers_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_JOBS_H_
