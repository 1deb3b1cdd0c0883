#include "server/core/training/schedule.h"

#include <gtest/gtest.h>

#include <cmath>

namespace tlserve {
namespace {

TEST(LearningRateFactor, WarmsUpLinearlyThenFollowsACosineDownToZero) {
  // 100 steps, 10% warm-up: steps 0..9 rise by 0.1 to 1.
  for (int64_t step = 0; step < 10; ++step) {
    EXPECT_NEAR(LearningRateFactor(true, 0.1, step, 100), (step + 1) / 10.0, 1e-12) << step;
  }
  // The cosine: 1 where it starts, 0.5 halfway through the remaining 90
  // steps, cos(pi * 89/90) on the last step.
  EXPECT_NEAR(LearningRateFactor(true, 0.1, 10, 100), 1.0, 1e-12);
  EXPECT_NEAR(LearningRateFactor(true, 0.1, 55, 100), 0.5, 1e-12);
  EXPECT_NEAR(LearningRateFactor(true, 0.1, 99, 100), 0.5 * (1 - std::cos(M_PI / 90)), 1e-12);
  EXPECT_LT(LearningRateFactor(true, 0.1, 99, 100), 1e-3);
  double before = 2;
  for (int64_t step = 10; step < 100; ++step) {
    const double f = LearningRateFactor(true, 0.1, step, 100);
    EXPECT_LT(f, before) << step;
    EXPECT_GT(f, 0) << step;
    before = f;
  }
}

TEST(LearningRateFactor, AShortRunWarmsUpForOneStep) {
  // floor(0.1 * 5) = 0 steps of warm-up would divide by zero: one step.
  EXPECT_NEAR(LearningRateFactor(true, 0.1, 0, 5), 1.0, 1e-12);
  EXPECT_NEAR(LearningRateFactor(true, 0.1, 1, 5), 1.0, 1e-12);
  EXPECT_NEAR(LearningRateFactor(true, 0.1, 3, 5), 0.5, 1e-12);
  EXPECT_NEAR(LearningRateFactor(true, 0.0, 0, 40), 1.0, 1e-12);
  // A single step: the warm-up's end, at the full rate.
  EXPECT_NEAR(LearningRateFactor(true, 0.5, 0, 1), 1.0, 1e-12);
}

TEST(LearningRateFactor, ConstantIsOneThroughout) {
  for (int64_t step : {0, 1, 50, 99}) {
    EXPECT_EQ(LearningRateFactor(false, 0.1, step, 100), 1.0);
  }
  EXPECT_EQ(LearningRateFactor(true, 0.1, 0, 0), 1.0);  // nothing to schedule
}

TEST(StageLearningRates, DecayByDepthFromTheDeepestStage) {
  const std::vector<double> rates = StageLearningRates(1e-3, 0.5, 3);
  ASSERT_EQ(rates.size(), 3u);
  EXPECT_DOUBLE_EQ(rates[0], 1e-3);
  EXPECT_DOUBLE_EQ(rates[1], 5e-4);
  EXPECT_DOUBLE_EQ(rates[2], 2.5e-4);
  for (double r : StageLearningRates(2e-4, 1.0, 4)) EXPECT_DOUBLE_EQ(r, 2e-4);
  EXPECT_TRUE(StageLearningRates(1e-3, 0.5, 0).empty());
}

TEST(UnfreezeEpoch, TheDeepestStartsFirstAndAllJoinWithinTheFirstHalf) {
  // Two stages over 10 epochs: layer4 from epoch 1, layer3 from epoch 3.
  EXPECT_EQ(UnfreezeEpoch(0, 2, 10), 1);
  EXPECT_EQ(UnfreezeEpoch(1, 2, 10), 3);
  // Three stages over 6 epochs: 1, 2, 3.
  EXPECT_EQ(UnfreezeEpoch(0, 3, 6), 1);
  EXPECT_EQ(UnfreezeEpoch(1, 3, 6), 2);
  EXPECT_EQ(UnfreezeEpoch(2, 3, 6), 3);
  // One epoch: everything trains from the start.
  EXPECT_EQ(UnfreezeEpoch(1, 2, 1), 1);
  for (int64_t stages = 1; stages <= 6; ++stages) {
    for (int64_t epochs = 1; epochs <= 20; ++epochs) {
      int64_t before = 1;
      for (int64_t d = 0; d < stages; ++d) {
        const int64_t start = UnfreezeEpoch(d, stages, epochs);
        EXPECT_GE(start, before) << d << " of " << stages << ", " << epochs << " epochs";
        // It trains for at least half of the epochs (rounded up).
        EXPECT_GE(epochs - start + 1, (epochs + 1) / 2)
            << d << " of " << stages << ", " << epochs << " epochs";
        before = start;
      }
      EXPECT_EQ(UnfreezeEpoch(0, stages, epochs), 1);
    }
  }
}

}  // namespace
}  // namespace tlserve
