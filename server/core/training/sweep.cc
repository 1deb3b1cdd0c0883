#include "server/core/training/sweep.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/core/head.h"
#include "server/core/training/stacked_heads.h"

namespace tlserve {
namespace {

// What one batch of stacked candidates may hold (weights, optimiser state,
// logits); a larger grid trains in several batches.
constexpr int64_t kBatchBytes = int64_t{1} << 30;

absl::Status Invalid(const std::string& what) { return absl::InvalidArgumentError(what); }

absl::Status Validate(const SweepData& data, const SweepOptions& o) {
  if (data.classes < 2) return Invalid("classes must be >= 2");
  if (!data.labels.defined() || data.labels.dim() != 1 || data.labels.size(0) == 0 ||
      !at::isIntegralType(data.labels.scalar_type(), /*includeBool=*/false)) {
    return Invalid("labels must be a non-empty 1-D integer tensor");
  }
  const int64_t n = data.labels.size(0);
  if (data.labels.min().item<int64_t>() < 0 || data.labels.max().item<int64_t>() >= data.classes) {
    return Invalid(absl::StrCat("labels must be in [0, ", data.classes, ")"));
  }
  if (data.features.empty()) return Invalid("features: at least one layer is needed");
  for (size_t l = 0; l < data.features.size(); ++l) {
    const at::Tensor& f = data.features[l];
    if (!f.defined() || f.dim() != 2 || f.size(0) != n || f.size(1) == 0 ||
        !at::isFloatingType(f.scalar_type()) || !f.device().is_cpu()) {
      return Invalid(absl::StrCat("features[", l, "] must be a float N × D CPU tensor with N = ", n,
                                  " (the labels') and D >= 1"));
    }
  }
  if (o.l2_grid.empty()) return Invalid("options.l2_grid must not be empty");
  for (double l2 : o.l2_grid) {
    if (!(l2 >= 0 && l2 <= 1e8)) return Invalid("options.l2_grid values must be in [0, 1e8]");
  }
  if (o.hidden.empty()) return Invalid("options.hidden must name at least one head shape");
  for (size_t i = 0; i < o.hidden.size(); ++i) {
    if (o.hidden[i].size() > 1) {
      return Invalid(absl::StrCat("options.hidden[", i, "]: at most one hidden layer"));
    }
    if (!o.hidden[i].empty() && (o.hidden[i][0] < 1 || o.hidden[i][0] > 16384)) {
      return Invalid(absl::StrCat("options.hidden[", i, "][0] must be in [1, 16384]"));
    }
  }
  if (o.folds < 0 || o.folds > 20) return Invalid("options.folds must be in [0, 20]");
  if (o.folds >= 2 && o.folds > n) {
    return Invalid(absl::StrCat("options.folds must be <= the number of rows (", n, ")"));
  }
  if (o.folds < 2) {
    const at::Tensor& v = data.validation;
    if (!v.defined() || v.dim() != 1 || v.size(0) != n || v.scalar_type() != at::kBool) {
      return Invalid("validation must be an N-long bool tensor when options.folds is 0 or 1");
    }
    const int64_t held = v.sum().item<int64_t>();
    if (held == 0 || held == n) {
      return Invalid("validation must hold at least one row and leave at least one to train");
    }
  }
  if (o.max_iterations < 1 || o.max_iterations > 10000) {
    return Invalid("options.max_iterations must be in [1, 10000]");
  }
  if (!(o.tolerance > 0 && o.tolerance <= 1)) return Invalid("options.tolerance must be in (0, 1]");
  if (o.epochs < 1 || o.epochs > 1000) return Invalid("options.epochs must be in [1, 1000]");
  if (o.batch_size < 1 || o.batch_size > 65536) {
    return Invalid("options.batch_size must be in [1, 65536]");
  }
  if (!(o.learning_rate > 0 && o.learning_rate <= 1)) {
    return Invalid("options.learning_rate must be in (0, 1]");
  }
  return absl::OkStatus();
}

StackedFitOptions FitOptions(const SweepOptions& o, const std::vector<int>& hidden) {
  StackedFitOptions f;
  f.hidden = hidden;
  f.max_iterations = o.max_iterations;
  f.tolerance = o.tolerance;
  f.epochs = o.epochs;
  f.batch_size = o.batch_size;
  f.learning_rate = o.learning_rate;
  f.seed = o.seed;
  return f;
}

// Bytes one candidate of this shape needs while training and scoring.
int64_t CandidateBytes(int64_t n, int64_t d, int64_t classes, const std::vector<int>& hidden,
                       const SweepOptions& o) {
  if (hidden.empty()) return 4 * ((d + 1) * classes * (2 * 10 + 12) + n * classes * 6);
  const int64_t h = hidden[0];
  return 4 * ((d * h + h * classes) * 6 + n * h * 2 + int64_t{o.batch_size} * h * 6);
}

// Ranking: accuracy, then the smaller head, then the stronger L2.
bool Better(const SweepEntry& a, const SweepEntry& b) {
  if (a.accuracy != b.accuracy) return a.accuracy > b.accuracy;
  if (a.params != b.params) return a.params < b.params;
  if (a.l2 != b.l2) return a.l2 > b.l2;
  return a.layer < b.layer;
}

}  // namespace

std::vector<double> DefaultL2Grid() {
  std::vector<double> grid;
  for (int i = 0; i < 10; ++i) grid.push_back(1 / std::pow(10.0, -4 + 8.0 * i / 9));
  return grid;
}

std::vector<int> StratifiedFolds(const at::Tensor& labels, int folds, bool shuffle, uint64_t seed) {
  const at::Tensor y = labels.to(at::kLong).contiguous();
  const int64_t n = y.size(0);
  const int64_t* raw = y.data_ptr<int64_t>();
  // Classes numbered by first appearance, as StratifiedKFold numbers them.
  std::vector<int64_t> code(n), first;
  for (int64_t i = 0; i < n; ++i) {
    auto it = std::find(first.begin(), first.end(), raw[i]);
    code[i] = it - first.begin();
    if (it == first.end()) first.push_back(raw[i]);
  }
  const int64_t classes = static_cast<int64_t>(first.size());
  std::vector<int64_t> sorted = code;
  std::sort(sorted.begin(), sorted.end());
  // allocation[f][c]: rows of class c in fold f, dealt round-robin over the sorted labels.
  std::vector<std::vector<int64_t>> allocation(folds, std::vector<int64_t>(classes, 0));
  for (int64_t i = 0; i < n; ++i) ++allocation[i % folds][sorted[i]];
  std::mt19937_64 rng(seed);
  std::vector<int> fold(n);
  for (int64_t c = 0; c < classes; ++c) {
    std::vector<int> of_class;
    for (int f = 0; f < folds; ++f) of_class.insert(of_class.end(), allocation[f][c], f);
    if (shuffle) std::shuffle(of_class.begin(), of_class.end(), rng);
    size_t next = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (code[i] == c) fold[i] = of_class[next++];
    }
  }
  return fold;
}

