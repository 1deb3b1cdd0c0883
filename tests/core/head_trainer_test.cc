#include "server/core/head_trainer.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace tlserve {
namespace {

// Three Gaussian blobs in 16 dimensions, far from the origin and on different
// scales (so standardisation matters), 100 points each.
void Blobs(int per_class, uint64_t seed, at::Tensor* x, at::Tensor* y) {
  torch::manual_seed(seed);
  const at::Tensor centres = torch::randn({3, 16}) * 3 + 20;
  const at::Tensor scale = torch::linspace(0.5, 5, 16);
  std::vector<at::Tensor> xs, ys;
  for (int c = 0; c < 3; ++c) {
    xs.push_back((centres[c] + torch::randn({per_class, 16})) * scale);
    ys.push_back(torch::full({per_class}, c, torch::kLong));
  }
  *x = torch::cat(xs);
  *y = torch::cat(ys);
}

TEST(HeadTrainerTest, LbfgsFitsALinearHeadThatTakesRawFeatures) {
  at::Tensor x, y, xv, yv;
  Blobs(100, 1, &x, &y);
  Blobs(30, 1, &xv, &yv);
  auto o = ResolveTrainOptions({}, HeadSpec{}, false);
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->optimizer, TrainOptions::Optimizer::kLbfgs);
  int epochs_seen = 0;
  auto r = TrainHead(
      HeadSpec{}, 3, x, y, xv, yv, *o, [&](const EpochStats& s) { epochs_seen = s.epoch; },
      nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GE(epochs_seen, 1);
  EXPECT_LE(epochs_seen, 30);  // L-BFGS may stop early once converged
  EXPECT_EQ(r->history.size(), static_cast<size_t>(epochs_seen));
  EXPECT_GE(r->validation.accuracy, 0.95);
  // The standardisation is folded in: raw features give the reported accuracy.
  torch::NoGradGuard no_grad;
  const double raw = r->head->forward(xv).argmax(1).eq(yv).to(torch::kDouble).mean().item<double>();
  EXPECT_DOUBLE_EQ(raw, r->validation.accuracy);
  EXPECT_EQ(r->validation.confusion.size(), 9u);
  EXPECT_EQ(r->validation.support, (std::vector<int64_t>{30, 30, 30}));
}

TEST(HeadTrainerTest, AdamwTrainsAnMlpHeadAndWeightsRoundTrip) {
  at::Tensor x, y;
  Blobs(100, 2, &x, &y);
  HeadSpec spec{{32}, 0.1f};
  TrainOptions opts;
  opts.epochs = 20;
  auto o = ResolveTrainOptions(opts, spec, false);
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->optimizer, TrainOptions::Optimizer::kAdamw);
  auto r = TrainHead(spec, 3, x, y, x.slice(0, 0, 0), y.slice(0, 0, 0), *o, nullptr, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GE(r->train.accuracy, 0.95);
  torch::nn::Sequential copy = MakeHead(spec, 16, 3);
  ASSERT_TRUE(LoadHead(SaveHead(r->head), copy).ok());
  copy->eval();
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(copy->forward(x).equal(r->head->forward(x)));
  EXPECT_EQ(ParamCount(copy), 16 * 32 + 32 + 32 * 3 + 3);
}

TEST(HeadTrainerTest, OptionsAreValidated) {
  TrainOptions o;
  o.optimizer = TrainOptions::Optimizer::kLbfgs;
  EXPECT_EQ(ResolveTrainOptions(o, HeadSpec{{8}, 0}, false).status().code(),
            absl::StatusCode::kInvalidArgument);
  o = {};
  o.learning_rate = -1;
  EXPECT_NE(ResolveTrainOptions(o, {}, false).status().message().find("learning_rate"),
            absl::string_view::npos);
  o = {};
  o.optimizer = TrainOptions::Optimizer::kLbfgs;
  EXPECT_FALSE(ResolveTrainOptions(o, {}, /*fine_tune=*/true).ok());
  o = {};
  o.validation_fraction = 1;
  EXPECT_FALSE(ResolveTrainOptions(o, {}, false).ok());
  EXPECT_FALSE(ValidateHeadSpec(HeadSpec{{0}, 0}).ok());
  EXPECT_FALSE(ValidateHeadSpec(HeadSpec{{}, 1.0f}).ok());
}

TEST(HeadTrainerTest, StopsWhenCancelled) {
  at::Tensor x, y;
  Blobs(10, 3, &x, &y);
  auto o = ResolveTrainOptions({}, HeadSpec{}, false);
  auto r = TrainHead(HeadSpec{}, 3, x, y, x, y, *o, nullptr, [] { return true; });
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled);
}

}  // namespace
}  // namespace tlserve
