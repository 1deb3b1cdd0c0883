// What a training job computes: features with the frozen backbone and a
// head fitted on them, or fine-tuning of the model's private stages. The
// job's lifecycle (queue, states, watchers) is in jobs.cc.
#include <ATen/ATen.h>
#include <torch/torch.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/core/contain.h"
#include "server/core/fine_tuner.h"
#include "server/core/image_decoder.h"
#include "server/core/jobs.h"
#include "server/core/log.h"
#include "server/core/metrics.h"
#include "server/core/predictions.h"
#include "server/core/preprocess.h"
#include "server/core/training/evaluation.h"

namespace tlserve {
namespace {

// `from`'s weights into `to` (same shape, any devices).
void CopyHead(const torch::nn::Sequential& from, torch::nn::Sequential& to) {
  torch::NoGradGuard no_grad;
  auto src = from->parameters();
  auto dst = to->parameters();
  for (size_t i = 0; i < dst.size(); ++i) dst[i].copy_(src[i]);
}

uint64_t Lane(const std::string& job) { return std::hash<std::string>()(job) | 1; }

}  // namespace

absl::StatusOr<std::vector<std::string>> JobRunner::ReadBytes(
    const std::vector<StoredExample>& examples, const std::vector<int64_t>& indices) const {
  std::vector<int64_t> ids;
  ids.reserve(indices.size());
  for (int64_t i : indices) ids.push_back(examples[i].id);
  auto bytes = db_->ReadExampleBytes(ids);
  if (!bytes.ok() && bytes.status().code() == absl::StatusCode::kNotFound) {
    return absl::FailedPreconditionError(
        absl::StrCat("the dataset changed under the job: ", bytes.status().message()));
  }
  return bytes;
}

absl::StatusOr<at::Tensor> JobRunner::Features(const std::string& id,
                                               const std::vector<StoredExample>& examples,
                                               int layer, int64_t dim) {
  // Features of every example with the frozen backbone, once, through the
  // device engine at training priority: normal tensors (not inference
  // tensors), so that training can use them. The images are read from the
  // database a batch at a time, a full engine batch each.
  const int64_t n = static_cast<int64_t>(examples.size());
  if (layer < 0) dim = backbone_->embedding_dim();
  at::Tensor features = at::empty({n, dim});
  // The embedding's key is the backbone's alone (as before layers).
  const std::string key_prefix =
      layer < 0 ? backbone_->sha256() : absl::StrCat(backbone_->sha256(), "@", layer);
  const int64_t kBatch = engine_->max_batch_size();
  std::vector<int64_t> pending;
  auto flush = [&]() -> absl::Status {
    if (pending.empty()) return absl::OkStatus();
    auto bytes = ReadBytes(examples, pending);
    if (!bytes.ok()) return bytes.status();
    std::vector<Engine::Work> work(pending.size());
    for (size_t k = 0; k < pending.size(); ++k) {
      auto x = DecodeAndPreprocessUint8((*bytes)[k], backbone_->preprocess(), max_image_pixels_);
      if (!x.ok()) {
        const StoredExample& e = examples[pending[k]];
        return absl::FailedPreconditionError(absl::StrCat(
            "example ", e.id, " (\"", Bounded(e.name), "\") cannot be used: ", x.status().message(),
            "; delete the dataset or upload it without it"));
      }
      work[k].input = *std::move(x);
      work[k].priority = Engine::Priority::kTraining;
      work[k].lane = Lane(id);
      if (layer >= 0) work[k].spec = EmbedSpec{layer, Pool::kAvg, false};
    }
    auto out = engine_->Run(std::move(work));
    if (!out.ok()) return out.status();
    for (size_t k = 0; k < pending.size(); ++k) {
      features[pending[k]].copy_((*out)[k].values);
      feature_cache_.Put(absl::StrCat(key_prefix, ":", examples[pending[k]].id),
                         (*out)[k].values.clone());
    }
    pending.clear();
    return absl::OkStatus();
  };
  for (int64_t i = 0; i < n; ++i) {
    if (Cancelled(id)) return absl::CancelledError("cancelled");
    const at::Tensor cached = feature_cache_.Get(absl::StrCat(key_prefix, ":", examples[i].id));
    if (cached.defined()) {
      features[i].copy_(cached);
    } else {
      pending.push_back(i);
      if (static_cast<int64_t>(pending.size()) == kBatch) {
        if (absl::Status s = flush(); !s.ok()) return s;
        Update(id, [&](JobRecord& rec) { rec.phase = absl::StrCat("features ", i + 1, "/", n); });
      }
    }
  }
  if (absl::Status s = flush(); !s.ok()) return s;
  return features;
}

absl::StatusOr<TrainedHead> JobRunner::FitHead(const std::string& id, const JobRecord& r,
                                               const ModelInfo& info,
                                               const std::vector<StoredExample>& examples,
                                               const TrainOptions& options, bool warmup,
                                               Resume* resume) {
  auto features = Features(id, examples);
  if (!features.ok()) return features.status();
  std::map<std::string, int64_t> class_index;
  for (size_t i = 0; i < info.classes.size(); ++i) class_index[info.classes[i]] = i;
  const int64_t n = static_cast<int64_t>(examples.size()), dim = backbone_->embedding_dim();
  std::vector<int64_t> train_idx, val_idx, train_y, val_y;
  for (int64_t i = 0; i < n; ++i) {
    const bool val = DatasetCatalog::IsValidation(examples[i].hash, options.validation_fraction);
    (val ? val_idx : train_idx).push_back(i);
    (val ? val_y : train_y).push_back(class_index.at(examples[i].label));
  }
  Update(id, [](JobRecord& rec) { rec.phase = "training the head"; });
  auto take = [&](const std::vector<int64_t>& idx) {
    return features->index_select(0, torch::tensor(idx, torch::kLong));
  };
  const int64_t classes = static_cast<int64_t>(info.classes.size());
  return TrainHead(
      info.head, classes, take(train_idx), torch::tensor(train_y, torch::kLong),
      val_idx.empty() ? at::empty({0, dim}) : take(val_idx), torch::tensor(val_y, torch::kLong),
      options, OnEpoch(id, r, options.epochs, warmup ? "head first: " : ""),
      [&] { return Cancelled(id); }, backbone_->torch_device(), resume);
}

absl::StatusOr<TrainedHead> JobRunner::SweepHead(const std::string& id, const ModelInfo& info,
                                                 const std::vector<StoredExample>& examples,
                                                 const TrainOptions& options, HeadSpec* spec,
                                                 std::string* feature_layer) {
  // Features once per candidate layer, shared by every candidate on it.
  std::vector<std::string> layers = options.sweep_layers;
  if (layers.empty()) layers = {"embedding"};
  std::vector<at::Tensor> per_layer;
  for (size_t l = 0; l < layers.size(); ++l) {
    auto resolved = models_->ResolveFeatureLayer(layers[l] == "embedding" ? "" : layers[l]);
    if (!resolved.ok()) return resolved.status();
    Update(id, [&](JobRecord& rec) {
      rec.phase =
          absl::StrCat("features of layer ", layers[l], " (", l + 1, "/", layers.size(), ")");
    });
    auto f = Features(id, examples, resolved->stage, resolved->dim);
    if (!f.ok()) return f.status();
    per_layer.push_back(*std::move(f));
  }
  std::map<std::string, int64_t> class_index;
  for (size_t i = 0; i < info.classes.size(); ++i) class_index[info.classes[i]] = i;
  const int64_t n = static_cast<int64_t>(examples.size());
  std::vector<int64_t> train_idx, val_idx, train_y, val_y, all_y;
  std::vector<bool> is_val;
  for (int64_t i = 0; i < n; ++i) {
    const bool val = DatasetCatalog::IsValidation(examples[i].hash, options.validation_fraction);
    (val ? val_idx : train_idx).push_back(i);
    (val ? val_y : train_y).push_back(class_index.at(examples[i].label));
    all_y.push_back(class_index.at(examples[i].label));
    is_val.push_back(val);
  }
  auto take_from = [](const at::Tensor& x, const std::vector<int64_t>& idx) {
    return x.index_select(0, torch::tensor(idx, torch::kLong));
  };
  const int64_t classes = static_cast<int64_t>(info.classes.size());
  SweepData data;
  SweepOptions so;
  if (!options.sweep_l2.empty()) so.l2_grid = options.sweep_l2;
  so.hidden = {info.head.hidden};
  if (!options.sweep_hidden.empty()) {
    so.hidden.clear();
    for (int h : options.sweep_hidden) {
      so.hidden.push_back(h == 0 ? std::vector<int>{} : std::vector<int>{h});
    }
  }
  so.seed = options.seed;
  so.folds = options.sweep_folds;
  data.classes = classes;
  if (so.folds >= 2) {
    // Cross-validation on the training split; the validation split stays
    // held out for the version's scores, its calibration and whether it is
    // served.
    for (const at::Tensor& x : per_layer) data.features.push_back(take_from(x, train_idx));
    data.labels = torch::tensor(train_y, torch::kLong);
  } else {
    data.features = per_layer;
    data.labels = torch::tensor(all_y, torch::kLong);
    data.validation = torch::zeros({n}, torch::kBool);
    for (int64_t i = 0; i < n; ++i) data.validation[i] = static_cast<bool>(is_val[i]);
  }
  const size_t candidates = so.l2_grid.size() * so.hidden.size() * layers.size();
  Update(id, [&](JobRecord& rec) {
    rec.leaderboard.clear();
    rec.phase = absl::StrCat("sweep: 0/", candidates, " candidates");
  });
  auto swept = Sweep(
      data, so,
      [&](const SweepEntry& e) {
        Update(id, [&](JobRecord& rec) {
          rec.leaderboard.push_back(e);
          std::stable_sort(
              rec.leaderboard.begin(), rec.leaderboard.end(),
              [](const SweepEntry& a, const SweepEntry& b) { return a.accuracy > b.accuracy; });
          rec.phase =
              absl::StrCat("sweep: ", rec.leaderboard.size(), "/", candidates, " candidates");
        });
      },
      [&] { return Cancelled(id); });
  if (!swept.ok()) return swept.status();
  // The sweep's own ranking (ties: the smaller head, then the stronger L2).
  Update(id, [&](JobRecord& rec) {
    rec.leaderboard = swept->leaderboard;
    rec.phase = "sweep done: scoring the winner";
  });
  TrainedHead out;
  out.head = swept->head;
  const int winner_layer = swept->leaderboard.front().layer;
  *feature_layer = layers[winner_layer] == "embedding" ? "" : layers[winner_layer];
  const at::Tensor& features = per_layer[winner_layer];
  auto take = [&](const std::vector<int64_t>& idx) { return take_from(features, idx); };
  // The winner's shape (no dropout: the sweep trains without); the model's
  // own spec when that is the same head (a linear one has no dropout layer).
  *spec = HeadSpec{swept->leaderboard.front().hidden, 0.0f};
  if (spec->hidden == info.head.hidden && (spec->hidden.empty() || info.head.dropout == 0)) {
    *spec = info.head;
  }
  out.train = Evaluate(out.head, take(train_idx), torch::tensor(train_y, torch::kLong), classes);
  if (!val_idx.empty()) {
    out.validation = Evaluate(out.head, take(val_idx), torch::tensor(val_y, torch::kLong), classes);
  }
  EpochStats s;  // the winner, as one epoch in the job's history
  s.epoch = 1;
  s.train_loss = out.train.loss;
  s.train_accuracy = out.train.accuracy;
  s.validation_loss = out.validation.loss;
  s.validation_accuracy = out.validation.accuracy;
  s.elapsed_seconds = swept->seconds;
  OnEpoch(id, *Get(id), 1, "sweep winner: ")(s);
  return out;
}

Resume JobRunner::ResumeFor(const std::string& id, const std::string& kind,
                            const std::optional<Checkpoint>& from) {
  Resume resume;
  if (!from || from->kind == kind) {
    resume.save = [this, id, kind](const EpochStats& last, const std::string& state) {
      SaveCheckpoint(id, kind, last, state);
    };
  }
  if (from && from->kind == kind) resume.state = from->state;
  return resume;
}

absl::StatusOr<int> JobRunner::FineTuneJob(const std::string& id, const JobRecord& r,
                                           const ModelInfo& info,
                                           const std::vector<StoredExample>& examples,
                                           const std::optional<Checkpoint>& checkpoint) {
  auto start = models_->Start(r.model);
  if (!start.ok()) return start.status();
  const int64_t classes = static_cast<int64_t>(info.classes.size());
  // The served version's head is the warm start, of its shape (a sweep may
  // have chosen one other than the model's) — unless it reads an earlier
  // feature layer (a sweep's choice): fine-tuning trains the embedding's
  // head, so such a version starts cold.
  bool warm = false;
  for (const VersionInfo& v : info.versions) {
    warm =
        warm || (start->served && v.version == start->served->version && v.feature_layer.empty());
  }
  const HeadSpec spec = warm ? VersionHead(info, start->served->version) : info.head;
  torch::nn::Sequential head = MakeHead(spec, backbone_->embedding_dim(), classes);
  if (warm) {  // warm start: the served version's head (the notebook's second step)
    CopyHead(start->served->plan.head(), head);
  } else if (r.options.head_first && !(checkpoint && checkpoint->kind == "fine-tune")) {
    // (A run resumed from a fine-tuning checkpoint has its head there.)
    // A cold (random) head would send large, random gradients into the
    // unfrozen stages and wreck them: train the head alone first, on the
    // frozen features, as the notebook does (its first step). The private
    // stages are still copies of the shared ones, so these are the
    // backbone's features.
    Update(id, [](JobRecord& rec) { rec.phase = "training the head first (cold start)"; });
    TrainOptions head_only;
    head_only.validation_fraction = r.options.validation_fraction;
    head_only.seed = r.options.seed;
    auto resolved = ResolveTrainOptions(head_only, info.head, /*fine_tune=*/false);
    if (!resolved.ok()) return resolved.status();
    auto warm = FitHead(id, r, info, examples, *resolved, /*warmup=*/true);
    if (!warm.ok()) return warm.status();
    CopyHead(warm->head, head);
  }
  std::map<std::string, int64_t> class_index;
  for (size_t i = 0; i < info.classes.size(); ++i) class_index[info.classes[i]] = i;
  FineTuneData data;
  data.read = [this, &examples](const std::vector<int64_t>& indices) {
    return ReadBytes(examples, indices);
  };
  data.max_image_pixels = max_image_pixels_;
  data.prefix_cache_bytes = prefix_cache_bytes_;
  data.prefix_cache_device_bytes = prefix_cache_device_bytes_;
  data.lane = Lane(id);
  if (before_step_) data.before_step = [this, model = r.model] { before_step_(model); };
  for (size_t i = 0; i < examples.size(); ++i) {
    data.labels.push_back(class_index.at(examples[i].label));
    (DatasetCatalog::IsValidation(examples[i].hash, r.options.validation_fraction) ? data.val
                                                                                   : data.train)
        .push_back(static_cast<int64_t>(i));
  }
  Update(id, [](JobRecord& rec) { rec.phase = "fine-tuning"; });
  Resume resume = ResumeFor(id, "fine-tune", checkpoint);
  auto tuned = FineTune(
      *engine_, std::move(start->stages), head, classes, data, r.options, OnEpoch(id, r),
      [&] { return Cancelled(id); }, r.options.resume ? &resume : nullptr);
  if (!tuned.ok()) return tuned.status();
  return StoreVersion(id, r, info, examples, tuned->head, spec, "", tuned->stages,
                      tuned->train.accuracy, std::move(tuned->validation));
}

absl::StatusOr<int> JobRunner::StoreVersion(const std::string& id, const JobRecord& r,
                                            const ModelInfo& info,
                                            const std::vector<StoredExample>& examples,
                                            const torch::nn::Sequential& head, const HeadSpec& spec,
                                            const std::string& feature_layer,
                                            const StagePlan::Stages& stages, double train_accuracy,
                                            Evaluation validation) {
  // The validation split, in the order the trainers evaluated it.
  std::map<std::string, int64_t> class_index;
  for (size_t i = 0; i < info.classes.size(); ++i) class_index[info.classes[i]] = i;
  std::vector<StoredExample> val;
  std::vector<int64_t> val_labels;
  for (const StoredExample& e : examples) {
    if (DatasetCatalog::IsValidation(e.hash, r.options.validation_fraction)) {
      val.push_back(e);
      val_labels.push_back(class_index.at(e.label));
    }
  }
  VersionInfo v;
  v.job_id = id;
  if (spec.hidden != info.head.hidden || spec.dropout != info.head.dropout) v.head = spec;
  v.feature_layer = feature_layer;
  v.train_accuracy = train_accuracy;
  const at::Tensor logits = std::move(validation.logits);
  validation.logits = at::Tensor();  // not kept with the version
  v.validation = std::move(validation);
  if (logits.defined() && logits.size(0) == static_cast<int64_t>(val.size()) && !val.empty()) {
    Update(id, [](JobRecord& rec) { rec.phase = "calibrating on the validation split"; });
    // A split the head gets all right has no finite optimum (sharper is
    // always "better"): fitting there would make every answer certain, so
    // such a version keeps temperature 1.
    const bool all_right = v.validation.accuracy >= 1.0;
    const double t = all_right ? 1.0 : FitTemperature(logits, val_labels);
    const at::Tensor calibrated = t == 1.0
                                      ? at::softmax(logits, 1)
                                      : at::softmax(logits.to(at::kDouble) / t, 1).to(at::kFloat);
    v.calibration.temperature = t;
    v.validation_ece_uncalibrated = ExpectedCalibrationError(at::softmax(logits, 1), val_labels);
    v.validation_ece = ExpectedCalibrationError(calibrated, val_labels);
    if (r.options.target_precision > 0) {
      v.calibration.thresholds =
          ThresholdsForPrecision(calibrated, val_labels, r.options.target_precision);
    }
  }
  std::string outcome;
  auto decided = ShouldServe(id, r, val, val_labels, v.validation.accuracy, &outcome);
  if (!decided.ok()) return decided.status();  // cancelled or stopping
  const bool serve = *decided;
  // Only while this replica still holds the job (checked with the database
  // now): a replica that lost it stores no version beside the one its new
  // holder will.
  if (absl::Status s = CheckLease(id); !s.ok()) return s;
  auto added = models_->AddVersion(r.model, head, stages, v, serve);
  if (added.ok()) {
    Update(id, [&](JobRecord& rec) {
      rec.outcome = absl::StrCat("v", *added, serve ? " is served: " : " is not served: ", outcome);
    });
  }
  return added;
}

absl::StatusOr<bool> JobRunner::ShouldServe(const std::string& id, const JobRecord& r,
                                            const std::vector<StoredExample>& val,
                                            const std::vector<int64_t>& val_labels, double accuracy,
                                            std::string* why) {
  switch (r.options.serve) {
    case TrainOptions::Serve::kAlways:
      *why = "options.serve is ALWAYS";
      return true;
    case TrainOptions::Serve::kNever:
      *why = "options.serve is NEVER; serve it with SetServedVersion (tlctl serve)";
      return false;
    case TrainOptions::Serve::kIfNotWorse:
      break;
  }
  auto served = models_->ServableNow(r.model, 0);
  if (!served.ok() && served.status().code() == absl::StatusCode::kFailedPrecondition) {
    *why = "the model had no served version";
    return true;
  }
  if (!served.ok()) {  // not compared: not served (serve it by hand)
    *why = absl::StrCat("the served version could not be read to compare: ",
                        served.status().message());
    return false;
  }
  if (val.empty()) {
    *why = "no validation split to compare it with the served version on";
    return true;
  }
  // The served version on the same images, through the engine as Classify
  // runs it: a version is compared with what users get now.
  Update(id, [](JobRecord& rec) { rec.phase = "comparing with the served version"; });
  PredictOptions o;
  o.lane = Lane(id);
  o.max_image_pixels = max_image_pixels_;
  o.cancelled = [&] { return Cancelled(id); };
  auto old = PredictExamples(*engine_, *db_, val, {*served}, o);
  if (!old.ok() && (old.status().code() == absl::StatusCode::kCancelled || Cancelled(id))) {
    return absl::CancelledError("the job was cancelled");
  }
  if (!old.ok()) {  // not compared: not served (serve it by hand)
    *why = absl::StrCat("the served v", (*served)->version,
                        " could not be compared: ", old.status().message());
    return false;
  }
  const at::Tensor predicted = old->probabilities[0].argmax(1);
  int64_t right = 0;
  for (size_t i = 0; i < val.size(); ++i) {
    right += predicted[static_cast<int64_t>(i)].item<int64_t>() == val_labels[i] ? 1 : 0;
  }
  const double served_accuracy = static_cast<double>(right) / static_cast<double>(val.size());
  *why = absl::StrFormat("validation accuracy %.4f %s the served v%d's %.4f on the same %d images",
                         accuracy, accuracy >= served_accuracy ? ">=" : "<", (*served)->version,
                         served_accuracy, val.size());
  return accuracy >= served_accuracy;
}

absl::StatusOr<int> JobRunner::Train(const std::string& id) {
  JobRecord r;
  {
    absl::MutexLock lock(&mu_);
    r = jobs_.at(id).record;
  }
  auto info = models_->Get(r.model);
  if (!info.ok()) return info.status();
  // The dataset's index (without image bytes, which are read a batch at a
  // time): read here, by the job, not by StartTraining. The dataset cannot
  // change while the job holds it (DatasetCatalog::Acquire).
  Update(id, [](JobRecord& rec) { rec.phase = "reading the dataset"; });
  auto listed = db_->ListExamples(r.dataset);
  if (!listed.ok()) return listed.status();
  // Unlabelled images (a pool for SuggestLabels) do not train.
  std::vector<StoredExample> examples;
  for (StoredExample& e : *listed) {
    if (!e.label.empty()) examples.push_back(std::move(e));
  }
  // A job resumed after a restart continues from its last checkpoint (its
  // epochs so far come back with it); without one it starts over.
  // A crash after its version was stored and before its end was recorded:
  // the job is done.
  for (const VersionInfo& v : info->versions) {
    if (v.job_id == id) return v.version;
  }
  std::optional<Checkpoint> checkpoint;
  if (r.options.resume) checkpoint = LoadCheckpoint(id);
  // Uploads may append to the dataset while a job waits to resume: its
  // checkpoint is of other examples then, and it starts over.
  if (checkpoint && checkpoint->examples != ExamplesDigest(examples) &&
      checkpoint->examples != ExamplesDigestById(examples)) {
    LogWarning("job %s: its dataset changed since its checkpoint; it starts over", id);
    checkpoint.reset();
  }
  Update(id, [&](JobRecord& rec) {
    rec.epochs = checkpoint ? checkpoint->epochs : std::vector<EpochStats>{};
    if (checkpoint) {
      LogInfo("job %s: resuming from its checkpoint after epoch %d", id,
              checkpoint->epochs.empty() ? 0 : checkpoint->epochs.back().epoch);
    }
  });
  for (const StoredExample& e : examples) {
    if (std::find(info->classes.begin(), info->classes.end(), e.label) == info->classes.end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("dataset \"", r.dataset, "\" now has label \"", Bounded(e.label),
                       "\", which the model does not have (appended while the job waited)"));
    }
  }
  {
    absl::MutexLock lock(&mu_);
    jobs_.at(id).examples_digest = ExamplesDigest(examples);
  }
  if (!info->private_stages.empty()) return FineTuneJob(id, r, *info, examples, checkpoint);
  Update(id, [](JobRecord& rec) { rec.phase = "computing features"; });
  if (r.options.sweep) {
    HeadSpec spec;
    std::string feature_layer;
    auto swept = SweepHead(id, *info, examples, r.options, &spec, &feature_layer);
    if (!swept.ok()) return swept.status();
    return StoreVersion(id, r, *info, examples, swept->head, spec, feature_layer, {},
                        swept->train.accuracy, std::move(swept->validation));
  }
  Resume resume = ResumeFor(id, "head", checkpoint);
  auto trained = FitHead(id, r, *info, examples, r.options, /*warmup=*/false,
                         r.options.resume ? &resume : nullptr);
  if (!trained.ok()) return trained.status();
  return StoreVersion(id, r, *info, examples, trained->head, info->head, "", {},
                      trained->train.accuracy, std::move(trained->validation));
}

}  // namespace tlserve