absl::StatusOr<SweepResult> Sweep(const SweepData& data, const SweepOptions& o,
                                  const std::function<void(const SweepEntry&)>& on_entry,
                                  const std::function<bool()>& cancelled) {
  if (absl::Status s = Validate(data, o); !s.ok()) return s;
  torch::NoGradGuard no_grad;
  const absl::Time start = absl::Now();
  const at::Tensor y = data.labels.to(at::kLong).contiguous();
  const int64_t n = y.size(0), classes = data.classes;
  // fold[i]: the split that validates on row i; -1: a row every split trains on.
  at::Tensor fold;
  int splits = o.folds;
  if (o.folds >= 2) {
    const std::vector<int> f = StratifiedFolds(y, o.folds, o.shuffle, o.seed);
    fold = at::tensor(std::vector<int64_t>(f.begin(), f.end()), at::kLong);
  } else {
    splits = 1;
    fold = data.validation.to(at::kLong) - 1;  // validation rows: split 0
  }
  std::vector<SweepEntry> entries;
  // Per linear entry, its folds' mean head (raw features): the refit starts
  // there, as LogisticRegressionCV's does.
  std::vector<StackedHeads> fold_means;
  for (size_t layer = 0; layer < data.features.size(); ++layer) {
    const at::Tensor x = data.features[layer].to(at::kFloat).contiguous();
    const int64_t d = x.size(1);
    for (const std::vector<int>& hidden : o.hidden) {
      HeadSpec spec;
      spec.hidden = hidden;
      const int64_t grid = static_cast<int64_t>(o.l2_grid.size());
      const int64_t per_value = CandidateBytes(n, d, classes, hidden, o) * splits;
      const int64_t chunk = std::clamp<int64_t>(kBatchBytes / per_value, 1, grid);
      for (int64_t g0 = 0; g0 < grid; g0 += chunk) {
        if (cancelled && cancelled()) return absl::CancelledError("the sweep was cancelled");
        const int64_t g1 = std::min(grid, g0 + chunk), k = (g1 - g0) * splits;
        // Candidate (g, f) is column (g - g0) * splits + f.
        const at::Tensor split_of = at::arange(splits, at::kLong).repeat({g1 - g0});
        const at::Tensor validates = fold.unsqueeze(0).eq(split_of.unsqueeze(1));  // K × N
        std::vector<double> l2;
        for (int64_t g = g0; g < g1; ++g) l2.insert(l2.end(), splits, o.l2_grid[g]);
        const absl::Time batch_start = absl::Now();
        absl::StatusOr<StackedHeads> heads = FitStackedHeads(
            x, y, classes, validates.logical_not().t(), l2, FitOptions(o, hidden), cancelled);
        if (!heads.ok()) return heads.status();
        const at::Tensor logp = at::log_softmax(heads->Logits(x), 2);  // K × N × C
        const at::Tensor val = validates.to(at::kDouble);
        const at::Tensor count = val.sum(1);
        const at::Tensor correct = logp.argmax(2).eq(y.unsqueeze(0)).to(at::kDouble);
        const at::Tensor acc = ((correct * val).sum(1) / count).view({g1 - g0, splits});
        const at::Tensor nll = -logp.gather(2, y.view({1, n, 1}).expand({k, n, 1})).squeeze(2);
        const at::Tensor loss = (nll.to(at::kDouble) * val).sum(1) / count;
        const at::Tensor mean_loss = loss.view({g1 - g0, splits}).mean(1);
        const at::Tensor objective = heads->objective.view({g1 - g0, splits}).mean(1);
        const double seconds = absl::ToDoubleSeconds(absl::Now() - batch_start) / (g1 - g0);
        for (int64_t g = g0; g < g1; ++g) {
          SweepEntry e;
          e.layer = static_cast<int>(layer);
          e.l2 = o.l2_grid[g];
          e.hidden = hidden;
          e.params = HeadParams(spec, d, classes);
          e.accuracy = acc[g - g0].mean().item<double>();
          e.accuracy_std = acc[g - g0].std(/*unbiased=*/false).item<double>();
          e.log_loss = mean_loss[g - g0].item<double>();
          e.train_objective = objective[g - g0].item<double>();
          e.seconds = seconds;
          entries.push_back(e);
          StackedHeads mean;
          if (hidden.empty()) {
            const at::Tensor part = at::arange((g - g0) * splits, (g - g0 + 1) * splits, at::kLong);
            mean.weight = {heads->weight[0].index_select(0, part).mean(0, /*keepdim=*/true)};
            mean.bias = {heads->bias[0].index_select(0, part).mean(0, /*keepdim=*/true)};
          }
          fold_means.push_back(std::move(mean));
          if (on_entry) on_entry(e);
        }
      }
    }
  }
  std::vector<size_t> rank(entries.size());
  std::iota(rank.begin(), rank.end(), 0);
  std::stable_sort(rank.begin(), rank.end(),
                   [&](size_t a, size_t b) { return Better(entries[a], entries[b]); });
  SweepResult result;
  for (size_t i : rank) result.leaderboard.push_back(entries[i]);
  if (cancelled && cancelled()) return absl::CancelledError("the sweep was cancelled");
  // The refit: the winner alone, on every training row.
  const SweepEntry& best = result.leaderboard.front();
  const StackedHeads& start_at = fold_means[rank.front()];
  const absl::Time refit_start = absl::Now();
  const at::Tensor x = data.features[best.layer].to(at::kFloat).contiguous();
  const at::Tensor train = fold.lt(0) | at::full({n}, o.folds >= 2, at::kBool);
  absl::StatusOr<StackedHeads> heads =
      FitStackedHeads(x, y, classes, train.unsqueeze(1), {best.l2}, FitOptions(o, best.hidden),
                      cancelled, best.hidden.empty() ? &start_at : nullptr);
  if (!heads.ok()) return heads.status();
  result.head = heads->Head(0);
  const at::Tensor rows = train.nonzero().view(-1);
  result.train_accuracy = result.head->forward(x.index_select(0, rows))
                              .argmax(1)
                              .eq(y.index_select(0, rows))
                              .to(at::kDouble)
                              .mean()
                              .item<double>();
  result.refit_seconds = absl::ToDoubleSeconds(absl::Now() - refit_start);
  result.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  return result;
}

}  // namespace tlserve
