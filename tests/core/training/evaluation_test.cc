#include "server/core/training/evaluation.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

namespace tlserve {
namespace {

// Float64 rows, so that 0.4 is the same number here as 6/15 in the code.
at::Tensor Rows(std::vector<std::vector<double>> rows) {
  std::vector<at::Tensor> t;
  for (auto& r : rows) t.push_back(torch::tensor(r, torch::kDouble));
  return torch::stack(t);
}

std::vector<int64_t> Labels(const at::Tensor& y) {
  return std::vector<int64_t>(y.data_ptr<int64_t>(), y.data_ptr<int64_t>() + y.numel());
}

double Nll(const at::Tensor& logits, const at::Tensor& y, double t) {
  return torch::nn::functional::cross_entropy(logits.to(torch::kDouble) / t, y).item<double>();
}

// Expected values from tests/core/training/make_evaluation_reference.py.
TEST(EvaluationTest, ScoresMatchScikitLearnOnAThreeClassCase) {
  // Row 1 ties classes 0 and 1: the lower index is the prediction.
  const at::Tensor p = Rows({{0.7, 0.2, 0.1},
                             {0.4, 0.4, 0.2},
                             {0.1, 0.8, 0.1},
                             {0.3, 0.3, 0.4},
                             {0.25, 0.25, 0.5},
                             {0.1, 0.2, 0.7}});
  auto r = ScorePredictions(p.to(torch::kFloat), {0, 1, 1, 0, 2, 2});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->examples, 6);
  EXPECT_EQ(r->confusion, (std::vector<int64_t>{1, 0, 1, 1, 1, 0, 0, 0, 2}));
  EXPECT_EQ(r->correct, (std::vector<bool>{true, false, true, false, true, true}));
  EXPECT_DOUBLE_EQ(r->accuracy, 4.0 / 6);
  EXPECT_EQ(r->top_k, 3);
  EXPECT_DOUBLE_EQ(r->top_k_accuracy, 1);
  ASSERT_EQ(r->classes.size(), 3u);
  const double precision[] = {0.5, 1, 0.66666666666666663};
  const double recall[] = {0.5, 0.5, 1};
  const double f1[] = {0.5, 0.66666666666666663, 0.80000000000000004};
  for (int c = 0; c < 3; ++c) {
    EXPECT_DOUBLE_EQ(r->classes[c].precision, precision[c]) << c;
    EXPECT_DOUBLE_EQ(r->classes[c].recall, recall[c]) << c;
    EXPECT_DOUBLE_EQ(r->classes[c].f1, f1[c]) << c;
    EXPECT_EQ(r->classes[c].support, 2) << c;
  }
  // sklearn.metrics.log_loss(eps=1e-15) on the float64 rows; float32 input
  // moves it by ~1e-8, so this check uses the float64 rows.
  auto exact = ScorePredictions(p, {0, 1, 1, 0, 2, 2});
  ASSERT_TRUE(exact.ok());
  EXPECT_NEAR(exact->log_loss, 0.6249840259919518, 1e-9);
  // By hand: bins 5 {0.4 wrong, 0.4 wrong}, 7 {0.5 right}, 10 {0.7 right x2},
  // 11 {0.8 right}: (0.8 + 0.5 + 0.6 + 0.2) / 6.
  EXPECT_NEAR(exact->ece, 0.35, 1e-12);
  EXPECT_NEAR(ExpectedCalibrationError(p, {0, 1, 1, 0, 2, 2}), 0.35, 1e-12);
}

TEST(EvaluationTest, LogLossClipsAZeroProbabilityAt1eMinus15) {
  auto r = ScorePredictions(Rows({{1, 0}, {0.5, 0.5}}), {1, 0});
  ASSERT_TRUE(r.ok());
  EXPECT_NEAR(r->log_loss, 17.615961787735316, 1e-9);  // (-log 1e-15 + log 2) / 2
}

TEST(EvaluationTest, TopKCountsTiesInIndexOrder) {
  // Seven classes, k = 5: class 0 and 6 lead, then five tied at 0.1 of which
  // only classes 1, 2 and 3 fit in the top five.
  const std::vector<double> row = {0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2};
  auto r = ScorePredictions(Rows({row, row, row, row, row}), {3, 4, 5, 6, 0});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->top_k, 5);
  EXPECT_DOUBLE_EQ(r->top_k_accuracy, 3.0 / 5);
  EXPECT_DOUBLE_EQ(r->accuracy, 1.0 / 5);
  EXPECT_EQ(r->classes[5].support, 1);
  EXPECT_EQ(r->classes[5].f1, 0);  // never predicted, never right: 0, not NaN
  EXPECT_EQ(r->classes[0].precision, 0.2);
}

