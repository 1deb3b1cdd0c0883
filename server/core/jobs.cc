#include "server/core/jobs.h"

#include <ATen/ATen.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "server/core/catalog/tenant_key.h"
#include "server/core/contain.h"
#include "server/core/fine_tuner.h"
#include "server/core/image_decoder.h"
#include "server/core/log.h"
#include "server/core/metrics.h"
#include "server/core/preprocess.h"
#include "server/core/sha256.h"
#include "server/store/job_queue.h"

namespace tlserve {
namespace {

// JSON has no NaN: a non-finite number is stored as null and read back as NaN.
double Number(const nlohmann::json& j) {
  return j.is_number() ? j.get<double>() : std::numeric_limits<double>::quiet_NaN();
}

nlohmann::json OptionsToJson(const TrainOptions& o) {
  return {{"epochs", o.epochs},
          {"batch_size", o.batch_size},
          {"optimizer", static_cast<int>(o.optimizer)},
          {"learning_rate", o.learning_rate},
          {"weight_decay", o.weight_decay},
          {"label_smoothing", o.label_smoothing},
          {"balanced_class_weights", o.balanced_class_weights},
          {"early_stopping_patience", o.early_stopping_patience},
          {"validation_fraction", o.validation_fraction},
          {"seed", o.seed},
          {"stage_learning_rate", o.stage_learning_rate},
          {"augment", o.augment},
          {"freeze_batchnorm", o.freeze_batchnorm},
          {"head_first", o.head_first},
          {"serve", static_cast<int>(o.serve)},
          {"target_precision", o.target_precision},
          {"resume", o.resume},
          {"sweep", o.sweep},
          {"sweep_l2", o.sweep_l2},
          {"sweep_folds", o.sweep_folds},
          {"sweep_hidden", o.sweep_hidden},
          {"sweep_layers", o.sweep_layers},
          {"schedule", static_cast<int>(o.schedule)},
          {"warmup_fraction", o.warmup_fraction},
          {"layer_decay", o.layer_decay},
          {"gradual_unfreezing", o.gradual_unfreezing}};
}

TrainOptions OptionsFromJson(const nlohmann::json& j) {
  TrainOptions o;
  if (!j.is_object()) return o;  // records written before options were stored
  o.epochs = j.value("epochs", o.epochs);
  o.batch_size = j.value("batch_size", o.batch_size);
  o.optimizer = static_cast<TrainOptions::Optimizer>(j.value("optimizer", 0));
  o.learning_rate = j.value("learning_rate", o.learning_rate);
  o.weight_decay = j.value("weight_decay", o.weight_decay);
  o.label_smoothing = j.value("label_smoothing", o.label_smoothing);
  o.balanced_class_weights = j.value("balanced_class_weights", o.balanced_class_weights);
  o.early_stopping_patience = j.value("early_stopping_patience", o.early_stopping_patience);
  o.validation_fraction = j.value("validation_fraction", o.validation_fraction);
  o.seed = j.value("seed", o.seed);
  o.stage_learning_rate = j.value("stage_learning_rate", o.stage_learning_rate);
  o.augment = j.value("augment", o.augment);
  o.freeze_batchnorm = j.value("freeze_batchnorm", o.freeze_batchnorm);
  o.head_first = j.value("head_first", o.head_first);
  o.serve = static_cast<TrainOptions::Serve>(j.value("serve", 0));
  o.target_precision = j.value("target_precision", o.target_precision);
  // Jobs recorded before resumable jobs: as they were then, interrupted.
  o.resume = j.value("resume", false);
  o.sweep = j.value("sweep", false);
  o.sweep_l2 = j.value("sweep_l2", std::vector<double>{});
  o.sweep_folds = j.value("sweep_folds", o.sweep_folds);
  o.sweep_hidden = j.value("sweep_hidden", std::vector<int>{});
  o.sweep_layers = j.value("sweep_layers", std::vector<std::string>{});
  // Jobs recorded before the recipe ran with a constant rate, no decay.
  o.schedule = static_cast<TrainOptions::Schedule>(
      j.value("schedule", static_cast<int>(TrainOptions::Schedule::kConstant)));
  o.warmup_fraction = j.value("warmup_fraction", o.warmup_fraction);
  o.layer_decay = j.value("layer_decay", 1.0f);
  o.gradual_unfreezing = j.value("gradual_unfreezing", false);
  return o;
}

nlohmann::json EpochToJson(const EpochStats& e) {
  return {e.epoch,           e.train_loss,          e.train_accuracy,
          e.validation_loss, e.validation_accuracy, e.images_per_second,
          e.elapsed_seconds, e.eta_seconds};
}

EpochStats EpochFromJson(const nlohmann::json& e) {
  return {e.at(0).get<int>(), Number(e.at(1)), Number(e.at(2)), Number(e.at(3)),
          Number(e.at(4)),    Number(e.at(5)), Number(e.at(6)), Number(e.at(7))};
}

nlohmann::json LeaderboardToJson(const std::vector<SweepEntry>& board) {
  nlohmann::json out = nlohmann::json::array();
  for (const SweepEntry& e : board) {
    out.push_back({{"layer", e.layer},
                   {"l2", e.l2},
                   {"hidden", e.hidden},
                   {"params", e.params},
                   {"accuracy", e.accuracy},
                   {"accuracy_std", e.accuracy_std},
                   {"log_loss", e.log_loss},
                   {"seconds", e.seconds}});
  }
  return out;
}

std::vector<SweepEntry> LeaderboardFromJson(const nlohmann::json& j) {
  std::vector<SweepEntry> out;
  for (const auto& e : j) {
    SweepEntry s;
    s.layer = e.value("layer", 0);
    s.l2 = Number(e.at("l2"));
    s.hidden = e.value("hidden", std::vector<int>{});
    s.params = e.value("params", int64_t{0});
    s.accuracy = Number(e.at("accuracy"));
    s.accuracy_std = Number(e.at("accuracy_std"));
    s.log_loss = Number(e.at("log_loss"));
    s.seconds = Number(e.at("seconds"));
    out.push_back(std::move(s));
  }
  return out;
}

nlohmann::json ToJson(const JobRecord& r) {
  nlohmann::json epochs = nlohmann::json::array();
  for (const auto& e : r.epochs) epochs.push_back(EpochToJson(e));
  return {{"id", r.id},
          {"model", r.model},
          {"dataset", r.dataset},
          {"state", static_cast<int>(r.state)},
          {"phase", r.phase},
          {"epochs", epochs},
          {"error", r.error},
          {"version", r.version},
          {"created_unix", r.created_unix},
          {"outcome", r.outcome},
          {"cancel_requested", r.cancel_requested},
          {"leaderboard", LeaderboardToJson(r.leaderboard)},
          {"options", OptionsToJson(r.options)}};
}

JobRecord FromJson(const nlohmann::json& j) {
  JobRecord r;
  r.id = j.at("id");
  r.model = j.at("model");
  r.dataset = j.at("dataset");
  r.state = static_cast<JobRecord::State>(j.at("state").get<int>());
  r.phase = j.at("phase");
  r.error = j.at("error");
  r.version = j.at("version");
  r.created_unix = j.at("created_unix");
  r.outcome = j.value("outcome", "");
  r.cancel_requested = j.value("cancel_requested", false);
  if (j.contains("leaderboard")) r.leaderboard = LeaderboardFromJson(j.at("leaderboard"));
  r.options = OptionsFromJson(j.value("options", nlohmann::json()));
  for (const auto& e : j.at("epochs")) r.epochs.push_back(EpochFromJson(e));
  return r;
}

}  // namespace

const char* StateName(JobRecord::State s) {
  switch (s) {
    case JobRecord::State::kQueued:
      return "queued";
    case JobRecord::State::kRunning:
      return "running";
    case JobRecord::State::kSucceeded:
      return "succeeded";
    case JobRecord::State::kFailed:
      return "failed";
    case JobRecord::State::kCancelled:
      return "cancelled";
  }
  return "unknown";
}

namespace {

// Who this process is in the job queue: host, process and a random part (a
// restarted process is another owner).
std::string NewOwner() {
  char host[256] = {0};
  if (gethostname(host, sizeof(host) - 1) != 0) std::snprintf(host, sizeof(host), "unknown");
  std::random_device rd;
  return absl::StrFormat("%s/%d/%08x", host, static_cast<int>(getpid()), rd());
}

}  // namespace

JobRunner::JobRunner(Database* db, DatasetCatalog* datasets, ModelRegistry* models, Engine* engine,
                     Metrics* metrics, const Options& options)
    : db_(db),
      datasets_(datasets),
      models_(models),
      engine_(engine),
      backbone_(&engine->backbone()),
      metrics_(metrics),
      max_image_pixels_(options.max_image_pixels),
      prefix_cache_bytes_(options.feature_cache_bytes),
      prefix_cache_device_bytes_(options.prefix_cache_device_bytes),
      train_threads_(std::max(1, options.train_threads)),
      before_step_(options.before_step),
      disk_(options.disk),
      checkpoints_(options.checkpoints),
      max_concurrent_jobs_(std::max(0, options.max_concurrent_jobs)),
      lease_(std::max(options.lease, absl::Milliseconds(300))),
      owner_(NewOwner()),
      feature_cache_(options.feature_cache_bytes) {}

JobRunner::~JobRunner() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    for (auto& [id, job] : jobs_) {
      if (job.owned) job.cancel = true;
    }
  }
  if (int token = subscription_.exchange(0); token != 0) db_->Unsubscribe(token);
  // The workers end their jobs (paused to resume, or interrupted) while
  // their leases are still renewed.
  for (std::thread& w : workers_) w.join();
  if (renewer_.joinable()) renewer_.join();
}

