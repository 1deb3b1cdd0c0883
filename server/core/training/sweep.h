// A head sweep: many candidate heads trained on the same cached features —
// an L2 grid × candidate feature layers × head shapes (linear, one hidden
// layer) — scored by k-fold cross-validation (or on given validation rows),
// ranked into a leaderboard, and the winner refitted on all training rows.
//
// Features are extracted once per layer by the caller and shared by every
// candidate of that layer; candidates of one layer and shape (every L2 value ×
// every fold) train together as one stacked tensor (stacked_heads.h). Each
// candidate is standardised by its own training rows — per fold, so the
// validation rows of a fold never shape its scaling — and the refitted head
// has its standardisation folded in: it takes the layer's raw features.
//
// The objective of a linear candidate is scikit-learn's LogisticRegression's
// with C = 1 / l2; with folds >= 2 the rows are split as StratifiedKFold does,
// so that `shuffle = false` reproduces LogisticRegressionCV(cv=folds)'s folds.
// The winner has the best mean validation accuracy; ties go to the smaller
// head, then the stronger L2 (LogisticRegressionCV also takes the first C,
// the smallest, among equal scores).
//
// Thread-safety: Sweep keeps no state; calls on different data may run at
// once (each uses LibTorch's intra-op threads). Errors: INVALID_ARGUMENT
// naming the option or input at fault; CANCELLED when `cancelled()` turns true
// (asked every optimiser iteration or epoch); FAILED_PRECONDITION when a
// hidden-layer head diverges.
#ifndef TLSERVE_SERVER_CORE_TRAINING_SWEEP_H_
#define TLSERVE_SERVER_CORE_TRAINING_SWEEP_H_

#include <ATen/core/Tensor.h>
#include <torch/nn/modules/container/sequential.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"

namespace tlserve {

// 1 / C for C in numpy.logspace(-4, 4, 10): LogisticRegressionCV(Cs=10)'s grid.
std::vector<double> DefaultL2Grid();

struct SweepOptions {
  std::vector<double> l2_grid = DefaultL2Grid();  // weight_decay values (= 1 / C), each in [0, 1e8]
  // Head shapes: {} linear, {H} one hidden layer of H units (H in [1, 16384]).
  std::vector<std::vector<int>> hidden = {{}};
  int folds = 5;  // in [2, 20]: k-fold on all rows; 0 or 1: SweepData::validation
  // Folds drawn at random within each class (by `seed`); false: in row order,
  // exactly scikit-learn's StratifiedKFold(shuffle=False).
  bool shuffle = true;
  int max_iterations = 100;  // L-BFGS iterations per linear fit, in [1, 10000]
  double tolerance = 1e-4;   // linear fits stop at max |gradient| <= this, in (0, 1]
  // Hidden-layer heads (Adam minibatches): epochs in [1, 1000], batch_size in
  // [1, 65536], learning_rate in (0, 1].
  int epochs = 30;
  int batch_size = 128;
  double learning_rate = 1e-3;
  uint64_t seed = 0;
};

struct SweepData {
  std::vector<at::Tensor> features;  // one N × D_l float CPU tensor per candidate layer, same rows
  at::Tensor labels;                 // N int64 in [0, classes)
  int64_t classes = 0;               // >= 2
  // With folds 0 or 1: N bool, true on the rows to validate on; the others
  // train (and the winner is refitted on them alone). Unused otherwise.
  at::Tensor validation;
};

struct SweepEntry {
  int layer = 0;  // index into SweepData::features
  double l2 = 0;
  std::vector<int> hidden;
  int64_t params = 0;          // of the head
  double accuracy = 0;         // mean over folds of the validation accuracy
  double accuracy_std = 0;     // population standard deviation over folds (0 with one split)
  double log_loss = 0;         // mean over folds of the validation cross-entropy
  double train_objective = 0;  // mean over folds of the regularised objective reached
  double seconds = 0;          // its share of the wall time of the batch it trained in
};

struct SweepResult {
  std::vector<SweepEntry> leaderboard;  // best first: leaderboard[0] is the winner
  // The winner refitted on all training rows: MakeHead(HeadSpec{hidden}, D,
  // classes) taking raw features of SweepData::features[leaderboard[0].layer].
  torch::nn::Sequential head;
  double train_accuracy = 0;  // of `head` on its training rows
  double refit_seconds = 0;
  double seconds = 0;  // the whole sweep
};

// `on_entry` (may be empty) is called with each entry as its candidates
// finish, on the calling thread, in training order (not ranked).
absl::StatusOr<SweepResult> Sweep(const SweepData& data, const SweepOptions& options,
                                  const std::function<void(const SweepEntry&)>& on_entry,
                                  const std::function<bool()>& cancelled);

// Fold of each row (0 .. folds-1), as StratifiedKFold(folds, shuffle) splits
// `labels`: classes are dealt round-robin over the folds in sorted order,
// each class's rows taking its fold numbers in row order (or shuffled by `seed`).
std::vector<int> StratifiedFolds(const at::Tensor& labels, int folds, bool shuffle, uint64_t seed);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_TRAINING_SWEEP_H_
