#include "server/core/training/evaluation.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace tlserve {
namespace {

// The N×C scores as contiguous CPU float64, after checking that they are a
// matrix with one row per label and that every label is a column index.
absl::StatusOr<at::Tensor> CheckedScores(const at::Tensor& scores,
                                         const std::vector<int64_t>& labels, const char* what) {
  if (!scores.defined() || scores.dim() != 2) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s must be a 2-D N×C tensor, got %d dimensions", what,
                        scores.defined() ? scores.dim() : 0));
  }
  const int64_t n = scores.size(0), classes = scores.size(1);
  if (n != static_cast<int64_t>(labels.size())) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s has %d rows but there are %d labels", what, n, labels.size()));
  }
  if (classes < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("%s has no classes (0 columns)", what));
  }
  for (size_t i = 0; i < labels.size(); ++i) {
    if (labels[i] < 0 || labels[i] >= classes) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "labels[%d] = %d is not a class index in [0, %d)", i, labels[i], classes));
    }
  }
  return scores.to(at::kCPU, at::kDouble).contiguous();
}

// Lowest index among the maxima, as torch.argmax and numpy.argmax choose.
int64_t Top1(const double* row, int64_t classes) {
  int64_t best = 0;
  for (int64_t j = 1; j < classes; ++j) {
    if (row[j] > row[best]) best = j;
  }
  return best;
}

// Guo et al.'s bins: bin i holds confidences in (i/bins, (i+1)/bins]; a
// confidence of 0 (or below) joins the first bin, above 1 the last. The
// boundaries are compared directly rather than trusting ceil(conf * bins),
// which can land one bin off when conf is a boundary.
double CalibrationError(const std::vector<double>& confidence, const std::vector<bool>& correct,
                        int bins) {
  if (confidence.empty()) return 0;
  std::vector<double> conf_sum(bins, 0), right(bins, 0), count(bins, 0);
  for (size_t i = 0; i < confidence.size(); ++i) {
    const double c = confidence[i];
    int b = static_cast<int>(std::ceil(c * bins)) - 1;
    b = std::clamp(b, 0, bins - 1);
    while (b > 0 && c <= static_cast<double>(b) / bins) --b;
    while (b < bins - 1 && c > static_cast<double>(b + 1) / bins) ++b;
    conf_sum[b] += c;
    right[b] += correct[i] ? 1 : 0;
    count[b] += 1;
  }
  double ece = 0;
  for (int b = 0; b < bins; ++b) {
    if (count[b] > 0) ece += std::abs(right[b] - conf_sum[b]) / confidence.size();
  }
  return ece;
}

// The mean negative log-likelihood of softmax(beta * logits) and its first
// two derivatives in beta: E_p[x] - x_label and Var_p[x], averaged over rows.
struct Nll {
  double value = 0, slope = 0, curvature = 0;
};

// In row blocks, so that N = 100k, C = 1000 in float64 needs tens of
// megabytes rather than gigabytes.
Nll MeanNll(const at::Tensor& logits, const at::Tensor& labels, double beta) {
  constexpr int64_t kBlockRows = 4096;
  const int64_t n = logits.size(0);
  Nll total;
  for (int64_t start = 0; start < n; start += kBlockRows) {
    const int64_t end = std::min(n, start + kBlockRows);
    const at::Tensor x = logits.slice(0, start, end).to(at::kDouble);
    const at::Tensor y = labels.slice(0, start, end).unsqueeze(1);
    const at::Tensor log_p = at::log_softmax(x * beta, 1);
    const at::Tensor p = log_p.exp();
    const at::Tensor mean = (p * x).sum(1);
    // The variance only sets Newton's step length, so E[x^2] - E[x]^2 (which
    // can lose digits) is good enough; the clamp keeps it a valid step.
    const at::Tensor var = ((p * x * x).sum(1) - mean * mean).clamp_min(0);
    total.value -= log_p.gather(1, y).sum().item<double>();
    total.slope += (mean - x.gather(1, y).squeeze(1)).sum().item<double>();
    total.curvature += var.sum().item<double>();
  }
  total.value /= n, total.slope /= n, total.curvature /= n;
  return total;
}

}  // namespace

