// Trains a classifier head on cached features ("feature extraction"): a
// linear head with full-batch L-BFGS (the notebook's logistic regression) or
// any head with minibatch AdamW. Features are standardised for training and
// the standardisation is folded into the first layer afterwards, so the head
// takes raw embeddings. L-BFGS keeps its converged weights (the regularised
// optimum, as scikit-learn's LogisticRegression); AdamW and SGD keep the
// weights of their best epoch by validation accuracy. Not thread-safe; runs
// on the job thread.
#ifndef TLSERVE_SERVER_CORE_HEAD_TRAINER_H_
#define TLSERVE_SERVER_CORE_HEAD_TRAINER_H_

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/core/head.h"
#include "server/core/run_state.h"

namespace tlserve {

struct TrainOptions {
  enum class Optimizer { kDefault, kLbfgs, kAdamw, kSgd };
  int epochs = 0;  // 0: 30 for L-BFGS, 10 for AdamW
  int batch_size = 64;
  Optimizer optimizer = Optimizer::kDefault;
  float learning_rate = 0;  // 0: 1 for L-BFGS, 1e-3 for AdamW
  // L2 penalty on weights (not biases); < 0: the default, 1 for L-BFGS (the
  // objective of scikit-learn's LogisticRegression with its default C = 1:
  // mean loss + |W|^2 / (2 n)), 1e-4 (decoupled) for AdamW and SGD.
  float weight_decay = -1;
  float label_smoothing = 0;
  bool balanced_class_weights = false;
  int early_stopping_patience = 0;
  float validation_fraction = 0.15f;
  uint64_t seed = 0;
  // Fine-tuning (models with unfrozen stages) only:
  float stage_learning_rate = 0;  // 0: learning_rate / 10
  bool augment = false;           // random resized crop + horizontal flip
  // BatchNorm statistics of the private stages stay as they are (the
  // default: trained on small batches they wrecked the model, README).
  bool freeze_batchnorm = true;
  // A cold head (no trained version yet) is fitted alone before fine-tuning.
  bool head_first = true;
  // Fine-tuning's recipe (docs/experiments.md has the evidence): the
  // learning rate warms up linearly over warmup_fraction of the steps, then
  // decays along a cosine to 0 (kConstant: as before); the trainable private
  // stage d places before the deepest trains at stage_learning_rate *
  // layer_decay^d; with gradual_unfreezing the deepest trains from epoch 1
  // and stage d from epoch 1 + floor(d * epochs / (2 * stages)).
  enum class Schedule { kWarmupCosine, kConstant };
  Schedule schedule = Schedule::kWarmupCosine;
  float warmup_fraction = 0.1f;
  float layer_decay = 0.5f;
  bool gradual_unfreezing = true;
  // Whether the version a job makes is served: only when its validation
  // accuracy is not below the served version's on the same images (the
  // default), always, or never (serve it later by hand).
  enum class Serve { kIfNotWorse, kAlways, kNever };
  Serve serve = Serve::kIfNotWorse;
  // In (0, 1): per-class confidence thresholds chosen on the validation split
  // for this precision (Classify's "unknown" below them); 0: none.
  float target_precision = 0;
  // A job that a restart (SIGTERM or kill -9) interrupts resumes from its
  // last epoch's checkpoint; false: it fails as "interrupted" instead.
  bool resume = true;
  // A sweep (head-only models): one head per L2 strength and head shape,
  // trained at once on the same cached features and chosen by k-fold
  // cross-validation on the training split (1: by the validation split);
  // the winner, refitted on the training split, is the version.
  bool sweep = false;
  std::vector<double> sweep_l2;  // empty: DefaultL2Grid() (LogisticRegressionCV's Cs=10)
  int sweep_folds = 5;
  // Head shapes: 0 linear, H one hidden layer of H units; empty: the model's
  // own head. A winner of another shape than the model's is recorded with
  // its version (VersionInfo::head).
  std::vector<int> sweep_hidden;
  // Feature layers: backbone stage names (average-pooled) or "embedding";
  // empty: the embedding. A winner on another layer is recorded with its
  // version (VersionInfo::feature_layer).
  std::vector<std::string> sweep_layers;
};

// Resolves defaults for a model with (`fine_tune`) or without unfrozen
// stages; INVALID_ARGUMENT naming the option that is out of range.
absl::StatusOr<TrainOptions> ResolveTrainOptions(TrainOptions o, const HeadSpec& head,
                                                 bool fine_tune);

struct EpochStats {
  int epoch = 0;
  double train_loss = 0, train_accuracy = 0, validation_loss = 0, validation_accuracy = 0;
  double images_per_second = 0, elapsed_seconds = 0, eta_seconds = 0;
};

struct Evaluation {
  double loss = 0;
  double accuracy = 0;
  std::vector<double> precision, recall;
  std::vector<int64_t> support;
  std::vector<int64_t> confusion;  // true × predicted, row-major
  // N×C float32 on the host, in the order of the examples (calibration fits
  // a temperature on the validation split's); not stored with a version.
  at::Tensor logits;
};

// Loss and metrics of `head` on features `x` (N×D, on the head's device)
// with labels `y` (N, any device), scored on the host.
Evaluation Evaluate(torch::nn::Sequential& head, const at::Tensor& x, const at::Tensor& y,
                    int64_t classes);

struct TrainedHead {
  torch::nn::Sequential head;
  std::vector<EpochStats> history;
  Evaluation train, validation;
};

// The error of a run whose loss became `loss` (NaN or infinite) in `epoch`.
absl::Status TrainingDiverged(int epoch, double loss);

// CANCELLED when `cancelled()` turns true between epochs; FAILED_PRECONDITION
// (TrainingDiverged) when the loss stops being finite. The features, labels
// and head all live on `device` (the backbone's) while training; the head
// comes back there. With `resume`, saves its state after each epoch and, when
// resume->state is set, continues from it.
absl::StatusOr<TrainedHead> TrainHead(
    const HeadSpec& spec, int64_t classes, const at::Tensor& x_train, const at::Tensor& y_train,
    const at::Tensor& x_val, const at::Tensor& y_val, const TrainOptions& options,
    const std::function<void(const EpochStats&)>& on_epoch, const std::function<bool()>& cancelled,
    const torch::Device& device = torch::kCPU, Resume* resume = nullptr);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_HEAD_TRAINER_H_
