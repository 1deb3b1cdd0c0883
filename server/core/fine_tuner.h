// Fine-tuning: trains a model's private (unfrozen) stages together with its
// head, at a smaller learning rate for the stages (and the rest of the recipe
// in TrainOptions: warm-up and cosine decay, layer-wise decay, gradual
// unfreezing), on the backbone's device
// (every tensor, the head included; mixed precision on CUDA: float32 master
// weights, autocast to the backbone's dtype). The shared prefix before the
// first private stage runs without gradient in the device engine, at
// training priority (its outputs are computed once and kept when
// augmentation is off: on the device up to prefix_cache_device_bytes, then
// in host memory up to prefix_cache_bytes, the rest recomputed each epoch);
// shared stages after it stay frozen and in eval mode; trainable private stages train, their
// BatchNorm statistics only with freeze_batchnorm off and never on a batch of
// one (a trailing batch of one is merged into the one before it).
//
// Never worse than where it started: the starting point is evaluated as
// epoch 0 and the best epoch by validation accuracy is kept, so when no epoch
// beats the start, the starting weights come back. A non-finite loss fails
// the run (FAILED_PRECONDITION, "diverged"). Not thread-safe; runs on the job
// thread.
#ifndef TLSERVE_SERVER_CORE_FINE_TUNER_H_
#define TLSERVE_SERVER_CORE_FINE_TUNER_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/core/backbone.h"
#include "server/core/engine/engine.h"
#include "server/core/head_trainer.h"
#include "server/store/database.h"

namespace tlserve {

struct FineTuneData {
  // The encoded images of examples by index, read a batch at a time (the
  // dataset is never held in memory whole).
  std::function<absl::StatusOr<std::vector<std::string>>(const std::vector<int64_t>&)> read;
  std::vector<int64_t> train, val;  // example indices
  std::vector<int64_t> labels;      // class index per example
  int64_t max_image_pixels = 40'000'000;
  // The frozen prefix's outputs are kept between epochs (without
  // augmentation): on a CUDA device up to prefix_cache_device_bytes, then in
  // host memory up to prefix_cache_bytes; the rest are recomputed.
  int64_t prefix_cache_bytes = int64_t{1} << 30;
  int64_t prefix_cache_device_bytes = 0;
  uint64_t lane = 0;                  // the job's lane in the engine
  std::function<void()> before_step;  // tests: called before each training step
};

struct FineTuned {
  torch::nn::Sequential head;
  std::map<int, std::shared_ptr<torch::jit::Module>> stages;
  std::vector<EpochStats> history;
  Evaluation train, validation;
};

// `stages` (private copies; trainable ones have requires_grad) and `head`
// are trained in place and returned. CANCELLED when `cancelled()` turns true.
// With `resume`, saves its state after each epoch and, when resume->state is
// set, continues from it (the starting point's epoch 0 is not run again).
absl::StatusOr<FineTuned> FineTune(Engine& engine,
                                   std::map<int, std::shared_ptr<torch::jit::Module>> stages,
                                   torch::nn::Sequential head, int64_t classes,
                                   const FineTuneData& data, const TrainOptions& options,
                                   const std::function<void(const EpochStats&)>& on_epoch,
                                   const std::function<bool()>& cancelled,
                                   Resume* resume = nullptr);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_FINE_TUNER_H_
