#include "server/core/fine_tuner.h"

#include <torch/nn/functional/loss.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>
#include <torch/script.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/core/engine/stage_plan.h"
#include "server/core/image_decoder.h"
#include "server/core/preprocess.h"
#include "server/core/training/schedule.h"

#if __has_include(<ATen/autocast_mode.h>)
#include <ATen/autocast_mode.h>
#define TLSERVE_HAVE_AUTOCAST 1
#endif

namespace tlserve {
namespace {

namespace F = torch::nn::functional;

// Everything that trains or is restored with the best epoch.
std::vector<at::Tensor> State(std::map<int, std::shared_ptr<torch::jit::Module>>& stages,
                              torch::nn::Sequential& head) {
  std::vector<at::Tensor> out;
  for (auto& [i, m] : stages) {
    for (const auto& p : m->parameters()) out.push_back(p);
    for (const auto& b : m->buffers()) out.push_back(b);
  }
  for (const auto& p : head->parameters()) out.push_back(p);
  return out;
}

// Mixed precision on CUDA when the backbone runs in a reduced dtype: the
// master weights stay float32, each forward runs under autocast to bf16
// (thread-local: this job's thread only; bf16 needs no loss scaling, also
// when the backbone serves in fp16). One guard per forward: leaving it
// clears autocast's cache of low-precision weight copies, which would go
// stale after the optimizer's step. Nothing on the CPU.
class Autocast {
 public:
  explicit Autocast(const Backbone& backbone) {
#ifdef TLSERVE_HAVE_AUTOCAST
    on_ = backbone.torch_device().is_cuda() && backbone.scalar_type() != at::kFloat;
    if (!on_) return;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    at::autocast::set_autocast_enabled(at::kCUDA, true);
#else
    at::autocast::set_autocast_gpu_dtype(at::kBFloat16);
    at::autocast::set_enabled(true);
#endif
#else
    (void)backbone;
#endif
  }
  ~Autocast() {
#ifdef TLSERVE_HAVE_AUTOCAST
    if (!on_) return;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    at::autocast::set_autocast_enabled(at::kCUDA, false);
#else
    at::autocast::set_enabled(false);
#endif
    at::autocast::clear_cache();
#endif
  }
  Autocast(const Autocast&) = delete;
  Autocast& operator=(const Autocast&) = delete;

