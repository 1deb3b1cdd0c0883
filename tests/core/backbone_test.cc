#include "server/core/backbone.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "absl/time/clock.h"
#include "tests/test_util.h"

namespace tlserve {
namespace {

using ::tlserve::testing::Fixture;
using ::tlserve::testing::MaxAbs;
using ::tlserve::testing::MaxAbsDiff;
using ::tlserve::testing::ReadF32;

// Loading a ResNet-50 takes a second: once for the suite.
class ResNet50Test : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    BackboneOptions o;
    o.path = Fixture("r50.pt");
    o.device = "cpu";
    auto b = Backbone::Load(o);
    ASSERT_TRUE(b.ok()) << b.status();
    backbone_ = b->release();
  }
  static void TearDownTestSuite() { delete backbone_; }
  static Backbone* backbone_;
};
Backbone* ResNet50Test::backbone_ = nullptr;

TEST_F(ResNet50Test, StagesAreTheModulesInOrder) {
  EXPECT_EQ(backbone_->stage_names(),
            (std::vector<std::string>{"conv1", "bn1", "relu", "maxpool", "layer1", "layer2",
                                      "layer3", "layer4", "avgpool", "fc"}));
  EXPECT_EQ(backbone_->embedding_dim(), 2048);
  EXPECT_FALSE(backbone_->pretrained());
  EXPECT_EQ(backbone_->sha256().size(), 64u);
}

TEST_F(ResNet50Test, ParameterCountsEqualTorchvisions) {
  auto s = backbone_->Describe({3, 224, 224});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->total_params, 25'557'032);
  EXPECT_EQ(s->trainable_params, 0);  // the shared backbone is frozen
  ASSERT_EQ(s->stages.size(), 10u);
  EXPECT_EQ(s->stages[9].name, "fc");
  EXPECT_TRUE(s->stages[9].head);
  EXPECT_EQ(s->stages[9].params, 2'049'000);
  EXPECT_EQ(s->stages[9].type, "Linear");
  EXPECT_EQ(s->stages[0].type, "Conv2d");
  EXPECT_EQ(s->stages[0].params, 9'408);
  EXPECT_EQ(s->stages[7].output_shape, (std::vector<int64_t>{2048, 7, 7}));
}

TEST_F(ResNet50Test, ShapesFollowTheInputSizeAsInTheNotebook) {
  auto s = backbone_->Describe({3, 1024, 1024});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->stages[0].output_shape, (std::vector<int64_t>{64, 512, 512}));
  EXPECT_EQ(s->stages[4].output_shape, (std::vector<int64_t>{256, 256, 256}));
  EXPECT_EQ(s->stages[8].output_shape, (std::vector<int64_t>{2048, 1, 1}));
  EXPECT_EQ(s->stages[9].output_shape, (std::vector<int64_t>{1000}));
}

TEST_F(ResNet50Test, EmbeddingOfFloatInputEqualsPyTorch) {
  const auto in = ReadF32(Fixture("float_r50.in.f32"));
  const auto want = ReadF32(Fixture("float_r50.out.f32"));
  at::Tensor x = at::from_blob(const_cast<float*>(in.data()), {3, 3, 224, 224}).clone();
  at::Tensor y = backbone_->Embed(x, EmbedSpec{});
  ASSERT_EQ(y.sizes(), at::IntArrayRef({3, 2048}));
  std::vector<float> got(y.data_ptr<float>(), y.data_ptr<float>() + y.numel());
  const double diff = MaxAbsDiff(got, want), scale = MaxAbs(want);
  EXPECT_LE(diff, 1e-4 * scale) << "max |diff| " << diff << " vs max |ref| " << scale;
  RecordProperty("max_abs_diff_over_max_abs_ref", std::to_string(diff / scale));
}