absl::StatusOr<ScoreReport> ScorePredictions(const at::Tensor& probabilities,
                                             const std::vector<int64_t>& labels) {
  auto checked = CheckedScores(probabilities, labels, "probabilities");
  if (!checked.ok()) return checked.status();
  const at::Tensor& p = *checked;
  const int64_t n = p.size(0), classes = p.size(1);
  if (n == 0) return absl::InvalidArgumentError("no examples to score (N = 0)");

  ScoreReport r;
  r.examples = n;
  r.top_k = static_cast<int>(std::min<int64_t>(5, classes));
  r.confusion.assign(classes * classes, 0);
  r.correct.resize(n);
  std::vector<double> confidence(n);
  int64_t right = 0, right_k = 0;
  double loss = 0;
  const double* data = p.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    const double* row = data + i * classes;
    const int64_t y = labels[i];
    const int64_t top = Top1(row, classes);
    // The label's rank under "higher probability first, then lower index".
    int64_t ahead = 0;
    for (int64_t j = 0; j < classes; ++j) {
      if (row[j] > row[y] || (row[j] == row[y] && j < y)) ++ahead;
    }
    r.correct[i] = top == y;
    right += top == y;
    right_k += ahead < r.top_k;
    ++r.confusion[y * classes + top];
    confidence[i] = row[top];
    // scikit-learn (before 1.2) clips to [1e-15, 1 - 1e-15] and renormalises;
    // the rows already sum to 1, and the upper clip moves a term by at most
    // 1e-15, so only the lower clip (which keeps a 0 finite) is applied.
    loss -= std::log(std::clamp(row[y], 1e-15, 1.0));
  }
  r.accuracy = static_cast<double>(right) / n;
  r.top_k_accuracy = static_cast<double>(right_k) / n;
  r.log_loss = loss / n;
  r.ece = CalibrationError(confidence, r.correct, 15);

  r.classes.resize(classes);
  for (int64_t c = 0; c < classes; ++c) {
    int64_t actual = 0, predicted = 0;
    for (int64_t k = 0; k < classes; ++k) {
      actual += r.confusion[c * classes + k];
      predicted += r.confusion[k * classes + c];
    }
    const int64_t tp = r.confusion[c * classes + c];
    ClassScore& s = r.classes[c];
    s.support = actual;
    s.precision = predicted > 0 ? static_cast<double>(tp) / predicted : 0;
    s.recall = actual > 0 ? static_cast<double>(tp) / actual : 0;
    // 2tp / (2tp + fp + fn) is the harmonic mean without the 0/0 when tp = 0.
    const int64_t denominator = predicted + actual;
    s.f1 = denominator > 0 ? 2.0 * tp / denominator : 0;
  }
  return r;
}

// NaN for inputs ScorePredictions would reject, or bins < 1 (a number would
// pass for a calibration); 0 for no examples.
double ExpectedCalibrationError(const at::Tensor& probabilities, const std::vector<int64_t>& labels,
                                int bins) {
  auto checked = CheckedScores(probabilities, labels, "probabilities");
  if (!checked.ok() || bins < 1) return std::numeric_limits<double>::quiet_NaN();
  const at::Tensor& p = *checked;
  const int64_t n = p.size(0), classes = p.size(1);
  std::vector<double> confidence(n);
  std::vector<bool> correct(n);
  const double* data = p.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t top = Top1(data + i * classes, classes);
    confidence[i] = data[i * classes + top];
    correct[i] = top == labels[i];
  }
  return CalibrationError(confidence, correct, bins);
}

absl::StatusOr<PairedTest> McNemar(const std::vector<bool>& correct_a,
                                   const std::vector<bool>& correct_b) {
  if (correct_a.size() != correct_b.size()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("the classifiers were scored on different numbers of examples: %d and %d",
                        correct_a.size(), correct_b.size()));
  }
  PairedTest t;
  for (size_t i = 0; i < correct_a.size(); ++i) {
    t.only_a += correct_a[i] && !correct_b[i];
    t.only_b += correct_b[i] && !correct_a[i];
  }
  const int64_t n = t.only_a + t.only_b, k = std::min(t.only_a, t.only_b);
  if (n == 0) return t;
  // P(X <= k), X ~ Binomial(n, 1/2), summed in log space from the largest
  // term (i = k, since k <= n/2) down, so that n in the hundreds of thousands
  // neither overflows C(n, i) nor underflows 2^-n.
  auto log_term = [n](int64_t i) {
    return std::lgamma(n + 1.0) - std::lgamma(i + 1.0) - std::lgamma(n - i + 1.0) -
           n * std::log(2.0);
  };
  const double top = log_term(k);
  double sum = 0;
  for (int64_t i = k; i >= 0; --i) {
    const double ratio = std::exp(log_term(i) - top);
    sum += ratio;
    if (ratio < 1e-18) break;  // the rest are smaller still and cannot change the sum
  }
  t.p_value = std::min(1.0, 2 * std::exp(top + std::log(sum)));
  return t;
}