TEST(EvaluationTest, CalibrationBinsAreOpenBelowAndClosedAbove) {
  // 0.4 = 6/15 belongs with 0.38 in (5/15, 6/15]: |1 - 0.78| / 2. Were it
  // put in the next bin the error would be (0.4 + 0.62) / 2.
  EXPECT_NEAR(ExpectedCalibrationError(Rows({{0.4, 0.3, 0.3}, {0.38, 0.31, 0.31}}), {1, 0}), 0.11,
              1e-12);
  // Two bins: 0.5 is in the first, with 0.4; confidence 0 is in the first too.
  EXPECT_NEAR(
      ExpectedCalibrationError(Rows({{0.5, 0.25, 0.25}, {0.4, 0.3, 0.3}}), {1, 0}, /*bins=*/2),
      0.05, 1e-12);
  EXPECT_NEAR(ExpectedCalibrationError(Rows({{0, 0}, {0.5, 0.5}}), {0, 0}, 2), 0.75, 1e-12);
  EXPECT_TRUE(std::isnan(ExpectedCalibrationError(Rows({{0.5, 0.5}}), {2})));
}

TEST(EvaluationTest, McNemarIsTheExactBinomialTest) {
  auto pair = [](int b, int c) {
    // Two agreements (both right, both wrong), which the test must ignore.
    std::vector<bool> a = {true, false}, other = {true, false};
    a.insert(a.end(), b, true), other.insert(other.end(), b, false);
    a.insert(a.end(), c, false), other.insert(other.end(), c, true);
    return McNemar(a, other);
  };
  auto t = pair(1, 9);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->only_a, 1);
  EXPECT_EQ(t->only_b, 9);
  EXPECT_NEAR(t->p_value, 0.021484375, 1e-15);  // 2 * (1 + 10) / 2^10
  EXPECT_NEAR(pair(9, 1)->p_value, 0.021484375, 1e-15);
  EXPECT_NEAR(pair(0, 3)->p_value, 0.25, 1e-15);
  EXPECT_NEAR(pair(10, 30)->p_value, 0.0022214337732293643, 1e-15);
  EXPECT_EQ(pair(5, 5)->p_value, 1);
  EXPECT_EQ(pair(0, 0)->p_value, 1);
  const double big = pair(49000, 51000)->p_value;
  EXPECT_NEAR(big / 2.5887160383468979e-10, 1, 1e-8);
}

TEST(EvaluationTest, FitTemperatureRecoversAPlantedTemperature) {
  torch::manual_seed(7);
  const at::Tensor true_logits = torch::randn({5000, 10}) * 2;
  const at::Tensor y = torch::multinomial(torch::softmax(true_logits, 1), 1).squeeze(1);
  const at::Tensor logits = true_logits * 3;  // over-confident by a factor of 3
  const double t = FitTemperature(logits, Labels(y));
  EXPECT_NEAR(t, 3, 0.3);
  // A minimum, not merely near the planted value.
  EXPECT_LT(Nll(logits, y, t), Nll(logits, y, t * 1.001));
  EXPECT_LT(Nll(logits, y, t), Nll(logits, y, t / 1.001));
  EXPECT_LT(ExpectedCalibrationError(torch::softmax(logits / t, 1), Labels(y)),
            ExpectedCalibrationError(torch::softmax(logits, 1), Labels(y)) / 2);
}

// The acceptance's check: a temperature fitted on one sample (a validation
// split) lowers the calibration error on another of the same source (a
// held-out set) that it never saw.
TEST(EvaluationTest, ATemperatureFittedOnValidationLowersTheErrorOnAHeldOutSet) {
  torch::manual_seed(11);
  auto sample = [](int64_t n) {
    const at::Tensor true_logits = torch::randn({n, 5}) * 1.5;
    const at::Tensor y = torch::multinomial(torch::softmax(true_logits, 1), 1).squeeze(1);
    return std::make_pair(true_logits * 2.5, y);  // over-confident, as trained heads are
  };
  const auto [val_logits, val_y] = sample(2000);
  const auto [test_logits, test_y] = sample(2000);
  const double t = FitTemperature(val_logits, Labels(val_y));
  EXPECT_GT(t, 1.5);
  const double before = ExpectedCalibrationError(torch::softmax(test_logits, 1), Labels(test_y));
  const double after = ExpectedCalibrationError(torch::softmax(test_logits / t, 1), Labels(test_y));
  std::printf("held-out ECE %.4f -> %.4f (T = %.3f fitted on another sample)\n", before, after, t);
  EXPECT_LT(after, before / 2);
}