absl::StatusOr<JobRecord> JobRunner::ParseRecord(const std::string& key, const std::string& json) {
  const auto j = nlohmann::json::parse(json, nullptr, false);
  if (j.is_discarded())
    return absl::DataLossError(absl::StrCat("job record ", key, " is not JSON"));
  try {
    return FromJson(j);
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat("job record ", key, " is corrupt: ", e.what()));
  }
}

void JobRunner::Follow(const std::string& id) {
  // One follow at a time (the listener's, a WatchJob's, the start's): a
  // record read earlier never lands on top of one read later.
  absl::MutexLock follow(&follow_mu_);
  std::vector<std::pair<std::string, std::string>> records;
  if (id.empty()) {
    auto all = db_->ListRecords("job");
    if (!all.ok()) {
      LogWarning("cannot reread the jobs: %s", all.status().ToString());
      return;
    }
    records = std::move(*all);
  } else {
    auto json = db_->GetRecord("job", id);
    if (!json.ok()) return;  // deleted, or unreadable now: the next change rereads it
    records.emplace_back(id, std::move(*json));
  }
  std::vector<std::string> changed;
  bool queued = false;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [key, json] : records) {
      auto record = ParseRecord(key, json);
      if (!record.ok()) continue;
      Job& job = jobs_[key];
      if (job.owned) continue;  // this replica writes it
      job.record = std::move(*record);
      changed.push_back(key);
      queued = queued || job.record.state == JobRecord::State::kQueued;
    }
    UpdateStateMetrics();
  }
  if (queued) Wake();  // one for this replica's workers to claim
  for (const auto& key : changed) Publish(key);
}

