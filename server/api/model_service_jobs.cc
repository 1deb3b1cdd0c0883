// The training-job methods of tlserve.v1.Models: StartTraining, WatchJob,
// GetJob, ListJobs and CancelJob (model_service.cc has the rest). A job is
// its model's tenant's: other tenants get NOT_FOUND, as for an unknown id.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "server/api/contained_call.h"
#include "server/api/model_service.h"
#include "server/api/rpc_timer.h"
#include "server/api/status_util.h"
#include "server/core/catalog/tenant_key.h"
#include "server/core/contain.h"

namespace tlserve {
namespace {

void ToProto(const JobRecord& r, const Caller& caller, v1::Job* out) {
  out->set_id(r.id);
  out->set_model(caller.Name(r.model));
  out->set_dataset(caller.Name(r.dataset));
  out->set_tenant(TenantOf(r.model));
  out->set_state(static_cast<v1::Job::State>(static_cast<int>(r.state) + 1));
  out->set_phase(r.phase);
  out->set_error(r.error);
  out->set_version(r.version);
  out->set_created_unix(r.created_unix);
  out->set_outcome(r.outcome);
  for (const SweepEntry& e : r.leaderboard) {
    v1::SweepCandidate* c = out->add_leaderboard();
    const auto& layers = r.options.sweep_layers;
    c->set_layer(e.layer >= 0 && e.layer < static_cast<int>(layers.size()) ? layers[e.layer]
                                                                           : "embedding");
    c->set_l2(e.l2);
    for (int h : e.hidden) c->add_hidden(h);
    c->set_params(e.params);
    c->set_accuracy(e.accuracy);
    c->set_accuracy_std(e.accuracy_std);
    c->set_log_loss(e.log_loss);
    c->set_seconds(e.seconds);
  }
  for (const auto& e : r.epochs) {
    v1::EpochProgress* p = out->add_epochs();
    p->set_epoch(e.epoch);
    p->set_train_loss(e.train_loss);
    p->set_train_accuracy(e.train_accuracy);
    p->set_validation_loss(e.validation_loss);
    p->set_validation_accuracy(e.validation_accuracy);
    p->set_images_per_second(e.images_per_second);
    p->set_elapsed_seconds(e.elapsed_seconds);
    p->set_eta_seconds(e.eta_seconds);
  }
  const TrainOptions& o = r.options;
  v1::TrainingOptions* po = out->mutable_options();
  po->set_epochs(o.epochs);
  po->set_batch_size(o.batch_size);
  po->set_optimizer(o.optimizer == TrainOptions::Optimizer::kLbfgs ? v1::TrainingOptions::LBFGS
                    : o.optimizer == TrainOptions::Optimizer::kSgd ? v1::TrainingOptions::SGD
                                                                   : v1::TrainingOptions::ADAMW);
  po->set_stage_learning_rate(o.stage_learning_rate);
  po->set_augment(o.augment);
  po->set_freeze_batchnorm(o.freeze_batchnorm);
  po->set_head_first(o.head_first);
  po->set_label_smoothing(o.label_smoothing);
  po->set_balanced_class_weights(o.balanced_class_weights);
  po->set_early_stopping_patience(o.early_stopping_patience);
  po->set_seed(o.seed);
  po->set_learning_rate(o.learning_rate);
  po->set_weight_decay(o.weight_decay);
  po->set_validation_fraction(o.validation_fraction);
  po->set_serve(static_cast<v1::TrainingOptions::Serve>(static_cast<int>(o.serve)));
  po->set_target_precision(o.target_precision);
  po->set_resume_after_restart(o.resume);
  po->set_schedule(o.schedule == TrainOptions::Schedule::kConstant
                       ? v1::TrainingOptions::SCHEDULE_CONSTANT
                       : v1::TrainingOptions::SCHEDULE_WARMUP_COSINE);
  po->set_warmup_fraction(o.warmup_fraction);
  po->set_layer_decay(o.layer_decay);
  po->set_gradual_unfreezing(o.gradual_unfreezing);
  if (o.sweep) {
    v1::SweepOptions* sw = po->mutable_sweep();
    for (double l2 : o.sweep_l2) sw->add_l2(static_cast<float>(l2));
    sw->set_folds(o.sweep_folds);
    for (int h : o.sweep_hidden) sw->add_hidden(h);
    for (const auto& layer : o.sweep_layers) sw->add_layers(layer);
  }
}

absl::StatusOr<TrainOptions> FromProto(const v1::TrainingOptions& p) {
  TrainOptions o;
  o.epochs = p.epochs();
  if (p.batch_size() != 0) o.batch_size = p.batch_size();
  switch (p.optimizer()) {
    case v1::TrainingOptions::OPTIMIZER_DEFAULT:
      o.optimizer = TrainOptions::Optimizer::kDefault;
      break;
    case v1::TrainingOptions::LBFGS:
      o.optimizer = TrainOptions::Optimizer::kLbfgs;
      break;
    case v1::TrainingOptions::ADAMW:
      o.optimizer = TrainOptions::Optimizer::kAdamw;
      break;
    case v1::TrainingOptions::SGD:
      o.optimizer = TrainOptions::Optimizer::kSgd;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("options.optimizer: unknown value ", static_cast<int>(p.optimizer()),
                       "; use OPTIMIZER_DEFAULT, LBFGS, ADAMW or SGD"));
  }
  o.stage_learning_rate = p.stage_learning_rate();
  o.augment = p.augment();
  if (p.has_freeze_batchnorm()) o.freeze_batchnorm = p.freeze_batchnorm();
  if (p.has_head_first()) o.head_first = p.head_first();
  o.learning_rate = p.learning_rate();
  if (p.has_weight_decay()) o.weight_decay = p.weight_decay();
  o.label_smoothing = p.label_smoothing();
  o.balanced_class_weights = p.balanced_class_weights();
  o.early_stopping_patience = p.early_stopping_patience();
  if (p.has_validation_fraction()) o.validation_fraction = p.validation_fraction();
  o.seed = p.seed();
  switch (p.serve()) {
    case v1::TrainingOptions::SERVE_IF_NOT_WORSE:
      o.serve = TrainOptions::Serve::kIfNotWorse;
      break;
    case v1::TrainingOptions::SERVE_ALWAYS:
      o.serve = TrainOptions::Serve::kAlways;
      break;
    case v1::TrainingOptions::SERVE_NEVER:
      o.serve = TrainOptions::Serve::kNever;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("options.serve: unknown value ", static_cast<int>(p.serve()),
                       "; use SERVE_IF_NOT_WORSE, SERVE_ALWAYS or SERVE_NEVER"));
  }
  o.target_precision = p.target_precision();
  if (p.has_resume_after_restart()) o.resume = p.resume_after_restart();
  switch (p.schedule()) {
    case v1::TrainingOptions::SCHEDULE_WARMUP_COSINE:
      o.schedule = TrainOptions::Schedule::kWarmupCosine;
      break;
    case v1::TrainingOptions::SCHEDULE_CONSTANT:
      o.schedule = TrainOptions::Schedule::kConstant;
      break;
    default:
      return absl::InvalidArgumentError(
          "options.schedule: unknown value; use SCHEDULE_WARMUP_COSINE or SCHEDULE_CONSTANT");
  }
  if (p.has_warmup_fraction()) o.warmup_fraction = p.warmup_fraction();
  if (p.has_layer_decay()) o.layer_decay = p.layer_decay();
  if (p.has_gradual_unfreezing()) o.gradual_unfreezing = p.gradual_unfreezing();
  if (p.has_sweep()) {
    o.sweep = true;
    o.sweep_l2.assign(p.sweep().l2().begin(), p.sweep().l2().end());
    o.sweep_folds = p.sweep().folds() == 0 ? 5 : p.sweep().folds();
    o.sweep_hidden.assign(p.sweep().hidden().begin(), p.sweep().hidden().end());
    o.sweep_layers.assign(p.sweep().layers().begin(), p.sweep().layers().end());
  }
  return o;
}

