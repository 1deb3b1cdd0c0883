#include "server/core/jobs.h"

#include <ATen/ATen.h>
#include <torch/torch.h>

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
      run_jobs_(options.run_jobs),
      on_lost_lead_(options.on_lost_lead),
      feature_cache_(options.feature_cache_bytes) {
  worker_ = std::thread([this] { WorkerLoop(); });
}

JobRunner::~JobRunner() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    for (auto& [id, job] : jobs_) job.cancel = true;
  }
  if (standby_.joinable()) standby_.join();
  if (int token = subscription_.exchange(0); token != 0) db_->Unsubscribe(token);
  if (int token = cancel_subscription_.exchange(0); token != 0) db_->Unsubscribe(token);
  worker_.join();
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
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [key, json] : records) {
      auto record = ParseRecord(key, json);
      if (!record.ok()) continue;
      jobs_[key].record = std::move(*record);
      changed.push_back(key);
    }
    UpdateStateMetrics();
  }
  for (const auto& key : changed) Publish(key, /*persist=*/false);
}

absl::Status JobRunner::Recover() {
  if (run_jobs_) {
    auto lead = db_->TryLeadJobs();
    // A runner that just died (a restart after kill -9) holds the lock until
    // its database server sees its connection closed: a few seconds' grace.
    for (absl::Time end = absl::Now() + absl::Seconds(5);
         lead.ok() && !*lead && absl::Now() < end;) {
      absl::SleepFor(absl::Milliseconds(100));
      lead = db_->TryLeadJobs();
    }
    if (!lead.ok()) return lead.status();
    if (*lead) {
      leading_ = true;
      if (absl::Status s = RecoverAsRunner(); !s.ok()) return s;
      ListenForCancels();
      standby_ = std::thread([this] { WatchLead(); });
      return absl::OkStatus();
    }
    LogInfo("another replica runs the jobs of this database: this one stands by to take over");
  }
  // Not the runner: the records are another replica's to change; follow them.
  subscription_ = db_->Subscribe([this](const std::string& kind, const std::string& key) {
    if (kind.empty() || kind == "job") Follow(key);
  });
  Follow("");
  if (run_jobs_) standby_ = std::thread([this] { StandBy(); });
  return absl::OkStatus();
}

void JobRunner::StandBy() {
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      if (mu_.AwaitWithTimeout(absl::Condition(&stopping_), absl::Milliseconds(500))) return;
    }
    auto lead = db_->TryLeadJobs();
    if (!lead.ok() || !*lead) continue;
    if (int token = subscription_.exchange(0); token != 0) db_->Unsubscribe(token);
    LogInfo("this replica now runs the jobs of this database: resuming what was left");
    // Recovered before it takes new jobs (a StartTraining meanwhile would
    // take a model whose job is about to resume); retried while the
    // database is out of reach, holding the lock.
    for (;;) {
      absl::Status s = RecoverAsRunner();
      if (s.ok()) break;
      LogError("cannot take over the jobs yet (retrying every second): %s", s.ToString());
      absl::MutexLock lock(&mu_);
      if (mu_.AwaitWithTimeout(absl::Condition(&stopping_), absl::Seconds(1))) return;
    }
    leading_ = true;
    ListenForCancels();
    WatchLead();
    return;
  }
}

void JobRunner::WatchLead() {
  if (std::string(db_->kind()) == "sqlite") return;  // one process owns the file
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      if (mu_.AwaitWithTimeout(absl::Condition(&stopping_), absl::Seconds(2))) return;
    }
    absl::Status s = db_->CheckLeadJobs();
    if (s.ok()) continue;
    LogError(
        "this replica no longer holds the job lock (%s): another replica may be running "
        "its jobs now, so it must stop running them",
        s.ToString());
    if (on_lost_lead_) on_lost_lead_(s);
    return;
  }
}

void JobRunner::ListenForCancels() {
  // SQLite has no other replica: nothing to hear, and Subscribe is a no-op.
  cancel_subscription_ = db_->Subscribe([this](const std::string& kind, const std::string&) {
    if (kind.empty() || kind == "cancel") TakeCancelRequests();
  });
  TakeCancelRequests();  // left before this replica listened
}

void JobRunner::TakeCancelRequests() {
  auto requests = db_->ListRecords("cancel");
  if (!requests.ok()) {
    LogError("cannot read the cancel requests (taken at the next change): %s",
             requests.status().ToString());
    return;
  }
  for (const auto& [id, json] : *requests) {
    auto r = Cancel(id);
    if (!r.ok() && r.status().code() != absl::StatusCode::kNotFound) {
      LogError("cannot cancel job %s as another replica asked: %s", id, r.status().ToString());
      continue;  // kept: tried again at the next change
    }
    LogInfo("job %s: cancelled as another replica asked", id);
    if (absl::Status s = db_->DeleteRecords("cancel", id); !s.ok()) {
      LogError("cannot delete the cancel request of job %s: %s", id, s.ToString());
    }
  }
}