 private:
  bool on_ = false;
};

}  // namespace

absl::StatusOr<FineTuned> FineTune(Engine& engine,
                                   std::map<int, std::shared_ptr<torch::jit::Module>> stages,
                                   torch::nn::Sequential head, int64_t classes,
                                   const FineTuneData& data, const TrainOptions& o,
                                   const std::function<void(const EpochStats&)>& on_epoch,
                                   const std::function<bool()>& cancelled, Resume* resume) {
  const Backbone& backbone = engine.backbone();
  const torch::Device device = backbone.torch_device();
  if (stages.empty()) return absl::InvalidArgumentError("no private stages to fine-tune");
  if (data.train.empty()) return absl::FailedPreconditionError("no training examples");
  torch::manual_seed(o.seed);
  std::mt19937_64 rng(o.seed);
  std::uniform_real_distribution<double> uniform(0, 1);
  // The run's plan: its own copies of the private stages and its head on
  // the device; shared stages after the first private one stay frozen, but
  // gradients flow through them.
  head->to(device);
  const StagePlan plan(backbone, stages, head);
  const int first = plan.first_private();

  // The frozen prefix's output for a batch of examples, without gradient,
  // computed by the device engine (at training priority, in its batches).
  // Kept between epochs (without augmentation) while the budgets last: on
  // the device first, then in host memory (pinned on CUDA); the rest are
  // recomputed each time.
  std::map<int64_t, at::Tensor> prefix_cache;
  int64_t device_cache_bytes = 0, host_cache_bytes = 0;
  auto prefix = [&](const std::vector<int64_t>& idx, bool augment) -> absl::StatusOr<at::Tensor> {
    std::vector<at::Tensor> inputs, cached;
    std::vector<int64_t> missing;
    for (int64_t i : idx) {
      if (augment || !prefix_cache.count(i)) missing.push_back(i);
    }
    if (!missing.empty()) {
      auto bytes = data.read(missing);
      if (!bytes.ok()) return bytes.status();
      for (size_t k = 0; k < missing.size(); ++k) {
        const PreprocessSpec& spec = backbone.preprocess();
        absl::StatusOr<at::Tensor> x;
        if (augment) {
          auto rgb = DecodeImage((*bytes)[k], data.max_image_pixels);
          if (!rgb.ok()) return rgb.status();
          x = PreprocessAugmented(*rgb, spec, [&] { return uniform(rng); });
        } else {
          x = DecodeAndPreprocessUint8((*bytes)[k], spec, data.max_image_pixels);
        }
        if (!x.ok()) {
          return absl::Status(x.status().code(),
                              absl::StrCat("example ", missing[k], ": ", x.status().message()));
        }
        inputs.push_back(*std::move(x));
      }
    }
    at::Tensor computed;
    if (!inputs.empty()) {
      torch::NoGradGuard no_grad;
      if (first == 0) {  // no shared prefix: the normalised input itself
        at::Tensor x = at::stack(inputs);
        if (x.scalar_type() == at::kByte) x = Normalize(x, backbone.preprocess());
        computed = backbone.ToDevice(x);
      } else {
        std::vector<Engine::Work> work(inputs.size());
        for (size_t k = 0; k < inputs.size(); ++k) {
          work[k].input = std::move(inputs[k]);
          work[k].output = Engine::Output::kActivations;
          work[k].spec.stage = first - 1;
          work[k].priority = Engine::Priority::kTraining;
          work[k].lane = data.lane;
        }
        auto out = engine.Run(std::move(work));
        if (!out.ok()) return out.status();
        std::vector<at::Tensor> rows;
        for (const EngineResult& r : *out) {
          engine.streams().UseOnCurrentStream(r.values);  // made on the engine's stream
          rows.push_back(r.values);
        }
        computed = at::stack(rows);
      }
      if (augment) return computed;
    }
    // A ResNet-50's layer3 output is 800 KB an image in float32.
    std::map<int64_t, at::Tensor> fresh;
    for (size_t k = 0; k < missing.size(); ++k) {
      at::Tensor t = computed[k];
      const int64_t bytes = t.numel() * t.element_size();
      if (device.is_cuda() && device_cache_bytes + bytes <= data.prefix_cache_device_bytes) {
        prefix_cache[missing[k]] = t.clone();  // not a view pinning the whole batch
        device_cache_bytes += bytes;
      } else if (host_cache_bytes + bytes <= data.prefix_cache_bytes) {
        at::Tensor host = t.to(torch::kCPU).clone();
        prefix_cache[missing[k]] = device.is_cuda() ? host.pin_memory() : host;
        host_cache_bytes += bytes;
      } else {
        fresh[missing[k]] = t;
      }
    }
    for (int64_t i : idx) {
      auto it = prefix_cache.find(i);
      cached.push_back(it != prefix_cache.end() ? it->second.to(device, /*non_blocking=*/true)
                                                : fresh.at(i));
    }
    return at::stack(cached);
  };
  // BatchNorm statistics of a batch of one are undefined (and throw on a 1×1
  // feature map): such a batch trains with the statistics frozen.
  auto set_training = [&](bool training, size_t batch) {
    for (auto& [i, m] : stages) {
      bool trainable = false;
      for (const auto& p : m->parameters()) trainable = trainable || p.requires_grad();
      m->train(training && trainable && !o.freeze_batchnorm && batch > 1);
    }
    head->train(training);
  };

  // One optimizer group for the head, then one per trainable private stage,
  // deepest first: a stage d stages before the last trains at
  // stage_learning_rate * layer_decay^d (layer-wise learning-rate decay:
  // early stages hold general features and move least).
  std::vector<std::pair<int, std::vector<at::Tensor>>> stage_groups;  // stage index, params
  for (auto it = stages.rbegin(); it != stages.rend(); ++it) {
    std::vector<at::Tensor> params;
    for (const auto& p : it->second->parameters()) {
      if (p.requires_grad()) params.push_back(p);
    }
    if (!params.empty()) stage_groups.emplace_back(it->first, std::move(params));
  }
  std::vector<double> base_lr = {o.learning_rate};
  for (double lr : StageLearningRates(o.stage_learning_rate, o.layer_decay,
                                      static_cast<int64_t>(stage_groups.size()))) {
    base_lr.push_back(lr);
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  std::unique_ptr<torch::optim::Optimizer> opt;
  const bool sgd = o.optimizer == TrainOptions::Optimizer::kSgd;
  auto group_options = [&](double lr) -> std::unique_ptr<torch::optim::OptimizerOptions> {
    if (sgd) {
      return std::make_unique<torch::optim::SGDOptions>(
          torch::optim::SGDOptions(lr).momentum(0.9).weight_decay(o.weight_decay));
    }
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(lr).weight_decay(o.weight_decay));
  };
  groups.emplace_back(head->parameters(), group_options(base_lr[0]));
  for (size_t d = 0; d < stage_groups.size(); ++d) {
    groups.emplace_back(stage_groups[d].second, group_options(base_lr[d + 1]));
  }
  if (sgd) {
    opt = std::make_unique<torch::optim::SGD>(std::move(groups),
                                              torch::optim::SGDOptions(o.learning_rate));
  } else {
    opt = std::make_unique<torch::optim::AdamW>(std::move(groups),
                                                torch::optim::AdamWOptions(o.learning_rate));
  }
  // The learning rate of every group at a step: a linear warm-up over the
  // first warmup_fraction of the steps, then cosine decay to 0 (or constant).
  auto set_learning_rates = [&](int64_t step, int64_t total) {
    const double factor = LearningRateFactor(o.schedule == TrainOptions::Schedule::kWarmupCosine,
                                             o.warmup_fraction, step, total);
    auto& param_groups = opt->param_groups();
    for (size_t g = 0; g < param_groups.size(); ++g) {
      if (sgd) {
        static_cast<torch::optim::SGDOptions&>(param_groups[g].options()).lr(base_lr[g] * factor);
      } else {
        static_cast<torch::optim::AdamWOptions&>(param_groups[g].options()).lr(base_lr[g] * factor);
      }
    }
  };
  // Gradual unfreezing (ULMFiT's): the deepest stage trains from epoch 1 and
  // the earlier ones join in turn over the first half of the epochs (stage d
  // from epoch 1 + floor(d * epochs / (2 * stages))), so that a model
  // unfrozen from layer3 trains layer4 first, then both, and every stage
  // trains for at least half of the run.
  auto unfreeze_for = [&](int epoch) {
    const int64_t count = static_cast<int64_t>(stage_groups.size());
    for (size_t d = 0; d < stage_groups.size(); ++d) {
      const int64_t starts = UnfreezeEpoch(static_cast<int64_t>(d), count, o.epochs);
      const bool on = !o.gradual_unfreezing || epoch >= starts;
      for (auto& p : stage_groups[d].second) p.set_requires_grad(on);
    }
  };
  at::Tensor weights;
  if (o.balanced_class_weights) {
    std::vector<double> counts(classes, 0);
    for (int64_t i : data.train) counts[data.labels[i]] += 1;
    std::vector<float> w(classes);
    for (int64_t c = 0; c < classes; ++c) {
      w[c] = static_cast<float>(data.train.size() / (classes * std::max(1.0, counts[c])));
    }
    weights = torch::tensor(w).to(device);
  }
  auto labels_of = [&](const std::vector<int64_t>& idx) {
    std::vector<int64_t> y;
    for (int64_t i : idx) y.push_back(data.labels[i]);
    return torch::tensor(y, torch::kLong).to(device);
  };
  // Features of a split through the current stages, for evaluation.
  auto features = [&](const std::vector<int64_t>& idx) -> absl::StatusOr<at::Tensor> {
    torch::NoGradGuard no_grad;
    std::vector<at::Tensor> parts;
    for (size_t b = 0; b < idx.size(); b += o.batch_size) {
      std::vector<int64_t> batch(idx.begin() + b,
                                 idx.begin() + std::min(idx.size(), b + o.batch_size));
      auto x = prefix(batch, false);
      if (!x.ok()) return x.status();
      Autocast autocast(backbone);
      parts.push_back(plan.Run(*x, first, backbone.head_index() - 1).flatten(1).to(torch::kFloat));
    }
    return at::cat(parts);
  };

  FineTuned out;
  const absl::Time start = absl::Now();
  const std::vector<int64_t>& eval_idx = data.val.empty() ? data.train : data.val;
  // Batch boundaries: a trailing batch of one joins the batch before it.
  auto batches = [&](const std::vector<int64_t>& order) {
    std::vector<std::pair<size_t, size_t>> out;
    const size_t n = order.size(), bs = static_cast<size_t>(o.batch_size);
    for (size_t b = 0; b < n; b += bs) {
      size_t e = std::min(n, b + bs);
      if (n - e == 1 && bs > 1) e = n;
      out.emplace_back(b, e);
      if (e == n) break;
    }
    return out;
  };
  // Epoch 0: the starting point, evaluated like every epoch. It is the one
  // to beat: a version never comes out worse than the one it started from.
  set_training(false, 0);
  double best = -1;
  int since_best = 0;
  std::vector<at::Tensor> best_state;
  for (const auto& t : State(stages, head)) best_state.push_back(t.detach().clone());
  int first_epoch = 1;
  bool finished = false;
  if (resume != nullptr && !resume->state.empty()) {
    // Where a previous process left the run: weights, optimizer, best epoch.
    RunState rs;
    rs.current = State(stages, head);
    rs.best_weights = best_state;
    if (absl::Status s = LoadRunState(resume->state, rs, opt.get()); !s.ok()) return s;
    best = rs.best;
    since_best = rs.since_best;
    out.history = rs.history;
    first_epoch = rs.epoch + 1;
    finished = rs.finished;
  } else {
    auto ft = features(data.train);
    if (!ft.ok()) return ft.status();
    auto fv = features(eval_idx);
    if (!fv.ok()) return fv.status();
    const Evaluation tr = Evaluate(head, *ft, labels_of(data.train), classes);
    const Evaluation va = Evaluate(head, *fv, labels_of(eval_idx), classes);
    EpochStats s;
    s.train_loss = tr.loss;
    s.train_accuracy = tr.accuracy;
    s.validation_loss = va.loss;
    s.validation_accuracy = va.accuracy;
    s.elapsed_seconds = absl::ToDoubleSeconds(absl::Now() - start);
    s.eta_seconds = 0;
    out.history.push_back(s);
    if (on_epoch) on_epoch(s);
    best = va.accuracy;
  }
  for (int epoch = first_epoch; epoch <= o.epochs && !finished; ++epoch) {
    // Each epoch's shuffle and augmentation from its own seed: a run resumed
    // after epoch k draws what an uninterrupted one draws.
    rng.seed(o.seed * 1000003 + static_cast<uint64_t>(epoch));
    torch::manual_seed(o.seed * 1000003 + static_cast<uint64_t>(epoch));
    std::vector<int64_t> order = data.train;
    std::shuffle(order.begin(), order.end(), rng);
    double loss_sum = 0;
    int64_t correct = 0;
    unfreeze_for(epoch);
    const auto epoch_batches = batches(order);
    const int64_t per_epoch = static_cast<int64_t>(epoch_batches.size());
    int64_t step = (epoch - 1) * per_epoch;
    for (const auto& [b, e] : epoch_batches) {
      set_learning_rates(step++, per_epoch * o.epochs);
      if (cancelled && cancelled()) return absl::CancelledError("the job was cancelled");
      std::vector<int64_t> batch(order.begin() + b, order.begin() + e);
      if (data.before_step) data.before_step();
      set_training(true, batch.size());
      auto x = prefix(batch, o.augment);
      if (!x.ok()) return x.status();
      const at::Tensor y = labels_of(batch);
      opt->zero_grad();
      at::Tensor logits, loss;
      {
        Autocast autocast(backbone);  // the forward only; backward runs outside it
        logits = plan.Logits(*x);
        auto lo = F::CrossEntropyFuncOptions().label_smoothing(o.label_smoothing);
        if (weights.defined()) lo = lo.weight(weights);
        loss = F::cross_entropy(logits, y, lo);
      }
      const double batch_loss = loss.item<double>();
      if (!std::isfinite(batch_loss)) return TrainingDiverged(epoch, batch_loss);
      loss.backward();
      opt->step();
      loss_sum += batch_loss * batch.size();
      correct += logits.argmax(1).eq(y).sum().item<int64_t>();
    }
    set_training(false, 0);
    auto fv = features(eval_idx);
    if (!fv.ok()) return fv.status();
    const Evaluation va = Evaluate(head, *fv, labels_of(eval_idx), classes);
    if (!std::isfinite(va.loss)) return TrainingDiverged(epoch, va.loss);
    EpochStats s;
    s.epoch = epoch;
    s.train_loss = loss_sum / order.size();
    s.train_accuracy = static_cast<double>(correct) / order.size();
    s.validation_loss = va.loss;
    s.validation_accuracy = va.accuracy;
    const int run = epoch - first_epoch + 1;  // epochs of this process
    s.elapsed_seconds = absl::ToDoubleSeconds(absl::Now() - start);
    s.images_per_second = order.size() * run / std::max(1e-9, s.elapsed_seconds);
    s.eta_seconds = s.elapsed_seconds / run * (o.epochs - epoch);
    out.history.push_back(s);
    if (va.accuracy > best) {
      best = va.accuracy;
      best_state.clear();
      for (const auto& t : State(stages, head)) best_state.push_back(t.detach().clone());
      since_best = 0;
    } else if (o.early_stopping_patience > 0 && ++since_best >= o.early_stopping_patience) {
      finished = true;
    }
    // The state that continues after this epoch, saved before it is reported.
    if (resume != nullptr && resume->save) {
      RunState rs;
      rs.epoch = epoch;
      rs.best = best;
      rs.since_best = since_best;
      rs.finished = finished;
      rs.current = State(stages, head);
      rs.best_weights = best_state;
      rs.history = out.history;
      resume->save(s, SaveRunState(rs, opt.get()));
    }
    if (on_epoch) on_epoch(s);
  }
  {
    torch::NoGradGuard no_grad;
    auto now = State(stages, head);
    for (size_t k = 0; k < now.size(); ++k) now[k].copy_(best_state[k]);
  }
  set_training(false, 0);
  auto ft = features(data.train);
  if (!ft.ok()) return ft.status();
  out.train = Evaluate(head, *ft, labels_of(data.train), classes);
  if (!data.val.empty()) {
    auto fv = features(data.val);
    if (!fv.ok()) return fv.status();
    out.validation = Evaluate(head, *fv, labels_of(data.val), classes);
  }
  for (auto& [i, m] : stages) {
    for (const auto& p : m->parameters()) p.set_requires_grad(false);
  }
  out.head = head;
  out.stages = std::move(stages);
  return out;
}

}  // namespace tlserve