// The job `id` when the caller may see it; NOT_FOUND as for an unknown job
// otherwise (another tenant's job is not revealed to exist).
absl::StatusOr<JobRecord> VisibleJob(const JobRunner& jobs, const Caller& caller,
                                     const std::string& id) {
  auto j = jobs.Get(id);
  if (j.ok() && !caller.Sees(j->model)) {
    return absl::NotFoundError(absl::StrCat("job \"", Bounded(id), "\" does not exist"));
  }
  return j;
}

// Streams a job's states until it is final. Owns itself (deleted in OnDone).
class WatchReactor final : public grpc::ServerWriteReactor<v1::Job> {
 public:
  WatchReactor(grpc::CallbackServerContext* context, JobRunner* jobs, Security* security,
               const std::string& id)
      : jobs_(jobs),
        id_(id),
        timer_(security->metrics(), "WatchJob"),
        state_(std::make_shared<State>()) {
    state_->reactor = this;
    auto caller = security->Admit(*context, &timer_, id);
    absl::Status visible =
        caller.ok() ? VisibleJob(*jobs_, *caller, id_).status() : caller.status();
    if (!visible.ok()) {
      timer_.Done(visible);
      Finish(ToGrpcStatus(visible));
      return;
    }
    state_->caller = *caller;
    std::shared_ptr<State> state = state_;
    auto token = jobs_->Watch(id_, [state](const JobRecord& r) { state->Push(r); });
    if (!token.ok()) {
      timer_.Done(token.status());
      Finish(ToGrpcStatus(token.status()));
      return;
    }
    token_ = *token;
  }
  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&state_->mu);
    state_->writing = false;
    if (!ok) {
      state_->FinishLocked(absl::CancelledError("the watcher went away"));
      return;
    }
    const bool last = state_->queue.front().state() >= v1::Job::SUCCEEDED;
    state_->queue.pop_front();
    if (last) {
      state_->FinishLocked(absl::OkStatus());  // the job is over: so is the stream
      return;
    }
    state_->NextLocked();
  }
  void OnCancel() override {
    absl::MutexLock lock(&state_->mu);
    if (!state_->writing) state_->FinishLocked(absl::CancelledError("the watcher cancelled"));
  }
  void OnDone() override {
    if (token_ != 0) jobs_->Unwatch(id_, token_);
    {
      absl::MutexLock lock(&state_->mu);
      state_->reactor = nullptr;
    }
    delete this;
  }

 private:
  struct State {
    absl::Mutex mu;
    WatchReactor* reactor ABSL_GUARDED_BY(mu) = nullptr;
    std::deque<v1::Job> queue ABSL_GUARDED_BY(mu);
    bool writing ABSL_GUARDED_BY(mu) = false;
    bool finished ABSL_GUARDED_BY(mu) = false;
    Caller caller;  // set before the first Push

    void Push(const JobRecord& r) {
      absl::MutexLock lock(&mu);
      if (reactor == nullptr || finished) return;
      v1::Job j;
      ToProto(r, caller, &j);
      queue.push_back(std::move(j));
      if (!writing) NextLocked();
    }
    void NextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
      if (finished || reactor == nullptr) return;
      if (queue.empty()) return;
      writing = true;
      reactor->StartWrite(&queue.front());
    }
    void FinishLocked(const absl::Status& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
      if (finished || reactor == nullptr) return;
      finished = true;
      reactor->timer_.Done(s);
      reactor->Finish(ToGrpcStatus(s));
    }
  };
  friend struct State;

  JobRunner* jobs_;
  std::string id_;
  RpcTimer timer_;
  std::shared_ptr<State> state_;
  int token_ = 0;
};

}  // namespace