TEST(EvaluationTest, FitTemperatureAtTheEndsOfItsRange) {
  // Every label already has probability 1 in float64: nothing beats T = 1.
  const at::Tensor certain = Rows({{100, 0, 0}, {0, 100, 0}, {0, 0, 100}});
  EXPECT_EQ(FitTemperature(certain, {0, 1, 2}), 1);
  // All right but not certain: sharper is always better, down to 0.05 (a
  // small margin, so that the NLL there is still above 0 in float64).
  const at::Tensor right = Rows({{0.5, 0, 0}, {0, 0.5, 0}, {0, 0, 0.5}});
  EXPECT_NEAR(FitTemperature(right, {0, 1, 2}), 0.05, 1e-12);
  // All wrong: flatter is always better, up to 20.
  EXPECT_NEAR(FitTemperature(right, {1, 2, 0}), 20, 1e-9);
  EXPECT_EQ(FitTemperature(torch::zeros({0, 3}), {}), 1);
  EXPECT_EQ(FitTemperature(right, {0, 1}), 1);  // mismatched: left alone
}

TEST(EvaluationTest, ThresholdsForPrecisionTakeTheLowestQualifyingProbability) {
  // Predicted class 0, most confident first: right, right, wrong, right, then
  // a tie at 0.6 (right and wrong), then right. Precision from the top:
  // 1, 1, 2/3, 3/4, (0.6 admits both) 4/6, 5/7. Class 1 is predicted twice,
  // wrongly; class 2 never.
  const at::Tensor p = Rows({{0.6, 0.4, 0},
                             {0.95, 0.05, 0},
                             {0.9, 0.1, 0},
                             {0.8, 0.2, 0},
                             {0.7, 0.3, 0},
                             {0.6, 0.4, 0},
                             {0.55, 0.45, 0},
                             {0.1, 0.9, 0},
                             {0.2, 0.8, 0}});
  const std::vector<int64_t> y = {1, 0, 0, 1, 0, 0, 0, 0, 0};
  std::vector<float> t = ThresholdsForPrecision(p, y, 0.75);
  ASSERT_EQ(t.size(), 3u);
  EXPECT_FLOAT_EQ(t[0], 0.7f);
  EXPECT_FLOAT_EQ(t[1], 1);
  EXPECT_FLOAT_EQ(t[2], 0);
  EXPECT_FLOAT_EQ(ThresholdsForPrecision(p, y, 0.7)[0], 0.55f);  // 5/7 qualifies
  EXPECT_FLOAT_EQ(ThresholdsForPrecision(p, y, 1.0)[0], 0.9f);
  EXPECT_TRUE(ThresholdsForPrecision(p, {0}, 0.9).empty());
}

// A threshold of 1 is "never": a probability that is 1 in float32 answers
// "unknown" under it, so a class whose only precise answers are certain
// gets the float just below 1 instead.
TEST(EvaluationTest, ThresholdsOfOneAnswerUnknownEvenForCertainty) {
  const at::Tensor p = Rows({{1, 0}, {1, 0}, {0.9, 0.1}, {0, 1}, {0.2, 0.8}});
  const std::vector<int64_t> y = {0, 0, 1, 0, 1};
  const std::vector<float> t = ThresholdsForPrecision(p, y, 0.9);
  ASSERT_EQ(t.size(), 2u);
  EXPECT_EQ(t[0], std::nextafter(1.0f, 0.0f));  // the two at 1 are right
  EXPECT_EQ(t[1], 1.0f);                        // the one at 1 is wrong: never
  EXPECT_FALSE(AnswersUnknown(1.0f, t[0]));
  EXPECT_TRUE(AnswersUnknown(0.9f, t[0]));
  EXPECT_TRUE(AnswersUnknown(1.0f, t[1]));
  EXPECT_FALSE(AnswersUnknown(0.5f, 0.5f));
  EXPECT_TRUE(AnswersUnknown(0.49f, 0.5f));
  EXPECT_FALSE(AnswersUnknown(0.3f, 0.0f));

  // What they keep: rows 0 and 1 (right); row 3's certainty answers unknown.
  const ThresholdChoice chosen = ChooseThresholds(p, y, 0.9);
  EXPECT_EQ(chosen.thresholds, t);
  EXPECT_DOUBLE_EQ(chosen.coverage, 2.0 / 5);
  EXPECT_DOUBLE_EQ(chosen.precision, 1.0);
  // Nothing kept: precision 0 rather than 0/0.
  const ThresholdChoice none = ChooseThresholds(Rows({{0.6, 0.4}}), {1}, 0.9);
  EXPECT_DOUBLE_EQ(none.coverage, 0);
  EXPECT_DOUBLE_EQ(none.precision, 0);
}

// Margins 0.85, 0.05, 0, 0, 0; entropies ~0.394, ~1.081, ln 2, ln 3, ~0.949.
at::Tensor RankingProbabilities() {
  return Rows({{0.9, 0.05, 0.05},
               {0.4, 0.35, 0.25},
               {0.5, 0.5, 0},
               {1.0 / 3, 1.0 / 3, 1.0 / 3},
               {0.45, 0.45, 0.1}});
}
// Rows 3 and 4 point the same way at different scales; rows 0 and 2 are zero.
at::Tensor RankingEmbeddings() { return Rows({{0, 0}, {1, -1}, {0, 0}, {1, 2}, {2, 4}}); }

