// What a training job computes: features with the frozen backbone and a
// head fitted on them, or fine-tuning of the model's private stages. The
// job's lifecycle (queue, states, watchers) is in jobs.cc.
#include <ATen/ATen.h>
#include <torch/torch.h>

#include "absl/strings/str_cat.h"
#include "server/core/fine_tuner.h"
#include "server/core/image_decoder.h"
#include "server/core/jobs.h"
#include "server/core/metrics.h"
#include "server/core/preprocess.h"

namespace tlserve {

absl::StatusOr<int> JobRunner::FineTuneJob(const std::string& id, const JobRecord& r,
                                           const ModelInfo& info,
                                           const std::vector<StoredExample>& examples) {
  auto start = models_->Start(r.model);
  if (!start.ok()) return start.status();
  const int64_t classes = static_cast<int64_t>(info.classes.size());
  torch::nn::Sequential head = MakeHead(info.head, backbone_->embedding_dim(), classes);
  if (start->served) {  // warm start: the served version's head (the notebook's second step)
    if (absl::Status s = LoadHead(SaveHead(start->served->head), head); !s.ok()) return s;
  }
  std::map<std::string, int64_t> class_index;
  for (size_t i = 0; i < info.classes.size(); ++i) class_index[info.classes[i]] = i;
  FineTuneData data;
  data.examples = &examples;
  for (size_t i = 0; i < examples.size(); ++i) {
    data.labels.push_back(class_index.at(examples[i].label));
    (DatasetCatalog::IsValidation(examples[i].hash, r.options.validation_fraction) ? data.val
                                                                                   : data.train)
        .push_back(static_cast<int64_t>(i));
  }
  Update(id, [](JobRecord& rec) { rec.phase = "fine-tuning"; });
  auto tuned = FineTune(*backbone_, std::move(start->stages), head, classes, data, r.options,
                        OnEpoch(id, r), [&] { return Cancelled(id); });
  if (!tuned.ok()) return tuned.status();
  VersionInfo v;
  v.job_id = id;
  v.train_accuracy = tuned->train.accuracy;
  v.validation = tuned->validation;
  return models_->AddVersion(r.model, tuned->head, tuned->stages, v);
}

absl::StatusOr<int> JobRunner::Train(const std::string& id) {
  JobRecord r;
  std::vector<StoredExample> examples;
  {
    absl::MutexLock lock(&mu_);
    r = jobs_.at(id).record;
    examples = std::move(jobs_.at(id).examples);
  }
  auto info = models_->Get(r.model);
  if (!info.ok()) return info.status();
  if (!info->private_stages.empty()) return FineTuneJob(id, r, *info, examples);
  std::map<std::string, int64_t> class_index;
  for (size_t i = 0; i < info->classes.size(); ++i) class_index[info->classes[i]] = i;

  // Features of every example with the frozen backbone, once: normal tensors
  // (not inference tensors), so that training can use them.
  const int64_t n = static_cast<int64_t>(examples.size()), dim = backbone_->embedding_dim();
  at::Tensor features = at::empty({n, dim});
  constexpr int64_t kBatch = 32;
  std::vector<int64_t> pending;
  auto flush = [&]() -> absl::Status {
    if (pending.empty()) return absl::OkStatus();
    std::vector<at::Tensor> inputs;
    for (int64_t i : pending) {
      auto rgb = DecodeImage(examples[i].bytes, 1LL << 40);
      if (!rgb.ok()) return rgb.status();
      inputs.push_back(Preprocess(*rgb, backbone_->preprocess()));
    }
    const at::Tensor out = backbone_->Embed(at::stack(inputs), EmbedSpec{}).clone();
    for (size_t k = 0; k < pending.size(); ++k) {
      features[pending[k]].copy_(out[k]);
      feature_cache_.Put(absl::StrCat(backbone_->sha256(), ":", examples[pending[k]].id),
                         out[k].clone());
    }
    pending.clear();
    return absl::OkStatus();
  };
  for (int64_t i = 0; i < n; ++i) {
    if (Cancelled(id)) return absl::CancelledError("cancelled");
    const at::Tensor cached =
        feature_cache_.Get(absl::StrCat(backbone_->sha256(), ":", examples[i].id));
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

  std::vector<int64_t> train_idx, val_idx, train_y, val_y;
  for (int64_t i = 0; i < n; ++i) {
    const bool val = DatasetCatalog::IsValidation(examples[i].hash, r.options.validation_fraction);
    (val ? val_idx : train_idx).push_back(i);
    (val ? val_y : train_y).push_back(class_index.at(examples[i].label));
  }
  auto take = [&](const std::vector<int64_t>& idx) {
    return features.index_select(0, torch::tensor(idx, torch::kLong));
  };
  Update(id, [](JobRecord& rec) { rec.phase = "training the head"; });
  const int64_t classes = static_cast<int64_t>(info->classes.size());
  auto trained = TrainHead(
      info->head, classes, take(train_idx), torch::tensor(train_y, torch::kLong),
      val_idx.empty() ? at::empty({0, dim}) : take(val_idx), torch::tensor(val_y, torch::kLong),
      r.options, OnEpoch(id, r), [&] { return Cancelled(id); });
  if (!trained.ok()) return trained.status();
  VersionInfo v;
  v.job_id = id;
  v.train_accuracy = trained->train.accuracy;
  v.validation = trained->validation;
  return models_->AddVersion(r.model, trained->head, {}, v);
}

}  // namespace tlserve