grpc::ServerUnaryReactor* ModelService::StartTraining(grpc::CallbackServerContext* c,
                                                      const v1::StartTrainingRequest* req,
                                                      v1::Job* resp) {
  // Starting reads the dataset's index and writes the job's record.
  return ContainedOnWorker(
      c, security_, "StartTraining", absl::StrCat(req->model(), " (dataset ", req->dataset(), ")"),
      work_, [this, req, resp](const Caller& caller) -> absl::Status {
        auto options = FromProto(req->options());
        if (!options.ok()) return options.status();
        auto model = caller.Qualify(req->model(), "model");
        if (!model.ok()) return model.status();
        auto dataset = caller.Qualify(req->dataset(), "dataset");
        if (!dataset.ok()) return dataset.status();
        const std::string tenant = TenantOf(*model);
        if (TenantOf(*dataset) != tenant) {
          return absl::InvalidArgumentError(
              "dataset: a model trains on a dataset of its own tenant");
        }
        absl::MutexLock quota(security_->QuotaLock(tenant));
        auto use = security_->Usage(tenant);
        if (!use.ok()) return use.status();
        const QuotaLimits quotas = security_->QuotasOf(tenant);
        if (absl::Status s =
                Security::CheckQuota(tenant, "jobs", use->jobs, 1, quotas.jobs, " jobs");
            !s.ok()) {
          return s;
        }
        // The job's version will store the model's own weights.
        auto info = models_->Get(*model);
        if (!info.ok()) return info.status();
        if (absl::Status s =
                Security::CheckQuota(tenant, "storage_mb", use->storage_bytes,
                                     ModelParams(*info) * 4, quotas.storage_bytes, " bytes");
            !s.ok()) {
          return s;
        }
        auto j = jobs_->Start(*model, *dataset, *options);
        if (j.ok()) ToProto(*j, caller, resp);
        return j.status();
      });
}