absl::Status JobRunner::Hold(const std::string& id) {
  std::string model, dataset;
  {
    absl::MutexLock lock(&mu_);
    if (held_.count(id) > 0) return absl::OkStatus();
    model = jobs_.at(id).record.model;
    dataset = jobs_.at(id).record.dataset;
    held_[id] = {model, dataset};  // first: a Hold of the same job at once holds nothing twice
  }
  if (absl::Status s = models_->BeginTraining(model); !s.ok()) {
    absl::MutexLock lock(&mu_);
    held_.erase(id);
    return s;
  }
  datasets_->Acquire(dataset);
  return absl::OkStatus();
}

void JobRunner::Release(const std::string& id) {
  std::pair<std::string, std::string> what;
  {
    absl::MutexLock lock(&mu_);
    auto it = held_.find(id);
    if (it == held_.end()) return;
    what = it->second;
    held_.erase(it);
  }
  models_->EndTraining(what.first);
  datasets_->Release(what.second);
}

void JobRunner::Wake() {
  absl::MutexLock lock(&mu_);
  ++wakes_;
}

absl::Status JobRunner::Recover() {
  if (absl::Status s = db_->AttachReplica(); !s.ok()) return s;
  // SQLite: one process owns the store, so its jobs may be queued from
  // their records (a store written before the queue existed).
  if (std::string(db_->kind()) == "sqlite") {
    auto queued = QueueUnfinishedJobs(*db_);
    if (!queued.ok()) return queued.status();
    if (absl::Status s = EndInheritedJobs(); !s.ok()) return s;
  }
  subscription_ = db_->Subscribe([this](const std::string& kind, const std::string& key) {
    if (kind.empty() || kind == "job") Follow(key);
    if (kind.empty() || kind == "cancel") TakeCancelRequests();
  });
  Follow("");
  TakeCancelRequests();
  for (int i = 0; i < max_concurrent_jobs_; ++i) {
    workers_.emplace_back([this] { WorkerLoop(); });
  }
  if (max_concurrent_jobs_ > 0) renewer_ = std::thread([this] { RenewLoop(); });
  return absl::OkStatus();
}

absl::Status JobRunner::EndInheritedJobs() {
  auto queued = db_->ListQueuedJobs();
  if (!queued.ok()) return queued.status();
  for (const Database::QueuedJob& q : *queued) {
    auto json = db_->GetRecord("job", q.id);
    if (!json.ok()) continue;  // dropped when claimed
    auto r = ParseRecord(q.id, *json);
    if (!r.ok() || r->final() || (r->options.resume && !r->cancel_requested)) continue;
    if (r->cancel_requested) {
      r->state = JobRecord::State::kCancelled;
      r->phase = "cancelled (the server stopped before the job noticed)";
    } else {
      r->state = JobRecord::State::kFailed;
      r->error =
          "interrupted: the server stopped while the job was unfinished (resume_after_restart "
          "was off)";
      r->phase = "failed";
    }
    auto ended = db_->EndUnclaimedJob(q.id, owner_, ToJson(*r).dump());
    if (!ended.ok()) return ended.status();
    DeleteCheckpoint(q.id);
  }
  return absl::OkStatus();
}

void JobRunner::TakeCancelRequests() {
  auto requests = db_->ListRecords("cancel");
  if (!requests.ok()) {
    LogError("cannot read the cancel requests (taken at the next change): %s",
             requests.status().ToString());
    return;
  }
  for (const auto& [id, json] : *requests) {
    bool owned = false, ended = false;
    {
      absl::MutexLock lock(&mu_);
      auto it = jobs_.find(id);
      owned = it != jobs_.end() && it->second.owned && !it->second.lease_lost;
      ended = it != jobs_.end() && !it->second.owned && it->second.record.final();
    }
    if (!owned && !ended) continue;  // another replica's to carry out (or its claimer's)
    if (owned) {
      auto r = Cancel(id);
      if (!r.ok() && r.status().code() != absl::StatusCode::kNotFound) {
        LogError("cannot cancel job %s as another replica asked: %s", id, r.status().ToString());
        continue;  // kept: tried again at the next change
      }
      LogInfo("job %s: cancelled as another replica asked", id);
    }
    if (absl::Status s = db_->DeleteRecords("cancel", id); !s.ok()) {
      LogError("cannot delete the cancel request of job %s: %s", id, s.ToString());
    }
  }
}

