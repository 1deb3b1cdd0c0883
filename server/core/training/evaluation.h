// Scores a classifier from its outputs: what Evaluate, version comparison,
// calibration, confidence thresholds and label suggestions compute once the
// device engine has classified a dataset. Pure functions of CPU tensors (no
// catalogue, no device, no gRPC), in float64 where they sum; thread-safe.
#ifndef TLSERVE_SERVER_CORE_TRAINING_EVALUATION_H_
#define TLSERVE_SERVER_CORE_TRAINING_EVALUATION_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace tlserve {

struct ClassScore {
  double precision = 0;  // of the examples predicted as the class, the share that are (0 if none)
  double recall = 0;     // of the examples of the class, the share predicted as it (0 if none)
  double f1 = 0;         // harmonic mean of the two (0 when both are 0)
  int64_t support = 0;   // examples of the class
};

struct ScoreReport {
  int64_t examples = 0;
  double accuracy = 0;
  int top_k = 0;  // min(5, classes)
  double top_k_accuracy = 0;
  // Mean of -log(p[label]), p clipped to [1e-15, 1] (scikit-learn's log_loss).
  double log_loss = 0;
  // Expected calibration error of the top-1 confidence, 15 equal-width bins
  // over [0, 1] (Guo et al. 2017): sum over bins of |acc - conf| * n_bin / n.
  double ece = 0;
  std::vector<ClassScore> classes;  // in class-index order
  std::vector<int64_t> confusion;   // classes × classes, row-major: true × predicted
  std::vector<bool> correct;        // per example: top-1 right (for McNemar)
};

// `probabilities`: N×C float (rows sum to 1), `labels`: N class indices in
// [0, C). INVALID_ARGUMENT for N = 0, a shape mismatch or a label out of range.
absl::StatusOr<ScoreReport> ScorePredictions(const at::Tensor& probabilities,
                                             const std::vector<int64_t>& labels);

// ECE as ScorePredictions computes it, with `bins` equal-width bins.
double ExpectedCalibrationError(const at::Tensor& probabilities, const std::vector<int64_t>& labels,
                                int bins = 15);

// McNemar's test of two classifiers on the same examples: the examples only
// A got right, only B got right, and the exact two-sided binomial p-value of
// that split (1 when both are 0). INVALID_ARGUMENT for different lengths.
struct PairedTest {
  int64_t only_a = 0;
  int64_t only_b = 0;
  double p_value = 1;
};
absl::StatusOr<PairedTest> McNemar(const std::vector<bool>& correct_a,
                                   const std::vector<bool>& correct_b);

// Temperature scaling (Guo et al. 2017): the T > 0 minimising the mean
// negative log-likelihood of softmax(logits / T) on `labels`, searched in
// [0.05, 20]; 1 when no T does better than 1 (or there are no examples).
double FitTemperature(const at::Tensor& logits, const std::vector<int64_t>& labels);

// Whether a top probability `p` under its class's threshold `t` answers
// "unknown": below t; and always at t >= 1 (a class that never reaches its
// target), even for a probability that is 1 in float32.
inline bool AnswersUnknown(float p, float t) { return t >= 1 || p < t; }

// Per-class confidence thresholds for a target precision: for class c, the
// smallest t such that, of the examples whose top-1 is c with probability
// >= t, at least `target` are truly c (counting only thresholds at observed
// probabilities). A class never predicted gets 0; a class whose precision
// never reaches the target gets 1 (always "unknown"); one that reaches it
// only with probabilities of exactly 1 gets the float just below 1. A
// precision within 1e-7 of `target` counts (a target sent as float32: 0.8f
// is 0.80000001, and 4 in 5 must still do).
std::vector<float> ThresholdsForPrecision(const at::Tensor& probabilities,
                                          const std::vector<int64_t>& labels, double target);

// ThresholdsForPrecision's thresholds with what they do on the same
// examples: the share that get a label (top probability >= its class's
// threshold) and the share of those that are right (0 when none is kept).
struct ThresholdChoice {
  std::vector<float> thresholds;
  double coverage = 0;
  double precision = 0;
};
ThresholdChoice ChooseThresholds(const at::Tensor& probabilities,
                                 const std::vector<int64_t>& labels, double target);

// Which unlabelled images to label next.
enum class Uncertainty {
  kMargin,   // smallest difference between the top two probabilities first
  kEntropy,  // largest entropy of the probabilities first
};
struct Suggestion {
  int64_t index = 0;   // row of the inputs
  double margin = 0;   // top-1 minus top-2 probability
  double entropy = 0;  // natural log
};
// The `count` most uncertain rows, most uncertain first (ties: lower index
// first), skipping any row whose embedding has cosine similarity above
// `duplicate_cosine` with a row already chosen (>= 1: no de-duplication).
// `embeddings`: N×D float (any scale). `skipped` (may be null): the rows
// skipped as near-duplicates before the count was reached (every one, when
// fewer than `count` were found).
std::vector<Suggestion> RankForLabelling(const at::Tensor& probabilities,
                                         const at::Tensor& embeddings, int64_t count,
                                         Uncertainty strategy, double duplicate_cosine,
                                         int64_t* skipped = nullptr);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_TRAINING_EVALUATION_H_
