#include "server/core/head_trainer.h"

#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adamw.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/sgd.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/core/run_state.h"

namespace tlserve {
namespace {

namespace F = torch::nn::functional;

at::Tensor Loss(const at::Tensor& logits, const at::Tensor& y, const at::Tensor& weights,
                float smoothing) {
  auto opts = F::CrossEntropyFuncOptions().label_smoothing(smoothing);
  if (weights.defined()) opts = opts.weight(weights);
  return F::cross_entropy(logits, y, opts);
}

at::Tensor L2(torch::nn::Sequential& head) {
  at::Tensor sum = torch::zeros({}, head->parameters().front().options());
  for (const auto& p : head->named_parameters()) {
    if (p.key().find("weight") != std::string::npos) sum = sum + p.value().pow(2).sum();
  }
  return sum;
}

std::vector<at::Tensor> Snapshot(torch::nn::Sequential& head) {
  std::vector<at::Tensor> s;
  for (const auto& p : head->parameters()) s.push_back(p.detach().clone());
  return s;
}

void Restore(torch::nn::Sequential& head, const std::vector<at::Tensor>& s) {
  torch::NoGradGuard no_grad;
  auto params = head->parameters();
  for (size_t i = 0; i < params.size(); ++i) params[i].copy_(s[i]);
}

}  // namespace

absl::StatusOr<TrainOptions> ResolveTrainOptions(TrainOptions o, const HeadSpec& head,
                                                 bool fine_tune) {
  if (o.optimizer == TrainOptions::Optimizer::kDefault) {
    o.optimizer = head.hidden.empty() && !fine_tune ? TrainOptions::Optimizer::kLbfgs
                                                    : TrainOptions::Optimizer::kAdamw;
  }
  const bool lbfgs = o.optimizer == TrainOptions::Optimizer::kLbfgs;
  if (lbfgs && (!head.hidden.empty() || fine_tune)) {
    return absl::InvalidArgumentError(
        "options.optimizer: L-BFGS trains a linear head alone; use ADAMW or SGD for a head with "
        "hidden layers or a model with unfrozen stages");
  }
  if (o.epochs == 0) o.epochs = lbfgs ? 30 : 10;
  if (o.learning_rate == 0) {
    o.learning_rate = lbfgs ? 1.0f : o.optimizer == TrainOptions::Optimizer::kSgd ? 1e-2f : 1e-3f;
  }
  if (o.stage_learning_rate == 0) o.stage_learning_rate = o.learning_rate / 10;
  if (o.weight_decay < 0) o.weight_decay = lbfgs ? 1.0f : 1e-4f;
  if (!(o.stage_learning_rate > 0 && o.stage_learning_rate <= 100)) {
    return absl::InvalidArgumentError("options.stage_learning_rate must be in (0, 100]");
  }
  if (o.epochs < 1 || o.epochs > 10000) {
    return absl::InvalidArgumentError("options.epochs must be in [1, 10000]");
  }
  if (o.batch_size < 1 || o.batch_size > 65536) {
    return absl::InvalidArgumentError("options.batch_size must be in [1, 65536]");
  }
  if (!(o.learning_rate > 0 && o.learning_rate <= 100)) {
    return absl::InvalidArgumentError("options.learning_rate must be in (0, 100]");
  }
  if (!(o.weight_decay >= 0 && o.weight_decay <= 10)) {
    return absl::InvalidArgumentError("options.weight_decay must be in [0, 10]");
  }
  if (!(o.label_smoothing >= 0 && o.label_smoothing < 1)) {
    return absl::InvalidArgumentError("options.label_smoothing must be in [0, 1)");
  }
  if (!(o.validation_fraction >= 0 && o.validation_fraction < 1)) {
    return absl::InvalidArgumentError("options.validation_fraction must be in [0, 1)");
  }
  if (o.sweep) {
    if (fine_tune) {
      return absl::InvalidArgumentError(
          "options.sweep trains heads on frozen features; a model with unfrozen stages "
          "fine-tunes instead (freeze them, or train without a sweep)");
    }
    if (o.sweep_hidden.empty() &&
        (head.hidden.size() > 1 || (!head.hidden.empty() && head.dropout > 0))) {
      return absl::InvalidArgumentError(
          "options.sweep: the model's head must be linear or one hidden layer without dropout, "
          "or give the head shapes to try (sweep.hidden)");
    }
    if (o.sweep_hidden.size() > 8) {
      return absl::InvalidArgumentError("options.sweep.hidden: at most 8 head shapes");
    }
    if (o.sweep_layers.size() > 4) {
      return absl::InvalidArgumentError("options.sweep.layers: at most 4 feature layers");
    }
    for (size_t i = 0; i < o.sweep_layers.size(); ++i) {
      if (o.sweep_layers[i].empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("options.sweep.layers[", i, "] is empty; name a stage, or \"embedding\""));
      }
      for (size_t j = 0; j < i; ++j) {
        if (o.sweep_layers[j] == o.sweep_layers[i]) {
          return absl::InvalidArgumentError(
              absl::StrCat("options.sweep.layers: \"", o.sweep_layers[i], "\" is given twice"));
        }
      }
    }
    for (size_t i = 0; i < o.sweep_hidden.size(); ++i) {
      if (o.sweep_hidden[i] < 0 || o.sweep_hidden[i] > 16384) {
        return absl::InvalidArgumentError(absl::StrCat(
            "options.sweep.hidden[", i, "] must be 0 (linear) or a width in [1, 16384]"));
      }
      for (size_t j = 0; j < i; ++j) {
        if (o.sweep_hidden[j] == o.sweep_hidden[i]) {
          return absl::InvalidArgumentError(
              absl::StrCat("options.sweep.hidden: ", o.sweep_hidden[i], " is given twice"));
        }
      }
    }
    if (o.sweep_folds != 1 && (o.sweep_folds < 2 || o.sweep_folds > 20)) {
      return absl::InvalidArgumentError(
          "options.sweep.folds must be 2-20 (k-fold), or 1 (choose on the validation split)");
    }
    if (o.sweep_folds == 1 && o.validation_fraction == 0) {
      return absl::InvalidArgumentError(
          "options.sweep.folds 1 chooses on the validation split; validation_fraction is 0");
    }
    if (o.sweep_l2.size() > 32) {
      return absl::InvalidArgumentError("options.sweep.l2: at most 32 values");
    }
    for (size_t i = 0; i < o.sweep_l2.size(); ++i) {
      if (!(o.sweep_l2[i] >= 0 && o.sweep_l2[i] <= 1e8)) {
        return absl::InvalidArgumentError(
            absl::StrCat("options.sweep.l2[", i, "] must be in [0, 1e8]"));
      }
    }
  }
  if (!(o.warmup_fraction >= 0 && o.warmup_fraction < 1)) {
    return absl::InvalidArgumentError("options.warmup_fraction must be in [0, 1)");
  }
  if (!(o.layer_decay > 0 && o.layer_decay <= 1)) {
    return absl::InvalidArgumentError("options.layer_decay must be in (0, 1]");
  }
  if (!(o.target_precision >= 0 && o.target_precision < 1)) {
    return absl::InvalidArgumentError(
        "options.target_precision must be in [0, 1) (0: no confidence thresholds)");
  }
  if (o.target_precision > 0 && o.validation_fraction == 0) {
    return absl::InvalidArgumentError(
        "options.target_precision needs a validation split to choose thresholds on; set "
        "validation_fraction above 0");
  }
  if (o.early_stopping_patience < 0) {
    return absl::InvalidArgumentError("options.early_stopping_patience must be >= 0");
  }
  return o;
}