// 1 (leave the logits alone) for inputs ScorePredictions would reject.
double FitTemperature(const at::Tensor& logits, const std::vector<int64_t>& labels) {
  auto checked = CheckedScores(logits, labels, "logits");
  if (!checked.ok() || labels.empty()) return 1;
  // Keep the caller's dtype: MeanNll converts one block at a time.
  const at::Tensor x = logits.to(at::kCPU).contiguous();
  const at::Tensor y = at::tensor(labels, at::kLong);

  // The NLL is convex in beta = 1/T (a log-sum-exp minus a linear term), so
  // its slope rises through zero once: safeguarded Newton on the slope, which
  // needs a handful of passes over the logits where golden-section search
  // needed ~40. The range [0.05, 20] of T is the same range of beta.
  constexpr double kLowest = 0.05, kHighest = 20;
  const Nll at_one = MeanNll(x, y, 1);
  double beta = 1, lo = kLowest, hi = kHighest, step_before = hi - lo, step = step_before;
  bool tried_lowest = false, tried_highest = false;
  Nll at_beta = at_one;
  for (int i = 0; i < 100 && at_beta.slope != 0 && std::isfinite(at_beta.value); ++i) {
    // A minimum at an end of the range: the slope there points outwards.
    if ((beta == kHighest && at_beta.slope < 0) || (beta == kLowest && at_beta.slope > 0)) break;
    (at_beta.slope < 0 ? lo : hi) = beta;
    double next = beta - at_beta.slope / at_beta.curvature;
    // Newton's step is within 1e-9 in log T: converged (quadratically, so
    // the last point evaluated is closer still). Tested before the bracket,
    // which a rounding-sized step may not clear.
    if (std::abs(std::log(next / beta)) < 1e-9) break;
    const bool newton_ok =
        next > lo && next < hi && std::abs(next - beta) < 0.5 * std::abs(step_before);
    if (!newton_ok) {
      // Try the end itself once (a separable sample wants T -> 0), then bisect
      // (geometrically: the range spans 400x).
      if (at_beta.slope < 0 && hi == kHighest && !tried_highest) {
        next = kHighest, tried_highest = true;
      } else if (at_beta.slope > 0 && lo == kLowest && !tried_lowest) {
        next = kLowest, tried_lowest = true;
      } else {
        next = std::sqrt(lo * hi);
      }
    }
    step_before = step, step = next - beta;
    if (hi / lo < 1 + 1e-9) break;  // bisected down to nothing
    beta = next;
    at_beta = MeanNll(x, y, beta);
  }
  return at_beta.value < at_one.value ? 1 / beta : 1;
}

// Empty (not one threshold per class) for inputs ScorePredictions would reject.
std::vector<float> ThresholdsForPrecision(const at::Tensor& probabilities,
                                          const std::vector<int64_t>& labels, double target) {
  auto checked = CheckedScores(probabilities, labels, "probabilities");
  if (!checked.ok()) return {};
  const at::Tensor& p = *checked;
  const int64_t n = p.size(0), classes = p.size(1);
  // Per predicted class: (confidence, right), most confident first.
  std::vector<std::vector<std::pair<double, bool>>> by_class(classes);
  const double* data = p.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t top = Top1(data + i * classes, classes);
    const double confidence = data[i * classes + top];
    // No threshold admits a NaN, and sorting one would break the ordering.
    if (!std::isnan(confidence)) by_class[top].emplace_back(confidence, top == labels[i]);
  }
  std::vector<float> thresholds(classes, 0);
  for (int64_t c = 0; c < classes; ++c) {
    auto& seen = by_class[c];
    if (seen.empty()) continue;
    std::sort(seen.begin(), seen.end(),
              [](const auto& l, const auto& r) { return l.first > r.first; });
    // Precision need not fall monotonically as t falls, so keep the lowest
    // qualifying t; a t admits every example tied with it, hence the groups.
    double best = 1;
    bool qualified = false;
    int64_t kept = 0, right = 0;
    for (size_t i = 0; i < seen.size();) {
      const double t = seen[i].first;
      for (; i < seen.size() && seen[i].first == t; ++i) {
        ++kept;
        right += seen[i].second;
      }
      if (static_cast<double>(right) / kept >= target - 1e-7) best = t, qualified = true;
    }
    // A threshold of 1 means "never" (AnswersUnknown): probabilities of 1
    // that qualify keep their label under the float just below it.
    thresholds[c] = static_cast<float>(best);
    if (best >= 1 && qualified) thresholds[c] = std::nextafter(1.0f, 0.0f);
  }
  return thresholds;
}