absl::Status JobRunner::RecoverAsRunner() {
  auto records = db_->ListRecords("job");
  if (!records.ok()) return records.status();
  // Cancel requests other replicas left (TakeCancelRequests deletes them
  // later): those jobs end here instead of resuming first.
  auto cancels = db_->ListRecords("cancel");
  if (!cancels.ok()) return cancels.status();
  std::set<std::string> cancel_requested;
  for (const auto& [id, json] : *cancels) cancel_requested.insert(id);
  std::vector<std::string> interrupted, resumed;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [key, json] : *records) {
      Job job;
      auto parsed = ParseRecord(key, json);
      if (!parsed.ok()) {
        LogError("%s; skipped", parsed.status().message());
        continue;
      }
      job.record = std::move(*parsed);
      if (cancel_requested.count(key) > 0) job.record.cancel_requested = true;
      // Watchers of a job this replica followed until now keep watching it.
      if (auto known = jobs_.find(key); known != jobs_.end()) {
        job.watchers = std::move(known->second.watchers);
      }
      if (!job.record.final() && job.record.cancel_requested) {
        job.record.state = JobRecord::State::kCancelled;
        job.record.phase = "cancelled (the server stopped before the job noticed)";
        interrupted.push_back(key);
      } else if (!job.record.final() && job.record.options.resume) {
        resumed.push_back(key);
      } else if (!job.record.final()) {
        job.record.state = JobRecord::State::kFailed;
        job.record.error =
            "interrupted: the server stopped while the job was unfinished (resume_after_restart "
            "was off)";
        interrupted.push_back(key);
      }
      jobs_[key] = std::move(job);
    }
    // Back in the queue in the order they were made.
    std::sort(resumed.begin(), resumed.end(),
              [this](const std::string& a, const std::string& b) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                return jobs_.at(a).record.created_unix < jobs_.at(b).record.created_unix;
              });
    UpdateStateMetrics();
  }
  for (const auto& id : interrupted) {
    DeleteCheckpoint(id);
    Publish(id);
  }
  for (const auto& id : resumed) {
    JobRecord r = *Get(id);
    // The model is busy and the dataset held again, as when it was started.
    if (absl::Status s = models_->BeginTraining(r.model); !s.ok()) {
      Update(id, [&](JobRecord& rec) {
        rec.state = JobRecord::State::kFailed;
        rec.error = absl::StrCat("interrupted, and cannot resume: ", s.message());
        rec.phase = "failed";
      });
      DeleteCheckpoint(id);
      continue;
    }
    datasets_->Acquire(r.dataset);
    {
      absl::MutexLock lock(&mu_);
      JobRecord& rec = jobs_.at(id).record;
      rec.state = JobRecord::State::kQueued;
      rec.phase = "queued again after a restart: it resumes from its last checkpoint";
      queue_.push_back(id);
      UpdateStateMetrics();
    }
    LogInfo("job %s: interrupted by a restart, queued to resume", id);
    Publish(id);
  }
  return absl::OkStatus();
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
  nlohmann::json epochs = nlohmann::json::array();
  {
    absl::MutexLock lock(&mu_);
    for (const auto& e : jobs_.at(id).record.epochs) epochs.push_back(EpochToJson(e));
  }
  epochs.push_back(EpochToJson(last));  // reported right after this save
  const std::string header = nlohmann::json{
      {"kind", kind},
      {"examples", current_examples_digest_},
      {"epochs", epochs}}.dump();
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
  if (!leading_) {
    return absl::FailedPreconditionError(
        absl::StrCat(run_jobs_ ? "this replica stands by while another one runs the jobs"
                               : "this replica serves only (--max_concurrent_jobs=0)",
                     ": start training through the replica that runs the jobs"));
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
  if (absl::Status s = models_->BeginTraining(model); !s.ok()) return s;
  datasets_->Acquire(dataset);
  JobRecord r;
  std::random_device rd;
  r.id = absl::StrFormat("job-%08x%08x", rd(), rd());
  r.model = model;
  r.dataset = dataset;
  r.options = *resolved;
  r.created_unix = static_cast<int64_t>(std::time(nullptr));
  r.phase = "queued";
  {
    absl::MutexLock lock(&mu_);
    Job job;
    job.record = r;
    jobs_[r.id] = std::move(job);
    queue_.push_back(r.id);
    UpdateStateMetrics();
  }
  Publish(r.id);
  LogInfo("job %s: train model %s on dataset %s queued", r.id, model, dataset);
  return r;
}