std::vector<int64_t> Indices(const std::vector<Suggestion>& s) {
  std::vector<int64_t> out;
  for (const Suggestion& x : s) out.push_back(x.index);
  return out;
}

TEST(EvaluationTest, RankForLabellingOrdersByUncertaintyThenIndex) {
  const at::Tensor p = RankingProbabilities(), e = RankingEmbeddings();
  auto margin = RankForLabelling(p, e, 10, Uncertainty::kMargin, 2);
  EXPECT_EQ(Indices(margin), (std::vector<int64_t>{2, 3, 4, 1, 0}));
  EXPECT_NEAR(margin[3].margin, 0.05, 1e-12);
  EXPECT_NEAR(margin[0].entropy, std::log(2.0), 1e-12);  // 0 log 0 = 0
  auto entropy = RankForLabelling(p, e, 10, Uncertainty::kEntropy, 2);
  EXPECT_EQ(Indices(entropy), (std::vector<int64_t>{3, 1, 4, 2, 0}));
  EXPECT_NEAR(entropy[0].entropy, std::log(3.0), 1e-12);
  EXPECT_EQ(Indices(RankForLabelling(p, e, 2, Uncertainty::kEntropy, 2)),
            (std::vector<int64_t>{3, 1}));
}

TEST(EvaluationTest, RankForLabellingSkipsNearDuplicates) {
  const at::Tensor p = RankingProbabilities(), e = RankingEmbeddings();
  // Row 4 repeats row 3's direction and is skipped; the zero rows 2 and 0
  // resemble nothing, not even each other.
  EXPECT_EQ(Indices(RankForLabelling(p, e, 3, Uncertainty::kMargin, 0.99)),
            (std::vector<int64_t>{2, 3, 1}));
  int64_t skipped = -1;
  EXPECT_EQ(Indices(RankForLabelling(p, e, 3, Uncertainty::kMargin, 0.99, &skipped)),
            (std::vector<int64_t>{2, 3, 1}));
  EXPECT_EQ(skipped, 1);  // row 4
  EXPECT_EQ(Indices(RankForLabelling(p, e, 2, Uncertainty::kMargin, 0.99, &skipped)),
            (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(skipped, 0);  // the count was reached before row 4
  EXPECT_EQ(Indices(RankForLabelling(p, e, 10, Uncertainty::kMargin, 0.99, &skipped)),
            (std::vector<int64_t>{2, 3, 1, 0}));
  EXPECT_EQ(skipped, 1);
  EXPECT_EQ(Indices(RankForLabelling(p, e, 3, Uncertainty::kMargin, 2)),
            (std::vector<int64_t>{2, 3, 4}));
}

TEST(EvaluationTest, RankForLabellingWithNothingToRankIsEmpty) {
  const at::Tensor p = RankingProbabilities(), e = RankingEmbeddings();
  EXPECT_TRUE(RankForLabelling(p, e, 0, Uncertainty::kMargin, 2).empty());
  EXPECT_TRUE(RankForLabelling(p, e, -1, Uncertainty::kMargin, 2).empty());
  EXPECT_TRUE(
      RankForLabelling(torch::zeros({0, 3}), torch::zeros({0, 2}), 5, Uncertainty::kEntropy, 2)
          .empty());
  EXPECT_TRUE(RankForLabelling(p, e.slice(0, 0, 4), 5, Uncertainty::kMargin, 2).empty());
  auto one_class = RankForLabelling(Rows({{1}, {1}}), Rows({{1}, {1}}), 5, Uncertainty::kMargin, 2);
  ASSERT_EQ(one_class.size(), 2u);
  EXPECT_EQ(one_class[0].margin, 1);
}

TEST(EvaluationTest, InvalidInputsAreInvalidArgument) {
  const at::Tensor p = Rows({{0.5, 0.5}, {0.2, 0.8}});
  auto code = [](const auto& s) { return s.status().code(); };
  EXPECT_EQ(code(ScorePredictions(torch::zeros({0, 3}), {})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(ScorePredictions(torch::ones({4}), {0, 0, 0, 0})),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(ScorePredictions(p, {0})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(ScorePredictions(p, {0, -1})), absl::StatusCode::kInvalidArgument);
  const at::Tensor p4 = torch::full({4, 5}, 0.2);
  auto bad = ScorePredictions(p4, {0, 1, 2, 7});
  EXPECT_EQ(code(bad), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("labels[3] = 7 is not a class index in [0, 5)"),
            std::string::npos)
      << bad.status();
  EXPECT_EQ(code(McNemar({true, false}, {true})), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tlserve