void JobRunner::WorkerLoop() {
  // Training's own threads and (on CUDA) its own low-priority stream, so
  // that serving keeps its cores and its stream.
  at::set_num_threads(train_threads_);
  engine_->streams().BindTraining();
  int64_t seen = -1;
  int failures = 0;
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      // A job queued here or heard of wakes the workers; the leases of
      // replicas that died run out unheard, so they also look every lease/2.
      auto woken = [this, &seen]()
                       ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_ || wakes_ != seen; };
      mu_.AwaitWithTimeout(absl::Condition(&woken), lease_ / 2);
      if (stopping_) return;
      seen = wakes_;
    }
    auto claim =
        db_->ClaimJob(owner_, lease_, [this](const std::vector<Database::QueuedJob>& free) {
          // Tenants take turns: the job of the tenant
          // whose last job started here longest ago (or
          // never), oldest first within a tenant.
          absl::MutexLock lock(&mu_);
          size_t next = 0;
          int64_t best = INT64_MAX;
          for (size_t i = 0; i < free.size(); ++i) {
            auto last = last_start_.find(free[i].tenant);
            const int64_t when = last == last_start_.end() ? -1 : last->second;
            if (when < best) {
              best = when;
              next = i;
            }
          }
          last_start_[free[next].tenant] = ++starts_;
          return next;
        });
    if (!claim.ok()) {
      if (failures++ % 30 == 0) {
        LogError("cannot claim jobs (retrying): %s", claim.status().ToString());
      }
      continue;
    }
    failures = 0;
    if (!claim->has_value()) continue;
    Wake();  // more may be waiting: the other workers look too
    Take(**claim);
    Wake();  // a worker is free again
  }
}

void JobRunner::Take(const Database::QueuedJob& claim) {
  const std::string& id = claim.id;
  auto give_back = [&] {
    if (absl::Status s = db_->PutClaimedJob(id, owner_, "", Database::JobEnd::kRelease); !s.ok()) {
      LogError(
          "job %s: cannot give its lease back (another replica takes it when the lease runs "
          "out): %s",
          id, s.ToString());
    }
  };
  bool stopping;
  {
    absl::MutexLock lock(&mu_);
    // This replica's own job, claimed again while its earlier run, which
    // lost the lease, still winds down: that run ends first.
    auto ended = [this, &id]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      auto it = jobs_.find(id);
      return stopping_ || it == jobs_.end() || !it->second.owned;
    };
    mu_.Await(absl::Condition(&ended));
    stopping = stopping_;
  }
  if (stopping) {
    give_back();  // claimed as the server stops: for whoever runs next
    return;
  }
  auto json = db_->GetRecord("job", id);
  absl::StatusOr<JobRecord> parsed =
      json.ok() ? ParseRecord(id, *json) : absl::StatusOr<JobRecord>(json.status());
  if (!parsed.ok() && parsed.status().code() != absl::StatusCode::kNotFound &&
      parsed.status().code() != absl::StatusCode::kDataLoss) {
    LogError("job %s: cannot read it now (%s); left for the next claim", id,
             parsed.status().ToString());
    give_back();
    return;
  }
  if (!parsed.ok() || parsed->final()) {
    if (!parsed.ok()) LogError("job %s: dropped from the queue: %s", id, parsed.status().message());
    if (absl::Status s = db_->PutClaimedJob(id, owner_, "", Database::JobEnd::kFinish); !s.ok()) {
      LogError("job %s: cannot drop it from the queue: %s", id, s.ToString());
    }
    return;
  }
  JobRecord r = std::move(*parsed);
  const bool cancel_requested = r.cancel_requested || db_->GetRecord("cancel", id).ok();
  const bool interrupted = claim.claims > 0;
  {
    absl::MutexLock lock(&mu_);
    Job& job = jobs_[id];  // watchers of the job followed until now keep watching it
    job.record = r;
    job.owned = true;
    job.cancel = false;
    job.lease_lost = false;
    UpdateStateMetrics();
  }
  absl::Status held = absl::OkStatus();
  if (cancel_requested) {
    held = absl::CancelledError("");
  } else if (interrupted && !r.options.resume) {
    held = absl::AbortedError("");
  } else {
    held = Hold(id);  // the model busy and the dataset held while it runs here
  }
  if (!held.ok()) {
    {
      absl::MutexLock lock(&mu_);
      JobRecord& rec = jobs_.at(id).record;
      if (held.code() == absl::StatusCode::kCancelled) {
        rec.state = JobRecord::State::kCancelled;
        rec.cancel_requested = true;
        rec.phase = "cancelled before it resumed";
      } else if (held.code() == absl::StatusCode::kAborted) {
        rec.state = JobRecord::State::kFailed;
        rec.error =
            "interrupted: the server running it stopped while the job was unfinished "
            "(resume_after_restart was off)";
        rec.phase = "failed";
      } else {
        rec.state = JobRecord::State::kFailed;
        rec.error = absl::StrCat("cannot run: ", held.message());
        rec.phase = "failed";
      }
      UpdateStateMetrics();
    }
    DeleteCheckpoint(id);
    Release(id);
    Publish(id);
    std::string phase;
    {
      absl::MutexLock lock(&mu_);
      jobs_.at(id).owned = false;
      phase = jobs_.at(id).record.phase;
    }
    if (cancel_requested) (void)db_->DeleteRecords("cancel", id);
    LogInfo("job %s: %s", id, phase);
    return;
  }
  if (interrupted) {
    LogInfo("job %s: left unfinished where it ran before (claims so far: %d); resuming it here", id,
            claim.claims);
  }
  Run(id);
}

