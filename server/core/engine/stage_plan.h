// The stage plan of a model version (or of a training run): for each of the
// backbone's stages, whether the model runs the backbone's shared, frozen
// copy or its own private one (trainable or not), and the model's head. It
// is the one place that decides which module runs for a stage: serving (the
// device engine), training, export and DescribeModel all ask it.
//
// The shared prefix of a plan is stages [0, first_private()): it is what the
// engine runs once for a mixed batch of many models' images.
//
// Immutable after construction; thread-safe to read. The modules it points
// at are shared with whoever made it and must not be modified while others
// run them (training works on its own copies, see ModelRegistry::Start).
#ifndef TLSERVE_SERVER_CORE_ENGINE_STAGE_PLAN_H_
#define TLSERVE_SERVER_CORE_ENGINE_STAGE_PLAN_H_

#include <ATen/core/Tensor.h>
#include <torch/nn/modules/container/sequential.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace torch::jit {
struct Module;
}  // namespace torch::jit

namespace tlserve {

class Backbone;

class StagePlan {
 public:
  using Stages = std::map<int, std::shared_ptr<torch::jit::Module>>;
  enum class Kind { kShared, kPrivate, kTrainable };

  // A model's declared layout (stage name -> trainable), without modules:
  // INVALID_ARGUMENT for the head or an unknown stage.
  static absl::StatusOr<StagePlan> Declare(const Backbone& backbone,
                                           const std::map<std::string, bool>& private_stages);
  // A plan with modules: `own` are the private stages by index (trainable
  // when any parameter requires grad); `head` may be null (a layout only).
  // `feature_stage` >= 0: the head reads that stage's output average-pooled
  // over space (PoolEmbedding), and the stages after it do not run (a sweep
  // may choose an earlier layer's features); -1: the backbone's own path to
  // its head (through its pooling, flattened).
  StagePlan(const Backbone& backbone, Stages own, torch::nn::Sequential head = nullptr,
            int feature_stage = -1);

  const Backbone& backbone() const { return *backbone_; }
  Kind kind(int i) const { return kinds_[i]; }
  bool is_private(int i) const { return kinds_[i] != Kind::kShared; }
  // The first private stage; the backbone's head index when every stage is
  // shared (a head-only model). The shared prefix is [0, first_private()).
  int first_private() const { return first_private_; }
  int feature_stage() const { return feature_stage_; }
  // Where the engine's shared prefix for this plan ends: first_private(), or
  // just after the feature stage when that comes first.
  int prefix_end() const;
  // The private stages' indices, in order.
  std::vector<int> private_indices() const;
  const Stages& own() const { return own_; }
  const torch::nn::Sequential& head() const { return head_; }
  // The module that runs stage i: the plan's own copy, or the shared one.
  // For a declared plan (no modules), the shared one.
  const torch::jit::Module& module(int i) const;

  // Runs stages first..last (last before the backbone's head) on a tensor on
  // the modules' device. The caller chooses the autograd mode.
  at::Tensor Run(at::Tensor x, int first, int last) const;
  // Logits (float32) from the shared prefix's output (up to prefix_end()):
  // the private stages and the shared ones after them, flatten (or pool at
  // the feature stage), then the head.
  at::Tensor Logits(const at::Tensor& prefix_output) const;
  // Logits of a preprocessed CPU float batch N×3×H×W, everything on the
  // modules' device: the reference path (export's check, tests), not the
  // engine's batched one.
  at::Tensor LogitsOf(const at::Tensor& cpu_batch) const;

  // Bytes of the private stages' parameters and buffers plus the head's.
  int64_t bytes() const;

 private:
  const Backbone* backbone_;
  std::vector<Kind> kinds_;
  int first_private_ = 0;
  int feature_stage_ = -1;
  Stages own_;
  torch::nn::Sequential head_{nullptr};
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_ENGINE_STAGE_PLAN_H_
