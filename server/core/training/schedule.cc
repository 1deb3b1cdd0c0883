#include "server/core/training/schedule.h"

#include <algorithm>
#include <cmath>

namespace tlserve {

double LearningRateFactor(bool warmup_cosine, double warmup_fraction, int64_t step, int64_t total) {
  if (!warmup_cosine || total <= 0) return 1;
  const int64_t warmup = std::max<int64_t>(1, static_cast<int64_t>(warmup_fraction * total));
  if (step < warmup) return static_cast<double>(step + 1) / warmup;
  return 0.5 * (1 + std::cos(M_PI * static_cast<double>(step - warmup) /
                             std::max<int64_t>(1, total - warmup)));
}

std::vector<double> StageLearningRates(double stage_learning_rate, double layer_decay,
                                       int64_t stages) {
  std::vector<double> rates;
  for (int64_t d = 0; d < stages; ++d) {
    rates.push_back(stage_learning_rate * std::pow(layer_decay, static_cast<double>(d)));
  }
  return rates;
}

int64_t UnfreezeEpoch(int64_t depth, int64_t stages, int64_t epochs) {
  if (stages <= 0) return 1;
  return 1 + depth * epochs / (2 * stages);
}

}  // namespace tlserve