void JobRunner::RenewLoop() {
  absl::Time last_ok = absl::Now();
  for (;;) {
    std::vector<std::string> owned;
    {
      absl::MutexLock lock(&mu_);
      // Until the workers are gone: they end their jobs under a lease.
      auto done = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        if (!stopping_) return false;
        for (const auto& [id, job] : jobs_) {
          if (job.owned) return false;
        }
        return true;
      };
      if (mu_.AwaitWithTimeout(absl::Condition(&done), lease_ / 3)) return;
      for (const auto& [id, job] : jobs_) {
        if (job.owned && !job.lease_lost && !job.record.final()) owned.push_back(id);
      }
    }
    if (owned.empty()) {
      last_ok = absl::Now();
      continue;
    }
    const absl::Time asked = absl::Now();  // the lease counts from about now, not from the reply
    auto held = db_->RenewJobLeases(owner_, lease_, owned);
    if (!held.ok()) {
      LogError("cannot renew the leases of this replica's jobs: %s", held.status().ToString());
      // Out of reach for longer than a lease: another replica may hold them now.
      if (absl::Now() - last_ok > lease_) {
        for (const auto& id : owned) LoseLease(id, "the database was out of reach for too long");
      }
      continue;
    }
    last_ok = asked;
    std::set<std::string> kept(held->begin(), held->end());
    for (const auto& id : owned) {
      if (kept.count(id) == 0) LoseLease(id, "another replica claimed it");
    }
  }
}

absl::Status JobRunner::CheckLease(const std::string& id) {
  auto held = db_->RenewJobLeases(owner_, lease_, {id});
  if (held.ok() && held->size() == 1) return absl::OkStatus();
  if (held.ok()) LoseLease(id, "another replica claimed it");
  // Out of reach: the version waits for the database (the job fails, and
  // another replica resumes it if this one's lease runs out meanwhile).
  return held.ok() ? absl::CancelledError("the job was claimed by another replica") : held.status();
}

void JobRunner::LoseLease(const std::string& id, const std::string& why) {
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end() || !it->second.owned || it->second.lease_lost) return;
    // Ended (out of the queue) or paused by the stop (its lease given up).
    if (it->second.record.final() ||
        (stopping_ && it->second.record.state == JobRecord::State::kQueued)) {
      return;
    }
    it->second.lease_lost = true;
    it->second.cancel = true;
  }
  LogError(
      "job %s: this replica lost its lease (%s); it stops the job and writes nothing more of it",
      id, why);
}

std::string JobRunner::ExamplesDigest(const std::vector<StoredExample>& examples) {
  std::string key;
  for (const StoredExample& e : examples) absl::StrAppend(&key, e.name, "\n", e.hash, "\n");
  return absl::StrCat("names:", examples.size(), ":", Sha256Hex(key));
}

std::string JobRunner::ExamplesDigestById(const std::vector<StoredExample>& examples) {
  std::string ids;
  for (const StoredExample& e : examples) absl::StrAppend(&ids, e.id, ",");
  return absl::StrCat(examples.size(), ":", std::hash<std::string>()(ids));
}

std::string JobRunner::CheckpointBlob(const std::string& id) {
  return absl::StrCat("checkpoints/", id, ".ckpt");
}

void JobRunner::SaveCheckpoint(const std::string& id, const std::string& kind,
                               const EpochStats& last, const std::string& state) {
  if (!checkpoints_) return;
  {
    absl::MutexLock lock(&mu_);
    if (jobs_.at(id).lease_lost) return;  // the new holder's checkpoints are its own
  }
  nlohmann::json epochs = nlohmann::json::array();
  std::string examples_digest;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& e : jobs_.at(id).record.epochs) epochs.push_back(EpochToJson(e));
    examples_digest = jobs_.at(id).examples_digest;
  }
  epochs.push_back(EpochToJson(last));  // reported right after this save
  const std::string header =
      nlohmann::json{{"kind", kind}, {"examples", examples_digest}, {"epochs", epochs}}.dump();
  absl::Status s = disk_ != nullptr ? disk_->Check(static_cast<int64_t>(state.size()) * 2,
                                                   "a job's checkpoint", DiskBudget::Into::kFile)
                                    : absl::OkStatus();
  if (s.ok()) s = db_->PutBlob(CheckpointBlob(id), absl::StrCat(header, "\n", state));
  // The run goes on without it: a restart would resume from an earlier one.
  if (!s.ok()) LogWarning("job %s: cannot write its checkpoint: %s", id, s.ToString());
}