absl::Status TrainingDiverged(int epoch, double loss) {
  return absl::FailedPreconditionError(absl::StrCat(
      "training diverged: the loss became ", loss, " in epoch ", epoch,
      "; lower options.learning_rate (and stage_learning_rate); the model keeps its last good "
      "version"));
}

Evaluation Evaluate(torch::nn::Sequential& head, const at::Tensor& x, const at::Tensor& y,
                    int64_t classes) {
  Evaluation e;
  e.precision.assign(classes, 0);
  e.recall.assign(classes, 0);
  e.support.assign(classes, 0);
  e.confusion.assign(classes * classes, 0);
  if (x.size(0) == 0) return e;
  torch::NoGradGuard no_grad;
  head->eval();
  // Computed where the head is; scored on the host.
  const at::Tensor logits = head->forward(x).to(torch::kCPU, torch::kFloat);
  e.loss = F::cross_entropy(logits, y.to(torch::kCPU)).item<double>();
  e.logits = logits;
  const at::Tensor pred = logits.argmax(1);
  const at::Tensor y64 = y.to(torch::kCPU, torch::kLong).contiguous();
  e.accuracy = pred.eq(y64).to(torch::kDouble).mean().item<double>();
  const auto* t = y64.data_ptr<int64_t>();
  const at::Tensor p64 = pred.to(torch::kLong).contiguous();
  const auto* p = p64.data_ptr<int64_t>();
  for (int64_t i = 0; i < y.size(0); ++i) ++e.confusion[t[i] * classes + p[i]];
  for (int64_t c = 0; c < classes; ++c) {
    int64_t tp = e.confusion[c * classes + c], predicted = 0;
    for (int64_t r = 0; r < classes; ++r) {
      predicted += e.confusion[r * classes + c];
      e.support[c] += e.confusion[c * classes + r];
    }
    e.precision[c] = predicted ? static_cast<double>(tp) / predicted : 0;
    e.recall[c] = e.support[c] ? static_cast<double>(tp) / e.support[c] : 0;
  }
  return e;
}

