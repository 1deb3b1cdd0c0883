// Many classifier heads of one shape trained at once on the same features:
// the candidates of a sweep (L2 strengths × folds) held as one stacked tensor
// per layer, so that a step is one matrix product over the shared feature
// matrix instead of K small ones. Each candidate has its own training rows (a
// mask) and is standardised by the mean and deviation of those rows alone, so
// a fold's validation rows never leak into its scaling. The K objectives are
// independent, and each optimiser below keeps them so:
//  - linear heads: K L-BFGS runs in lockstep — a history, step length and
//    stopping test of their own each, one objective evaluation for all — on
//    scikit-learn's LogisticRegression objective, mean cross-entropy +
//    l2 |W|^2 / (2 n) with n the candidate's training rows, from zero weights
//    (or given ones);
//  - one hidden layer: Adam on minibatches shared by all candidates (each one's
//    loss averages its own rows in the batch), the same L2 term on both weight
//    matrices. Adam's update is per coordinate, so the summed loss trains each
//    candidate as if alone.
// Weights come back folded onto raw features. Pure functions of CPU tensors,
// no shared state: thread-safe. Arguments are checked by Sweep (sweep.h).
#ifndef TLSERVE_SERVER_CORE_TRAINING_STACKED_HEADS_H_
#define TLSERVE_SERVER_CORE_TRAINING_STACKED_HEADS_H_

#include <ATen/core/Tensor.h>
#include <torch/nn/modules/container/sequential.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"

namespace tlserve {

struct StackedFitOptions {
  std::vector<int> hidden;  // {}: linear; {H}: one hidden layer of H ReLU units
  // Linear heads (L-BFGS): a candidate stops after max_iterations, when its
  // largest gradient entry is <= tolerance (scikit-learn's tol), or when its
  // line search can no longer lower the loss.
  int max_iterations = 100;
  double tolerance = 1e-4;
  int history = 10;
  // Hidden layer (Adam): epochs over the rows, minibatch size, step size.
  int epochs = 30;
  int batch_size = 128;
  double learning_rate = 1e-3;
  uint64_t seed = 0;
};

struct StackedHeads {
  std::vector<int> hidden;
  std::vector<at::Tensor> weight;  // per layer: K × in × out, the first on raw features
  std::vector<at::Tensor> bias;    // per layer: K × out
  at::Tensor objective;            // K, float64: each candidate's objective at its end
  at::Tensor iterations;           // K, int64: L-BFGS iterations, or epochs

  int64_t size() const { return weight.empty() ? 0 : weight[0].size(0); }
  // K × N × C logits of raw N × D features.
  at::Tensor Logits(const at::Tensor& x) const;
  // Candidate k as MakeHead(HeadSpec{hidden}, D, C) (no dropout), raw features in.
  torch::nn::Sequential Head(int64_t k) const;
};

// x: N × D float; labels: N int64 in [0, classes); train_rows: N × K bool,
// each column the rows candidate k trains on (at least one); l2: K values
// >= 0. CANCELLED when `cancelled()` turns true (asked every iteration or
// epoch); FAILED_PRECONDITION when a hidden-layer head's loss stops being
// finite (a linear candidate whose line search fails keeps its last weights).
// `warm_start` (linear heads only; may be null): K heads on raw features to
// start from instead of zero weights.
absl::StatusOr<StackedHeads> FitStackedHeads(const at::Tensor& x, const at::Tensor& labels,
                                             int64_t classes, const at::Tensor& train_rows,
                                             const std::vector<double>& l2,
                                             const StackedFitOptions& options,
                                             const std::function<bool()>& cancelled,
                                             const StackedHeads* warm_start = nullptr);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_TRAINING_STACKED_HEADS_H_