std::optional<JobRunner::Checkpoint> JobRunner::LoadCheckpoint(const std::string& id) const {
  if (!checkpoints_) return std::nullopt;
  auto bytes = db_->GetBlob(CheckpointBlob(id));
  if (!bytes.ok()) {
    if (bytes.status().code() != absl::StatusCode::kNotFound) {
      LogWarning("job %s: cannot read its checkpoint (%s); it starts over", id,
                 bytes.status().ToString());
    }
    return std::nullopt;
  }
  const size_t newline = bytes->find('\n');
  const std::string header = bytes->substr(0, newline);
  const auto j = nlohmann::json::parse(header, nullptr, false);
  if (j.is_discarded() || !j.contains("kind") || !j.contains("epochs")) {
    LogWarning("job %s: its checkpoint is unreadable; it starts over", id);
    return std::nullopt;
  }
  Checkpoint c;
  c.kind = j.at("kind").get<std::string>();
  c.examples = j.value("examples", "");
  for (const auto& e : j.at("epochs")) c.epochs.push_back(EpochFromJson(e));
  if (newline != std::string::npos) c.state = bytes->substr(newline + 1);
  return c;
}

void JobRunner::DeleteCheckpoint(const std::string& id) const {
  if (checkpoints_) (void)db_->DeleteBlob(CheckpointBlob(id));
}

absl::Status JobRunner::CheckSweepHeads(const TrainOptions& o, const ModelInfo& info) const {
  // A plain sweep trains the model's own head on the embedding, which was
  // checked when the model was made.
  if (!o.sweep || (o.sweep_layers.empty() && o.sweep_hidden.empty())) return absl::OkStatus();
  std::vector<int64_t> input_dims = {backbone_->embedding_dim()};
  if (!o.sweep_layers.empty()) input_dims.clear();
  for (const std::string& layer : o.sweep_layers) {
    auto resolved_layer = models_->ResolveFeatureLayer(layer == "embedding" ? "" : layer);
    if (!resolved_layer.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("options.sweep.layers: ", resolved_layer.status().message()));
    }
    input_dims.push_back(resolved_layer->dim);
  }
  std::vector<std::vector<int>> shapes = {info.head.hidden};
  if (!o.sweep_hidden.empty()) shapes.clear();
  for (int width : o.sweep_hidden) {
    shapes.push_back(width == 0 ? std::vector<int>{} : std::vector<int>{width});
  }
  for (int64_t dim : input_dims) {
    for (const std::vector<int>& hidden : shapes) {
      const int64_t params =
          HeadParams(HeadSpec{hidden, 0.0f}, dim, static_cast<int64_t>(info.classes.size()));
      if (params > models_->limits().max_head_params) {
        return absl::ResourceExhaustedError(
            absl::StrCat("options.sweep: a head ",
                         hidden.empty() ? "(linear)" : absl::StrCat("of width ", hidden[0]), " on ",
                         dim, " features has ", params, " parameters, over the limit of ",
                         models_->limits().max_head_params, " (--max_head_params)"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<JobRecord> JobRunner::Start(const std::string& model, const std::string& dataset,
                                           const TrainOptions& options) {
  if (max_concurrent_jobs_ == 0 && std::string(db_->kind()) == "sqlite") {
    return absl::FailedPreconditionError(
        "this server runs no jobs (--max_concurrent_jobs=0) and no other replica shares its "
        "database: start it with --max_concurrent_jobs=1 to train");
  }
  if (absl::Status s = DatasetCatalog::ValidateName(dataset, "dataset"); !s.ok()) return s;
  auto info = models_->Get(model);
  if (!info.ok()) return info.status();
  if (disk_ != nullptr) {
    // The job's record and its epochs; its version's weights are checked
    // when it is written.
    if (absl::Status s = disk_->Check(1 << 20, "a training job"); !s.ok()) return s;
  }
  auto resolved = ResolveTrainOptions(options, info->head, !info->private_stages.empty());
  if (!resolved.ok()) return resolved.status();
  // A sweep: every candidate's head within --max_head_params (each feature
  // layer's width into each shape).
  if (absl::Status s = CheckSweepHeads(*resolved, *info); !s.ok()) return s;
  auto examples = db_->ListExamples(dataset);
  if (!examples.ok()) return examples.status();
  if (examples->empty()) {
    return absl::FailedPreconditionError(absl::StrCat("dataset \"", dataset, "\" is empty"));
  }
  std::map<std::string, int> train_counts;
  for (const auto& c : info->classes) train_counts[c] = 0;
  for (const auto& e : *examples) {
    if (e.label.empty()) continue;  // the unlabelled pool does not train
    auto it = train_counts.find(e.label);
    if (it == train_counts.end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("dataset \"", dataset, "\" has class \"", e.label, "\", which model \"",
                       model, "\" does not have; create the model with --dataset ", dataset));
    }
    if (!DatasetCatalog::IsValidation(e.hash, resolved->validation_fraction)) ++it->second;
  }
  for (const auto& [label, n] : train_counts) {
    if (n == 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("class \"", label, "\" has no training examples in dataset \"", dataset,
                       "\" after the validation split; upload more images of it"));
    }
  }
  JobRecord r;
  std::random_device rd;
  r.id = absl::StrFormat("job-%08x%08x", rd(), rd());
  r.model = model;
  r.dataset = dataset;
  r.options = *resolved;
  r.created_unix = static_cast<int64_t>(std::time(nullptr));
  r.phase = "queued";
  // One unfinished job per model, here (a clear message at once) and across
  // replicas (the queue's own rule, in the same transaction as the record).
  if (info->training) {
    return absl::FailedPreconditionError(
        absl::StrCat("model \"", model, "\" is already training; wait for or cancel that job"));
  }
  Database::QueuedJob queued;
  queued.id = r.id;
  queued.model = model;
  queued.tenant = TenantOf(model);
  if (absl::Status s = db_->QueueJob(queued, ToJson(r).dump()); !s.ok()) {
    if (s.code() != absl::StatusCode::kAlreadyExists) return s;
    return absl::FailedPreconditionError(absl::StrCat("model \"", model, "\" is already training (",
                                                      s.message(),
                                                      "); wait for or cancel that job"));
  }
  {
    absl::MutexLock lock(&mu_);
    Job job;
    job.record = r;
    jobs_.emplace(r.id, std::move(job));  // a worker may have claimed (or ended) it already
    UpdateStateMetrics();
  }
  Wake();
  LogInfo("job %s: train model %s on dataset %s queued", r.id, model, dataset);
  return r;
}

absl::StatusOr<JobRecord> JobRunner::Get(const std::string& id) const {
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (it != jobs_.end()) return it->second.record;
  }
  // Started on another replica a moment ago: its record may be in the
  // database before its notification is here. (Filling the cache of records
  // followed is not a change of this runner's state.)
  const_cast<JobRunner*>(this)->Follow(id);
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end())
    return absl::NotFoundError(absl::StrCat("job \"", Bounded(id), "\" does not exist"));
  return it->second.record;
}

std::vector<JobRecord> JobRunner::List(const std::string& model) const {
  absl::MutexLock lock(&mu_);
  std::vector<JobRecord> out;
  for (const auto& [id, job] : jobs_) {
    if (model.empty() || job.record.model == model) out.push_back(job.record);
  }
  std::sort(out.begin(), out.end(),
            [](const auto& a, const auto& b) { return a.created_unix < b.created_unix; });
  return out;
}

absl::StatusOr<JobRecord> JobRunner::Cancel(const std::string& id) {
  // When this replica runs it: flagged, and the flag written before it is
  // acknowledged (a stop or a crash before the job notices must not resume
  // it); the job ends at its next check, asynchronously.
  enum { kNotHere, kFlagged, kEnded };
  auto cancel_here = [this, &id]() {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end() || !it->second.owned || it->second.lease_lost) return kNotHere;
    if (it->second.record.final()) return kEnded;
    it->second.cancel = true;
    it->second.record.cancel_requested = true;
    return kFlagged;
  };
  auto here = cancel_here();
  if (here != kNotHere) {
    if (here == kFlagged) Publish(id);
    return Get(id);
  }
  auto r = Get(id);
  if (!r.ok() || r->final()) return r;
  // Nobody holds it (queued, paused, or its replica died): it ends here, now.
  JobRecord cancelled = *r;
  cancelled.state = JobRecord::State::kCancelled;
  cancelled.cancel_requested = true;
  cancelled.phase = r->epochs.empty() ? "cancelled before it started" : "cancelled while paused";
  auto ended = db_->EndUnclaimedJob(id, owner_, ToJson(cancelled).dump());
  if (!ended.ok()) return ended.status();
  if (*ended) {
    DeleteCheckpoint(id);  // a job paused by a stop has one
    Follow(id);
    return Get(id);
  }
  here = cancel_here();  // claimed by a worker of this replica meanwhile
  if (here != kNotHere) {
    if (here == kFlagged) Publish(id);
    return Get(id);
  }
  // Another replica runs it: a request, durable before it is acknowledged,
  // that the replica hears (now, or whichever claims the job next).
  if (absl::Status s = db_->PutRecord("cancel", id, "{}"); !s.ok()) return s;
  r->cancel_requested = true;
  return r;
}

