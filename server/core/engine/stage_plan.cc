#include "server/core/engine/stage_plan.h"

#include <torch/script.h>

#include "server/core/backbone.h"

namespace tlserve {

absl::StatusOr<StagePlan> StagePlan::Declare(const Backbone& backbone,
                                             const std::map<std::string, bool>& private_stages) {
  StagePlan plan(backbone, {});
  for (const auto& [name, trainable] : private_stages) {
    auto i = backbone.EmbeddableStage(name);
    if (!i.ok()) return i.status();
    plan.kinds_[*i] = trainable ? Kind::kTrainable : Kind::kPrivate;
    plan.first_private_ = std::min(plan.first_private_, *i);
  }
  return plan;
}

StagePlan::StagePlan(const Backbone& backbone, Stages own, torch::nn::Sequential head,
                     int feature_stage)
    : backbone_(&backbone),
      kinds_(backbone.head_index(), Kind::kShared),
      first_private_(backbone.head_index()),
      feature_stage_(feature_stage),
      own_(std::move(own)),
      head_(std::move(head)) {
  for (const auto& [i, module] : own_) {
    bool trainable = false;
    for (const auto& p : module->parameters()) trainable = trainable || p.requires_grad();
    kinds_[i] = trainable ? Kind::kTrainable : Kind::kPrivate;
    first_private_ = std::min(first_private_, i);
  }
}

int StagePlan::prefix_end() const {
  return feature_stage_ < 0 ? first_private_ : std::min(first_private_, feature_stage_ + 1);
}

std::vector<int> StagePlan::private_indices() const {
  std::vector<int> out;
  for (int i = 0; i < static_cast<int>(kinds_.size()); ++i) {
    if (is_private(i)) out.push_back(i);
  }
  return out;
}

const torch::jit::Module& StagePlan::module(int i) const {
  auto own = own_.find(i);
  return own != own_.end() ? *own->second : backbone_->stage(i);
}

at::Tensor StagePlan::Run(at::Tensor x, int first, int last) const {
  for (int i = first; i <= last; ++i) {
    auto own = own_.find(i);
    x = own != own_.end() ? own->second->forward({x}).toTensor() : backbone_->Forward(x, i, i);
  }
  return x;
}

at::Tensor StagePlan::Logits(const at::Tensor& prefix_output) const {
  torch::nn::Sequential h = head_;  // a holder sharing the module
  if (feature_stage_ >= 0) {
    // As the engine embeds a stage (training's features): average-pooled.
    const at::Tensor x = Run(prefix_output, prefix_end(), feature_stage_);
    return h->forward(PoolEmbedding(x, EmbedSpec{feature_stage_, Pool::kAvg, false}));
  }
  at::Tensor x = Run(prefix_output, first_private_, backbone_->head_index() - 1);
  return h->forward(x.flatten(1).to(at::kFloat));
}

at::Tensor StagePlan::LogitsOf(const at::Tensor& cpu_batch) const {
  at::Tensor x = backbone_->ToDevice(cpu_batch);
  if (prefix_end() > 0) x = backbone_->Forward(x, 0, prefix_end() - 1);
  return Logits(x);
}

int64_t StagePlan::bytes() const {
  int64_t n = 0;
  for (const auto& [i, m] : own_) {
    for (const auto& p : m->parameters()) n += p.numel() * p.element_size();
    for (const auto& b : m->buffers()) n += b.numel() * b.element_size();
  }
  if (head_) {
    for (const auto& p : head_->parameters()) n += p.numel() * p.element_size();
  }
  return n;
}

}  // namespace tlserve