absl::StatusOr<TrainedHead> TrainHead(const HeadSpec& spec, int64_t classes,
                                      const at::Tensor& x_train_in, const at::Tensor& y_train_in,
                                      const at::Tensor& x_val_in, const at::Tensor& y_val_in,
                                      const TrainOptions& o,
                                      const std::function<void(const EpochStats&)>& on_epoch,
                                      const std::function<bool()>& cancelled,
                                      const torch::Device& device, Resume* resume) {
  // Everything on one device: the features, the labels and the head.
  const at::Tensor x_train_raw = x_train_in.to(device, torch::kFloat);
  const at::Tensor y_train = y_train_in.to(device);
  const at::Tensor x_val_raw = x_val_in.to(device, torch::kFloat);
  const at::Tensor y_val = y_val_in.to(device);
  const int64_t n = x_train_raw.size(0), dim = x_train_raw.size(1);
  if (n == 0) return absl::FailedPreconditionError("no training examples");
  torch::manual_seed(o.seed);
  // Standardise with the training split's statistics (better conditioned).
  const at::Tensor mean = x_train_raw.mean(0);
  const at::Tensor std = x_train_raw.std(0, /*unbiased=*/false).clamp_min(1e-6);
  const at::Tensor x_train = (x_train_raw - mean) / std;
  const at::Tensor x_val = (x_val_raw - mean) / std;
  at::Tensor weights;
  if (o.balanced_class_weights) {
    const at::Tensor counts = torch::bincount(y_train, {}, classes).to(torch::kFloat);
    weights = (static_cast<float>(n) / (classes * counts.clamp_min(1)));
  }

  TrainedHead out;
  out.head = MakeHead(spec, dim, classes);
  torch::nn::Sequential& head = out.head;
  head->to(device);
  const bool lbfgs = o.optimizer == TrainOptions::Optimizer::kLbfgs;
  std::unique_ptr<torch::optim::Optimizer> opt;
  if (lbfgs) {
    opt = std::make_unique<torch::optim::LBFGS>(head->parameters(),
                                                torch::optim::LBFGSOptions(o.learning_rate)
                                                    .max_iter(20)
                                                    .history_size(20)
                                                    .line_search_fn("strong_wolfe"));
  } else if (o.optimizer == TrainOptions::Optimizer::kSgd) {
    opt = std::make_unique<torch::optim::SGD>(
        head->parameters(),
        torch::optim::SGDOptions(o.learning_rate).momentum(0.9).weight_decay(o.weight_decay));
  } else {
    opt = std::make_unique<torch::optim::AdamW>(
        head->parameters(),
        torch::optim::AdamWOptions(o.learning_rate).weight_decay(o.weight_decay));
  }
  const absl::Time start = absl::Now();
  double best = -1;
  int since_best = 0;
  std::vector<at::Tensor> best_params = Snapshot(head);
  const bool has_val = x_val.size(0) > 0;
  double previous_loss = std::numeric_limits<double>::infinity();
  int first_epoch = 1;
  bool finished = false;
  if (resume != nullptr && !resume->state.empty()) {
    RunState rs;
    rs.current = head->parameters();
    rs.best_weights = best_params;
    // L-BFGS restarts its curvature history from the saved weights (its
    // state has tensors it leaves undefined); the others continue theirs.
    if (absl::Status s = LoadRunState(resume->state, rs, lbfgs ? nullptr : opt.get()); !s.ok()) {
      return s;
    }
    best = rs.best;
    since_best = rs.since_best;
    previous_loss = rs.previous_loss;
    out.history = rs.history;
    first_epoch = rs.epoch + 1;
    finished = rs.finished;
  }
  for (int epoch = first_epoch; epoch <= o.epochs && !finished; ++epoch) {
    if (cancelled && cancelled()) return absl::CancelledError("the job was cancelled");
    // Each epoch's shuffle (and dropout) from its own seed: a run resumed
    // after epoch k draws what an uninterrupted one draws.
    torch::manual_seed(o.seed * 1000003 + static_cast<uint64_t>(epoch));
    head->train();
    if (lbfgs) {
      auto closure = [&] {
        opt->zero_grad();
        at::Tensor loss = Loss(head->forward(x_train), y_train, weights, o.label_smoothing) +
                          0.5 * o.weight_decay * L2(head) / static_cast<double>(n);
        loss.backward();
        return loss;
      };
      static_cast<torch::optim::LBFGS*>(opt.get())->step(closure);
    } else {
      const at::Tensor order =
          torch::randperm(n, torch::TensorOptions().dtype(torch::kLong)).to(device);
      for (int64_t b = 0; b < n; b += o.batch_size) {
        const at::Tensor idx = order.slice(0, b, std::min(n, b + o.batch_size));
        opt->zero_grad();
        at::Tensor loss = Loss(head->forward(x_train.index_select(0, idx)),
                               y_train.index_select(0, idx), weights, o.label_smoothing);
        const double value = loss.item<double>();
        if (!std::isfinite(value)) return TrainingDiverged(epoch, value);
        loss.backward();
        opt->step();
      }
    }
    const Evaluation tr = Evaluate(head, x_train, y_train, classes);
    if (!std::isfinite(tr.loss)) return TrainingDiverged(epoch, tr.loss);
    const Evaluation va = has_val ? Evaluate(head, x_val, y_val, classes) : tr;
    EpochStats s;
    s.epoch = epoch;
    s.train_loss = tr.loss;
    s.train_accuracy = tr.accuracy;
    s.validation_loss = va.loss;
    s.validation_accuracy = va.accuracy;
    const int run = epoch - first_epoch + 1;  // epochs of this process
    s.elapsed_seconds = absl::ToDoubleSeconds(absl::Now() - start);
    s.images_per_second = n * run / std::max(1e-9, s.elapsed_seconds);
    s.eta_seconds = s.elapsed_seconds / run * (o.epochs - epoch);
    out.history.push_back(s);
    // Full-batch L-BFGS minimises a convex, regularised objective: its last
    // iterate is the answer (scikit-learn's too), and picking an earlier one
    // by a small validation split's accuracy would be early stopping by
    // chance. Minibatch optimisers keep their best epoch by validation.
    if (lbfgs || va.accuracy > best) {
      best = va.accuracy;
      best_params = Snapshot(head);
      since_best = 0;
    } else if (o.early_stopping_patience > 0 && ++since_best >= o.early_stopping_patience) {
      finished = true;
    }
    // Full-batch L-BFGS has converged when an epoch of 20 iterations no
    // longer lowers the loss (relative change under 1e-6): more epochs
    // would repeat the same weights.
    if (lbfgs && std::fabs(previous_loss - tr.loss) <= 1e-6 * std::max(1.0, std::fabs(tr.loss))) {
      finished = true;
    }
    previous_loss = tr.loss;
    // The state that continues after this epoch, saved before it is reported.
    if (resume != nullptr && resume->save) {
      RunState rs;
      rs.epoch = epoch;
      rs.best = best;
      rs.since_best = since_best;
      rs.previous_loss = previous_loss;
      rs.finished = finished;
      rs.current = head->parameters();
      rs.best_weights = best_params;
      rs.history = out.history;
      resume->save(s, SaveRunState(rs, lbfgs ? nullptr : opt.get()));
    }
    if (on_epoch) on_epoch(s);
  }
  Restore(head, best_params);
  out.train = Evaluate(head, x_train, y_train, classes);
  out.validation = has_val ? Evaluate(head, x_val, y_val, classes) : Evaluation{};
  // Fold the standardisation into the first layer: W' = W / std, b' = b - W' mean.
  {
    torch::NoGradGuard no_grad;
    auto first = head->ptr(0)->as<torch::nn::Linear>();
    first->weight.div_(std.unsqueeze(0));
    first->bias.sub_(first->weight.matmul(mean));
  }
  head->eval();
  return out;
}

}  // namespace tlserve