grpc::ServerWriteReactor<v1::Job>* ModelService::WatchJob(grpc::CallbackServerContext* c,
                                                          const v1::WatchJobRequest* req) {
  return new WatchReactor(c, jobs_, security_, req->id());
}

grpc::ServerUnaryReactor* ModelService::GetJob(grpc::CallbackServerContext* c,
                                               const v1::GetJobRequest* req, v1::Job* resp) {
  return ContainedUnary(c, security_, "GetJob", req->id(),
                        [&](const Caller& caller) -> absl::Status {
                          auto j = VisibleJob(*jobs_, caller, req->id());
                          if (j.ok()) ToProto(*j, caller, resp);
                          return j.status();
                        });
}

grpc::ServerUnaryReactor* ModelService::ListJobs(grpc::CallbackServerContext* c,
                                                 const v1::ListJobsRequest* req,
                                                 v1::ListJobsResponse* resp) {
  return ContainedUnary(c, security_, "ListJobs", req->model(),
                        [&](const Caller& caller) -> absl::Status {
                          std::string model;
                          if (!req->model().empty()) {
                            auto key = caller.Qualify(req->model(), "model");
                            if (!key.ok()) return key.status();
                            model = *key;
                          }
                          for (const auto& j : jobs_->List(model)) {
                            if (caller.Sees(j.model)) ToProto(j, caller, resp->add_jobs());
                          }
                          return absl::OkStatus();
                        });
}

grpc::ServerUnaryReactor* ModelService::CancelJob(grpc::CallbackServerContext* c,
                                                  const v1::CancelJobRequest* req, v1::Job* resp) {
  // Cancelling a queued job writes its record: on a worker.
  return ContainedOnWorker(c, security_, "CancelJob", req->id(), work_,
                           [this, req, resp](const Caller& caller) -> absl::Status {
                             if (auto j = VisibleJob(*jobs_, caller, req->id()); !j.ok()) {
                               return j.status();
                             }
                             auto j = jobs_->Cancel(req->id());
                             if (j.ok()) ToProto(*j, caller, resp);
                             return j.status();
                           });
}

}  // namespace tlserve
