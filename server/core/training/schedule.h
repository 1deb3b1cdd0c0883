// The fine-tuning recipe's schedule as pure functions (README, "A
// fine-tuning recipe"; docs/experiments.md): the learning-rate factor at a
// step, each trainable stage's base learning rate, and the epoch at which
// each stage starts to train under gradual unfreezing. FineTuner applies
// them; tests/core/training/schedule_test.cc pins them down.
#pragma once

#include <cstdint>
#include <vector>

namespace tlserve {

// The factor that multiplies every group's base learning rate at `step`
// (0-based) of `total` optimizer steps: with warm-up and cosine, a linear
// warm-up over the first max(1, floor(warmup_fraction * total)) steps
// ((step + 1) / warmup, reaching 1 on the warm-up's last step), then
// 0.5 * (1 + cos(pi * (step - warmup) / max(1, total - warmup))), from 1
// down towards 0. Constant: 1. A total of 0 or less: 1.
double LearningRateFactor(bool warmup_cosine, double warmup_fraction, int64_t step, int64_t total);

// The base learning rates of `stages` trainable stages, deepest first:
// stage_learning_rate * layer_decay^d for the stage d places before the
// deepest (layer-wise learning-rate decay: early stages hold general
// features and move least).
std::vector<double> StageLearningRates(double stage_learning_rate, double layer_decay,
                                       int64_t stages);

// The 1-based epoch from which the stage d places before the deepest trains
// (of `stages` trainable stages, over `epochs` epochs): 1 + floor(d * epochs
// / (2 * stages)). Every stage joins within the first half of the run; the
// deepest trains from epoch 1.
int64_t UnfreezeEpoch(int64_t depth, int64_t stages, int64_t epochs);

}  // namespace tlserve