TEST_F(ResNet50Test, LayerOutputsArePooledAndNormalised) {
  auto stage = backbone_->EmbeddableStage("layer3");
  ASSERT_TRUE(stage.ok());
  at::Tensor x = at::randn({2, 3, 224, 224});
  EmbedSpec avg{*stage, Pool::kAvg, false}, max{*stage, Pool::kMax, false};
  EmbedSpec unit{*stage, Pool::kAvg, true};
  at::Tensor a = backbone_->Embed(x, avg), m = backbone_->Embed(x, max);
  at::Tensor u = backbone_->Embed(x, unit);
  EXPECT_EQ(a.sizes(), at::IntArrayRef({2, 1024}));
  EXPECT_TRUE(at::all(m >= a - 1e-5).item<bool>());  // a max is never below the mean
  EXPECT_FALSE(m.equal(a));
  EXPECT_TRUE(at::all(u.norm(2, 1).sub(1).abs() < 1e-5).item<bool>());
  EXPECT_TRUE(at::allclose(u, a / a.norm(2, 1, true), 1e-5, 1e-6));
}

TEST_F(ResNet50Test, UnknownLayerAndHeadAreInvalidArguments) {
  auto unknown = backbone_->EmbeddableStage("layer9");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("layer4"), absl::string_view::npos);
  auto head = backbone_->EmbeddableStage("fc");
  EXPECT_NE(head.status().message().find("dropped head"), absl::string_view::npos);
}

// Finding 7 of the hardening issue: `tlctl summary --input 3x4096x4096` ran a
// 16 M-pixel forward and stalled every client for seconds. Describe is
// capped at 1024x1024 (the notebook's largest), on a lane of its own.
TEST_F(ResNet50Test, DescribeIsCappedAtOneMegapixel) {
  auto big = backbone_->Describe({3, 4096, 4096});
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(big.status().message().find("1024x1024"), absl::string_view::npos) << big.status();
  EXPECT_FALSE(backbone_->Describe({3, 1, 2'000'000}).ok());
  auto notebook = backbone_->Describe({3, 1024, 1024});  // the largest allowed
  EXPECT_TRUE(notebook.ok()) << notebook.status();
}

TEST_F(ResNet50Test, DescribeRejectsBadInputShapes) {
  EXPECT_EQ(backbone_->Describe({1, 2}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(backbone_->Describe({3, 100000, 100000}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(backbone_->Describe({4, 224, 224}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(BackboneTest, RefusesAModuleWhoseForwardIsNotItsStagesChained) {
  BackboneOptions o;
  o.path = Fixture("not_chained.pt");
  o.device = "cpu";
  auto b = Backbone::Load(o);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(b.status().message().find("does not reproduce its forward"), absl::string_view::npos)
      << b.status();
}

TEST(BackboneTest, RefusesMissingFilesBadDevicesAndCpuHalfPrecision) {
  BackboneOptions o;
  o.path = Fixture("no_such.pt");
  EXPECT_EQ(Backbone::Load(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.path = Fixture("r18small.pt");
  o.device = "tpu";
  EXPECT_NE(Backbone::Load(o).status().message().find("--device"), absl::string_view::npos);
  o.device = "cpu";
  o.precision = "bf16";
  EXPECT_NE(Backbone::Load(o).status().message().find("needs a CUDA device"),
            absl::string_view::npos);
  o.path = Fixture("rgb_png.png");
  o.precision = "fp32";
  EXPECT_NE(Backbone::Load(o).status().message().find("TorchScript"), absl::string_view::npos);
}

TEST(BackboneTest, ReadsPreprocessingFromTheExtraFile) {
  BackboneOptions o;
  o.path = Fixture("r18small.pt");
  o.device = "cpu";
  auto b = Backbone::Load(o);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*b)->preprocess().resize, 72);
  EXPECT_EQ((*b)->preprocess().crop, 64);
  EXPECT_EQ((*b)->embedding_dim(), 512);
  EXPECT_EQ((*b)->name(), "resnet18");
}

}  // namespace
}  // namespace tlserve