absl::StatusOr<int> JobRunner::Watch(const std::string& id,
                                     std::function<void(const JobRecord&)> update) {
  JobRecord now;
  int token;
  bool known;
  {
    absl::MutexLock lock(&mu_);
    known = jobs_.count(id) > 0;
  }
  // Started on another replica a moment ago: its record may be here before
  // its notification.
  if (!known) Follow(id);
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) {
      return absl::NotFoundError(absl::StrCat("job \"", Bounded(id), "\" does not exist"));
    }
    token = next_token_++;
    now = it->second.record;
    if (!now.final()) it->second.watchers[token] = update;
  }
  update(now);
  return token;
}

void JobRunner::Unwatch(const std::string& id, int token) {
  absl::MutexLock lock(&mu_);
  if (auto it = jobs_.find(id); it != jobs_.end()) it->second.watchers.erase(token);
}

void JobRunner::Publish(const std::string& id) {
  JobRecord r;
  bool owned, paused;
  std::vector<std::function<void(const JobRecord&)>> watchers;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return;
    Job& job = it->second;
    if (job.lease_lost) return;  // the replica that holds it now writes and tells
    r = job.record;
    owned = job.owned;
    paused = owned && stopping_ && r.state == JobRecord::State::kQueued;
    for (const auto& [token, w] : job.watchers) watchers.push_back(w);
    if (r.final()) job.watchers.clear();
  }
  if (owned) {
    const auto end = r.final() ? Database::JobEnd::kFinish
                     : paused  ? Database::JobEnd::kRelease
                               : Database::JobEnd::kKeep;
    absl::Status s = db_->PutClaimedJob(id, owner_, ToJson(r).dump(), end);
    // How a job ended must reach the database (or, after a crash, it would
    // run again): retried while the database is out of reach, for as long as
    // the lease would last.
    for (absl::Time until = absl::Now() + lease_; end != Database::JobEnd::kKeep && !s.ok() &&
                                                  s.code() != absl::StatusCode::kAborted &&
                                                  absl::Now() < until;) {
      absl::SleepFor(absl::Milliseconds(250));
      s = db_->PutClaimedJob(id, owner_, ToJson(r).dump(), end);
    }
    if (s.code() == absl::StatusCode::kAborted) {
      LoseLease(id, std::string(s.message()));
      return;
    }
    if (!s.ok()) LogError("job %s: cannot persist its state: %s", id, s.ToString());
  }
  for (const auto& w : watchers) w(r);
}