ThresholdChoice ChooseThresholds(const at::Tensor& probabilities,
                                 const std::vector<int64_t>& labels, double target) {
  ThresholdChoice out;
  out.thresholds = ThresholdsForPrecision(probabilities, labels, target);
  auto checked = CheckedScores(probabilities, labels, "probabilities");
  if (!checked.ok() || out.thresholds.empty()) return out;
  const at::Tensor& p = *checked;
  const int64_t n = p.size(0), classes = p.size(1);
  const double* data = p.data_ptr<double>();
  int64_t kept = 0, right = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t top = Top1(data + i * classes, classes);
    // As the engine compares: the float probability against the threshold.
    if (!AnswersUnknown(static_cast<float>(data[i * classes + top]), out.thresholds[top])) {
      ++kept;
      right += top == labels[i];
    }
  }
  if (n > 0) out.coverage = static_cast<double>(kept) / n;
  if (kept > 0) out.precision = static_cast<double>(right) / kept;
  return out;
}

// Empty when the shapes disagree (not N×C and N×D), as for nothing to rank.
std::vector<Suggestion> RankForLabelling(const at::Tensor& probabilities,
                                         const at::Tensor& embeddings, int64_t count,
                                         Uncertainty strategy, double duplicate_cosine,
                                         int64_t* skipped) {
  if (skipped != nullptr) *skipped = 0;
  if (count <= 0 || !probabilities.defined() || probabilities.dim() != 2 ||
      probabilities.size(1) < 1 || !embeddings.defined() || embeddings.dim() != 2 ||
      embeddings.size(0) != probabilities.size(0)) {
    return {};
  }
  const at::Tensor p = probabilities.to(at::kCPU, at::kDouble).contiguous();
  const int64_t n = p.size(0), classes = p.size(1);
  if (n == 0) return {};

  std::vector<Suggestion> all(n);
  const double* data = p.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    const double* row = data + i * classes;
    double first = row[0], second = 0, entropy = 0;
    for (int64_t j = 0; j < classes; ++j) {
      if (j > 0 && row[j] > first) {
        second = first, first = row[j];
      } else if (j > 0 && row[j] > second) {
        second = row[j];
      }
      if (row[j] > 0) entropy -= row[j] * std::log(row[j]);  // 0 log 0 = 0
    }
    all[i] = Suggestion{i, first - second, entropy};
  }
  // A NaN row ranks last (as the most certain) so that the order stays strict.
  auto key = [strategy](const Suggestion& s) {
    const double k = strategy == Uncertainty::kMargin ? s.margin : -s.entropy;
    return std::isnan(k) ? std::numeric_limits<double>::infinity() : k;
  };
  std::stable_sort(all.begin(), all.end(),
                   [&key](const Suggestion& l, const Suggestion& r) { return key(l) < key(r); });

  std::vector<Suggestion> chosen;
  // >= 1: every row kept (rounding can put a cosine a hair above 1).
  const bool dedupe = duplicate_cosine < 1;
  at::Tensor unit;
  if (dedupe) {
    // A zero row stays zero after the clamp, so its cosine with anything is 0.
    const at::Tensor e = embeddings.to(at::kCPU, at::kDouble);
    unit = (e / e.norm(2, 1, true).clamp_min(1e-300)).contiguous();
  }
  const int64_t dims = dedupe ? unit.size(1) : 0;
  const double* u = dedupe ? unit.data_ptr<double>() : nullptr;
  for (const Suggestion& s : all) {
    if (static_cast<int64_t>(chosen.size()) >= count) break;
    bool duplicate = false;
    for (size_t k = 0; dedupe && k < chosen.size() && !duplicate; ++k) {
      const double* a = u + s.index * dims;
      const double* b = u + chosen[k].index * dims;
      duplicate = std::inner_product(a, a + dims, b, 0.0) > duplicate_cosine;
    }
    if (!duplicate) {
      chosen.push_back(s);
    } else if (skipped != nullptr) {
      ++*skipped;
    }
  }
  return chosen;
}

}  // namespace tlserve
