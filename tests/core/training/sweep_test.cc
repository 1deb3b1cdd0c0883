#include "server/core/training/sweep.h"

#include <gtest/gtest.h>
#include <torch/nn/functional/loss.h>
#include <torch/optim/lbfgs.h>
#include <torch/torch.h>

#include <atomic>
#include <cmath>

#include "server/core/training/stacked_heads.h"

namespace tlserve {
namespace {

// Gaussian classes around random means (`separation` apart in scale), each
// feature then given its own scale and offset so that standardisation matters.
struct Blobs {
  at::Tensor x, y;
};
Blobs MakeBlobs(int64_t n, int64_t d, int64_t classes, double separation, uint64_t seed,
                std::vector<double> priors = {}) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const at::Tensor means = at::randn({classes, d}, gen) * separation;
  const at::Tensor p =
      priors.empty() ? at::ones({classes}, at::kDouble) : at::tensor(priors, at::kDouble);
  const at::Tensor y = at::multinomial(p, n, /*replacement=*/true, gen);
  const at::Tensor scale = at::rand({d}, gen) * 20 + 0.5, offset = at::randn({d}, gen) * 100;
  return {((means.index_select(0, y) + at::randn({n, d}, gen)) * scale + offset), y};
}

double Accuracy(torch::nn::Sequential& head, const at::Tensor& x, const at::Tensor& y) {
  torch::NoGradGuard no_grad;
  return head->forward(x).argmax(1).eq(y).to(at::kDouble).mean().item<double>();
}

// One candidate fitted alone by PyTorch's own L-BFGS (strong Wolfe), on
// features standardised by its rows: the reference for the stacked solver.
double SeparateFitObjective(const at::Tensor& x_raw, const at::Tensor& y, int64_t classes,
                            const at::Tensor& rows, double l2) {
  const at::Tensor idx = rows.nonzero().view(-1);
  const at::Tensor xs = x_raw.index_select(0, idx), ys = y.index_select(0, idx);
  const at::Tensor sd = xs.std(0, false);
  const at::Tensor x = (xs - xs.mean(0)) / at::where(sd > 1e-6, sd, at::ones_like(sd));
  const double n = static_cast<double>(idx.numel());
  at::Tensor w = torch::zeros({x.size(1), classes}, torch::requires_grad());
  at::Tensor b = torch::zeros({classes}, torch::requires_grad());
  torch::optim::LBFGS opt({w, b}, torch::optim::LBFGSOptions(1)
                                      .max_iter(2000)
                                      .tolerance_grad(1e-9)
                                      .tolerance_change(1e-12)
                                      .history_size(20)
                                      .line_search_fn("strong_wolfe"));
  auto objective = [&] {
    return torch::nn::functional::cross_entropy(at::mm(x, w) + b, ys) +
           0.5 * l2 / n * w.pow(2).sum();
  };
  opt.step([&] {
    opt.zero_grad();
    at::Tensor loss = objective();
    loss.backward();
    return loss;
  });
  torch::NoGradGuard no_grad;
  return objective().item<double>();
}

TEST(StackedHeadsTest, BatchedFitReachesEachSeparateFitsOptimum) {
  const Blobs b = MakeBlobs(300, 20, 3, 0.4, 1);
  const std::vector<double> l2 = {1e-2, 1, 100, 1e4, 1e-2, 1, 100, 1e4};
  // The last four candidates train on the first 200 rows only.
  at::Tensor rows = at::ones({300, 8}, at::kBool);
  rows.slice(0, 200).slice(1, 4).fill_(false);
  StackedFitOptions o;
  o.max_iterations = 1000;
  o.tolerance = 1e-6;
  auto heads = FitStackedHeads(b.x, b.y, 3, rows, l2, o, nullptr);
  ASSERT_TRUE(heads.ok()) << heads.status();
  for (int64_t k = 0; k < 8; ++k) {
    const double separate = SeparateFitObjective(b.x, b.y, 3, rows.select(1, k), l2[k]);
    EXPECT_NEAR(heads->objective[k].item<double>(), separate, 1e-4) << "candidate " << k;
  }
}

TEST(StackedHeadsTest, DefaultStoppingIsAsGoodAsSeparateFitsToAThousandth) {
  const Blobs b = MakeBlobs(400, 64, 5, 0.3, 2);
  const std::vector<double> l2 = DefaultL2Grid();
  const at::Tensor rows = at::ones({400, 10}, at::kBool);
  auto heads = FitStackedHeads(b.x, b.y, 5, rows, l2, StackedFitOptions{}, nullptr);
  ASSERT_TRUE(heads.ok()) << heads.status();
  for (int64_t k = 0; k < 10; ++k) {
    const double separate = SeparateFitObjective(b.x, b.y, 5, rows.select(1, k), l2[k]);
    EXPECT_LT(heads->objective[k].item<double>(), separate + 1e-3) << "l2 " << l2[k];
  }
}

TEST(SweepTest, FindsAnAccurateHeadOnSeparableData) {
  const Blobs b = MakeBlobs(900, 32, 4, 1.0, 3);
  SweepData data{{b.x.slice(0, 0, 600)}, b.y.slice(0, 0, 600), 4, {}};
  auto r = Sweep(data, SweepOptions{}, nullptr, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GT(r->leaderboard[0].accuracy, 0.95);
  EXPECT_GT(r->train_accuracy, 0.95);
  EXPECT_GT(Accuracy(r->head, b.x.slice(0, 600), b.y.slice(0, 600)), 0.95);
}

TEST(SweepTest, RanksAHarmfulHeavyL2BelowALightOne) {
  // Unbalanced classes: a heavily penalised head is left with its biases and
  // answers the majority class.
  const Blobs b = MakeBlobs(400, 10, 3, 1.0, 4, {0.5, 0.3, 0.2});
  SweepOptions o;
  o.l2_grid = {1e6, 1};
  auto r = Sweep({{b.x}, b.y, 3, {}}, o, nullptr, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->leaderboard.size(), 2u);
  EXPECT_EQ(r->leaderboard[0].l2, 1);
  EXPECT_LT(r->leaderboard[1].accuracy, 0.6);
  EXPECT_GT(r->leaderboard[0].accuracy, r->leaderboard[1].accuracy + 0.2);
  EXPECT_LT(r->leaderboard[0].log_loss, r->leaderboard[1].log_loss);
}

TEST(SweepTest, LeaderboardIsSortedAndCoversEveryCandidate) {
  const Blobs b = MakeBlobs(300, 16, 3, 0.5, 5);
  // Layer 1 is noise: every entry of it must rank below layer 0's best.
  const at::Tensor noise = at::randn({300, 8}, at::detail::createCPUGenerator(9));
  SweepOptions o;
  o.hidden = {{}, {8}};
  o.epochs = 5;
  o.l2_grid = {100, 1, 0.01};
  std::vector<SweepEntry> seen;
  auto r = Sweep(
      {{b.x, noise}, b.y, 3, {}}, o, [&](const SweepEntry& e) { seen.push_back(e); }, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->leaderboard.size(), 2u * 2 * 3);
  EXPECT_EQ(seen.size(), r->leaderboard.size());
  for (size_t i = 1; i < r->leaderboard.size(); ++i) {
    const SweepEntry &a = r->leaderboard[i - 1], &e = r->leaderboard[i];
    EXPECT_TRUE(a.accuracy > e.accuracy ||
                (a.accuracy == e.accuracy &&
                 (a.params < e.params || (a.params == e.params && a.l2 >= e.l2))))
        << "entry " << i;
  }
  EXPECT_EQ(r->leaderboard[0].layer, 0);
  EXPECT_LT(r->leaderboard.back().accuracy, 0.6);
}

TEST(SweepTest, RefittedHeadTakesRawFeaturesAndReproducesTheValidationAccuracy) {
  const Blobs b = MakeBlobs(500, 24, 5, 0.35, 6);
  const at::Tensor validation = at::arange(500) >= 350;
  SweepOptions o;
  o.folds = 0;
  auto r = Sweep({{b.x}, b.y, 5, validation}, o, nullptr, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  const double reported = r->leaderboard[0].accuracy;
  EXPECT_GT(reported, 0.5);
  EXPECT_LT(reported, 1.0);  // else the test would not see a wrong scaling
  EXPECT_NEAR(Accuracy(r->head, b.x.slice(0, 350), b.y.slice(0, 350)), reported, 1.0 / 150);
  EXPECT_NEAR(Accuracy(r->head, b.x.slice(0, 0, 350), b.y.slice(0, 0, 350)), r->train_accuracy,
              1e-9);
}

TEST(SweepTest, HiddenLayerWinsWhereNoLinearHeadCan) {
  // XOR of the signs of two features: no linear head beats chance.
  at::Generator gen = at::detail::createCPUGenerator(7);
  const at::Tensor x = at::randn({600, 4}, gen) * 3 + 10;
  const at::Tensor y = ((x.select(1, 0) > 10) ^ (x.select(1, 1) > 10)).to(at::kLong);
  SweepOptions o;
  o.hidden = {{}, {32}};
  o.l2_grid = {1e-2};
  o.epochs = 60;
  o.learning_rate = 1e-2;
  o.folds = 3;
  auto r = Sweep({{x}, y, 2, {}}, o, nullptr, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->leaderboard[0].hidden, std::vector<int>{32});
  EXPECT_GT(r->leaderboard[0].accuracy, 0.9);
  EXPECT_LT(r->leaderboard[1].accuracy, 0.7);
  EXPECT_GT(r->train_accuracy, 0.9);
}

TEST(SweepTest, ReturnsCancelledWhenCancelled) {
  const Blobs b = MakeBlobs(200, 8, 2, 0.5, 8);
  std::atomic<int> asked{0};
  auto r = Sweep({{b.x}, b.y, 2, {}}, SweepOptions{}, nullptr, [&] { return ++asked > 3; });
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled);
}

TEST(SweepTest, RejectsInvalidInputsNamingTheOption) {
  const Blobs b = MakeBlobs(50, 4, 2, 1.0, 9);
  auto expect_invalid = [&](const SweepData& data, const SweepOptions& o, const std::string& name) {
    auto r = Sweep(data, o, nullptr, nullptr);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << name;
    EXPECT_NE(r.status().message().find(name), std::string::npos) << r.status();
  };
  const SweepData good{{b.x}, b.y, 2, {}};
  SweepOptions o;
  o.folds = 21;
  expect_invalid(good, o, "options.folds");
  o = {};
  o.l2_grid = {};
  expect_invalid(good, o, "options.l2_grid");
  o.l2_grid = {-1};
  expect_invalid(good, o, "options.l2_grid");
  o = {};
  o.hidden = {{16, 16}};
  expect_invalid(good, o, "options.hidden[0]");
  o = {};
  o.max_iterations = 0;
  expect_invalid(good, o, "options.max_iterations");
  o = {};
  o.folds = 1;
  expect_invalid(good, o, "validation");
  expect_invalid({{b.x, b.x.slice(0, 1)}, b.y, 2, {}}, {}, "features[1]");
  expect_invalid({{b.x}, b.y + 5, 2, {}}, {}, "labels");
  expect_invalid({{b.x}, b.y, 1, {}}, {}, "classes");
}

TEST(SweepTest, FoldsAreScikitLearnsStratifiedKFold) {
  // StratifiedKFold(3).split(X, y) in scikit-learn 1.2.1: each row's test fold.
  const std::vector<int64_t> y = {2, 0, 1, 0, 2, 1, 0, 0, 1, 2, 2, 0, 1, 1, 0, 2, 0};
  const std::vector<int> expected = {0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 1, 2, 2, 2, 2};
  EXPECT_EQ(StratifiedFolds(at::tensor(y), 3, /*shuffle=*/false, 0), expected);
  const std::vector<int> shuffled = StratifiedFolds(at::tensor(y), 3, /*shuffle=*/true, 1);
  for (int f = 0; f < 3; ++f) {  // the same fold sizes, whatever the order
    EXPECT_EQ(std::count(shuffled.begin(), shuffled.end(), f),
              std::count(expected.begin(), expected.end(), f));
  }
}

}  // namespace
}  // namespace tlserve