void JobRunner::Update(const std::string& id, const std::function<void(JobRecord&)>& change) {
  {
    absl::MutexLock lock(&mu_);
    change(jobs_.at(id).record);
    UpdateStateMetrics();
  }
  Publish(id);
}

std::function<void(const EpochStats&)> JobRunner::OnEpoch(const std::string& id, const JobRecord& r,
                                                          int epochs, const std::string& what) {
  if (epochs == 0) epochs = r.options.epochs;
  return [this, id, model = r.model, epochs, what](const EpochStats& s) {
    if (metrics_) {
      metrics_->SetTrainingEpoch(model, s.train_loss, s.train_accuracy, s.validation_accuracy);
    }
    Update(id, [&](JobRecord& rec) {
      rec.epochs.push_back(s);
      rec.phase = absl::StrCat(what, "epoch ", s.epoch, "/", epochs);
    });
  };
}

bool JobRunner::Cancelled(const std::string& id) {
  absl::MutexLock lock(&mu_);
  return jobs_.at(id).cancel;
}

void JobRunner::UpdateStateMetrics() {
  if (metrics_ == nullptr) return;
  std::map<JobRecord::State, int> counts;
  for (const auto& [id, job] : jobs_) ++counts[job.record.state];
  for (auto s :
       {JobRecord::State::kQueued, JobRecord::State::kRunning, JobRecord::State::kSucceeded,
        JobRecord::State::kFailed, JobRecord::State::kCancelled}) {
    metrics_->SetTrainingJobs(StateName(s), counts[s]);
  }
}

absl::StatusOr<int> JobRunner::TrainContained(const std::string& id) {
  return Contain("training failed", [&] { return Train(id); });
}

void JobRunner::Run(const std::string& id) {
  Update(id, [](JobRecord& r) {
    r.state = JobRecord::State::kRunning;
    r.phase = "starting";
  });
  auto version = TrainContained(id);
  bool stopping, resumable, lost;
  {
    absl::MutexLock lock(&mu_);
    stopping = stopping_;
    Job& job = jobs_.at(id);
    resumable = job.record.options.resume && !job.record.cancel_requested;
    lost = job.lease_lost;
    if (lost) {
      // Another replica holds it now: what it writes is the job's record.
      job.owned = false;
      job.lease_lost = false;
    }
  }
  if (lost) {
    LogError("job %s: stopped here (%s); it goes on where its lease is", id,
             version.ok() ? absl::StrCat("its version ", *version, " was stored first")
                          : version.status().ToString());
    std::string model;
    {
      absl::MutexLock lock(&mu_);
      model = jobs_.at(id).record.model;
    }
    Release(id);
    // The versions the replica that holds the job now publishes: read, as
    // the model's changes were not while it trained here.
    models_->Refresh(model);
    Follow(id);
    return;
  }
  // A job that ends for good loses its checkpoint before anyone hears it
  // ended; one paused by the stop keeps it.
  const bool paused = !version.ok() && version.status().code() == absl::StatusCode::kCancelled &&
                      stopping && resumable;
  if (!paused) DeleteCheckpoint(id);
  // Released before the final state is published: a client that sees the
  // job end may start the model's next job at once.
  Release(id);
  Update(id, [&](JobRecord& r) {
    if (version.ok()) {
      r.state = JobRecord::State::kSucceeded;
      r.version = *version;
      r.phase = absl::StrCat("done: version ", *version);
    } else if (paused) {
      // Not final: the next start resumes it from its last checkpoint.
      r.state = JobRecord::State::kQueued;
      r.phase =
          "paused: the server stopped; it resumes from its last checkpoint after a restart (or on "
          "another replica of its database)";
    } else if (version.status().code() == absl::StatusCode::kCancelled && stopping) {
      r.state = JobRecord::State::kFailed;
      r.error = "interrupted: the server stopped while the job ran";
      r.phase = "failed";
    } else if (version.status().code() == absl::StatusCode::kCancelled) {
      r.state = JobRecord::State::kCancelled;
      r.phase = "cancelled";
    } else {
      r.state = JobRecord::State::kFailed;
      r.error = std::string(version.status().message());
      r.phase = "failed";
    }
  });
  {
    absl::MutexLock lock(&mu_);
    jobs_.at(id).owned = false;  // ended here, or paused for anyone to resume
  }
  LogInfo(
      "job %s: %s", id,
      version.ok() ? absl::StrCat("succeeded, version ", *version) : version.status().ToString());
}

}  // namespace tlserve
