#include "server/core/preprocess.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "server/core/image_decoder.h"
#include "tests/test_util.h"

namespace tlserve {
namespace {

using ::tlserve::testing::Fixture;
using ::tlserve::testing::MaxAbsDiff;
using ::tlserve::testing::ReadBytes;
using ::tlserve::testing::ReadF32;

TEST(PreprocessSpecTest, DefaultsAreImageNets) {
  auto spec = ParsePreprocessSpec("{}");
  ASSERT_TRUE(spec.ok());
  EXPECT_EQ(spec->resize, 256);
  EXPECT_EQ(spec->crop, 224);
  EXPECT_FLOAT_EQ(spec->mean[0], 0.485f);
  EXPECT_FLOAT_EQ(spec->std[2], 0.225f);
}

TEST(PreprocessSpecTest, ParsesAllKeysAndRoundTrips) {
  auto spec = ParsePreprocessSpec(
      R"({"resize": 72, "crop": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->crop, 64);
  auto again = ParsePreprocessSpec(spec->ToJson());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->resize, 72);
  EXPECT_FLOAT_EQ(again->std[1], 0.25f);
}

TEST(PreprocessSpecTest, RejectsBadValuesNamingTheKey) {
  for (const char* bad : {R"({"crop": "x"})", R"({"mean": [1, 2]})", R"({"std": [1, 0, 1]})",
                          R"({"crop": 0})", "not json", "[1]"}) {
    auto spec = ParsePreprocessSpec(bad);
    EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_NE(ParsePreprocessSpec(R"({"mean": [1]})").status().message().find("mean"),
            absl::string_view::npos);
}

TEST(ToRgbTest, ReplicatesGrayAndDropsAlpha) {
  at::Tensor gray = at::arange(6, at::kByte).view({2, 3, 1});
  auto rgb = ToRgb(gray);
  ASSERT_TRUE(rgb.ok());
  EXPECT_TRUE(rgb->select(2, 2).equal(gray.select(2, 0)));
  at::Tensor rgba = at::arange(24, at::kByte).view({2, 3, 4});
  EXPECT_TRUE(ToRgb(rgba)->equal(rgba.slice(2, 0, 3)));
  EXPECT_EQ(ToRgb(at::zeros({2, 2, 2}, at::kByte)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// The C++ pipeline on a uint8 image must be torchvision's on a uint8 tensor
// (antialiased resize, rounded back to uint8): identical up to float32 noise.
class PreprocessMatchesTorchvision : public ::testing::TestWithParam<std::string> {};

TEST_P(PreprocessMatchesTorchvision, OnUint8Tensors) {
  const std::string name = GetParam();
  const std::string file = name + "." + (name.find("jpg") != std::string::npos ? "jpg" : "png");
  auto rgb = DecodeImage(ReadBytes(Fixture(file)), 40'000'000);
  ASSERT_TRUE(rgb.ok()) << rgb.status();
  PreprocessSpec spec;  // the r50 fixture uses the ImageNet defaults
  at::Tensor x = Preprocess(*rgb, spec);
  ASSERT_EQ(x.sizes(), at::IntArrayRef({3, 224, 224}));
  std::vector<float> got(x.data_ptr<float>(), x.data_ptr<float>() + x.numel());
  const auto want = ReadF32(Fixture("img_" + name + ".pre.r50.f32"));
  EXPECT_LE(MaxAbsDiff(got, want), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(AllModes, PreprocessMatchesTorchvision,
                         ::testing::Values("rgb_png", "gray_png", "rgba_png", "palette_png",
                                           "rgb_jpg", "gray_jpg", "small_png"));

}  // namespace
}  // namespace tlserve