absl::StatusOr<JobRecord> JobRunner::Get(const std::string& id) const {
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (it != jobs_.end()) return it->second.record;
  }
  // Started on the replica that runs the jobs a moment ago: its record may
  // be in the database before its notification is here. (Filling the cache
  // of records followed is not a change of this runner's state.)
  if (!leading_) const_cast<JobRunner*>(this)->Follow(id);
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
  if (!leading_) {
    auto r = Get(id);
    if (!r.ok() || r->final()) return r;
    if (std::string(db_->kind()) == "sqlite") {  // no other replica to hear it
      return absl::FailedPreconditionError(
          "this server does not run jobs (--max_concurrent_jobs=0): cancel the job through the "
          "server that runs it");
    }
    // Another replica runs it: a request, durable before it is
    // acknowledged, that the runner hears (now, or when one takes over).
    if (absl::Status s = db_->PutRecord("cancel", id, "{}"); !s.ok()) return s;
    r->cancel_requested = true;
    return r;
  }
  bool was_queued = false;
  std::string model, dataset;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) {
      return absl::NotFoundError(absl::StrCat("job \"", Bounded(id), "\" does not exist"));
    }
    if (it->second.record.final()) return it->second.record;
    it->second.cancel = true;
    // Durable before it is acknowledged: a stop or a crash before the job
    // notices must not resume it.
    it->second.record.cancel_requested = true;
    if (it->second.record.state == JobRecord::State::kQueued) {
      was_queued = true;
      queue_.erase(std::remove(queue_.begin(), queue_.end(), id), queue_.end());
      it->second.record.state = JobRecord::State::kCancelled;
      it->second.record.phase = "cancelled before it started";
      model = it->second.record.model;
      dataset = it->second.record.dataset;
      UpdateStateMetrics();
    }
  }
  if (was_queued) {
    models_->EndTraining(model);
    datasets_->Release(dataset);
    DeleteCheckpoint(id);  // a job paused by a restart has one
  }
  Publish(id);
  return Get(id);  // a running job ends at its next check, asynchronously
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
  if (!known && !leading_) Follow(id);
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

void JobRunner::Publish(const std::string& id, bool persist) {
  JobRecord r;
  std::vector<std::function<void(const JobRecord&)>> watchers;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return;
    r = it->second.record;
    for (const auto& [token, w] : it->second.watchers) watchers.push_back(w);
    if (r.final()) it->second.watchers.clear();
  }
  if (absl::Status s = persist ? db_->PutRecord("job", id, ToJson(r).dump()) : absl::OkStatus();
      !s.ok()) {
    LogError("job %s: cannot persist its state: %s", id, s.ToString());
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

void JobRunner::WorkerLoop() {
  // Training's own threads and (on CUDA) its own low-priority stream, so
  // that serving keeps its cores and its stream.
  at::set_num_threads(train_threads_);
  engine_->streams().BindTraining();
  for (;;) {
    std::string id;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](JobRunner* r)
               ABSL_NO_THREAD_SAFETY_ANALYSIS { return r->stopping_ || !r->queue_.empty(); },
          this));
      if (stopping_) return;
      // Tenants take turns: the queued job of the tenant whose last job
      // started longest ago (or never), first come first within a tenant.
      auto next = queue_.begin();
      int64_t best = INT64_MAX;
      for (auto it = queue_.begin(); it != queue_.end(); ++it) {
        auto job = jobs_.find(*it);
        const std::string tenant = job == jobs_.end() ? "" : TenantOf(job->second.record.model);
        auto last = last_start_.find(tenant);
        const int64_t when = last == last_start_.end() ? -1 : last->second;
        if (when < best) {
          best = when;
          next = it;
        }
      }
      id = *next;
      queue_.erase(next);
      auto job = jobs_.find(id);
      if (job != jobs_.end()) last_start_[TenantOf(job->second.record.model)] = ++starts_;
    }
    Run(id);
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
  bool stopping;
  {
    absl::MutexLock lock(&mu_);
    stopping = stopping_;
  }
  std::string model, dataset;
  bool resumable = false;
  {
    absl::MutexLock lock(&mu_);
    Job& job = jobs_.at(id);
    model = job.record.model;
    dataset = job.record.dataset;
    resumable = job.record.options.resume && !job.record.cancel_requested;
  }
  // A job that ends for good loses its checkpoint before anyone hears it
  // ended; one paused by the stop keeps it.
  const bool paused = !version.ok() && version.status().code() == absl::StatusCode::kCancelled &&
                      stopping && resumable;
  if (!paused) DeleteCheckpoint(id);
  // Released before the final state is published: a client that sees the
  // job end may start the model's next job at once.
  models_->EndTraining(model);
  datasets_->Release(dataset);
  Update(id, [&](JobRecord& r) {
    if (version.ok()) {
      r.state = JobRecord::State::kSucceeded;
      r.version = *version;
      r.phase = absl::StrCat("done: version ", *version);
    } else if (paused) {
      // Not final: the next start resumes it from its last checkpoint.
      r.state = JobRecord::State::kQueued;
      r.phase = "paused: the server stopped; it resumes from its last checkpoint after a restart";
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
  LogInfo(
      "job %s: %s", id,
      version.ok() ? absl::StrCat("succeeded, version ", *version) : version.status().ToString());
}

}  // namespace tlserve
