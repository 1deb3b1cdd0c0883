#include "server/core/preprocess.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
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
  EXPECT_EQ(spec->resize_mode, PreprocessSpec::ResizeMode::kTensor);  // the default
  auto again = ParsePreprocessSpec(spec->ToJson());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->resize, 72);
  EXPECT_FLOAT_EQ(again->std[1], 0.25f);
  auto pil = ParsePreprocessSpec(R"({"resize_mode": "pil", "interpolation": "bicubic"})");
  ASSERT_TRUE(pil.ok()) << pil.status();
  auto pil_again = ParsePreprocessSpec(pil->ToJson());
  ASSERT_TRUE(pil_again.ok());
  EXPECT_EQ(pil_again->resize_mode, PreprocessSpec::ResizeMode::kPil);
  EXPECT_EQ(pil_again->interpolation, PreprocessSpec::Interpolation::kBicubic);
}

TEST(PreprocessSpecTest, RejectsBadValuesNamingTheKey) {
  for (const char* bad :
       {R"({"crop": "x"})", R"({"mean": [1, 2]})", R"({"std": [1, 0, 1]})", R"({"crop": 0})",
        "not json", "[1]", R"({"resize_mode": "PIL"})", R"({"interpolation": 2})"}) {
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

// Finding 2 of the hardening issue: a 167-byte PNG of 1×30,000 pixels cost
// 4.3 GB, because the limit was checked before the short side was upscaled.
TEST(PreprocessTest, RefusesImagesWhoseResizedIntermediateIsOverTheBudget) {
  PreprocessSpec spec;  // short side to 256
  const at::Tensor thin = at::zeros({1, 30000, 3}, at::kByte);
  auto out = Preprocess(thin, spec, 40'000'000);
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(out.status().message().find("--max_image_pixels"), std::string::npos) << out.status();
  EXPECT_NE(out.status().message().find("aspect ratio"), std::string::npos) << out.status();
  // 100,000 × 1 too, and the checks never overflow.
  EXPECT_FALSE(CheckPreprocessBudget(1, 100000, spec, 40'000'000).ok());
  EXPECT_FALSE(CheckPreprocessBudget(1, int64_t{1} << 60, spec, int64_t{1} << 62).ok());
  EXPECT_FALSE(CheckPreprocessBudget(0, 10, spec, 40'000'000).ok());
  // An ordinary photo and a moderately wide panorama pass.
  EXPECT_TRUE(CheckPreprocessBudget(480, 640, spec, 40'000'000).ok());
  EXPECT_TRUE(CheckPreprocessBudget(300, 3000, spec, 40'000'000).ok());
  // On a 32-pixel backbone the pixel limit alone would let 1×30,000 through
  // (36×1,080,000 = 38.9 M pixels, ~1 GB of floats): the aspect ratio does not.
  PreprocessSpec tiny;
  tiny.resize = 36;
  tiny.crop = 32;
  const absl::Status ratio = CheckPreprocessBudget(30000, 1, tiny, 40'000'000);
  ASSERT_FALSE(ratio.ok());
  EXPECT_NE(ratio.message().find("aspect ratio"), absl::string_view::npos) << ratio;
  EXPECT_TRUE(CheckPreprocessBudget(28, 28 * 50, tiny, 40'000'000).ok());
  EXPECT_FALSE(CheckPreprocessBudget(28, 28 * 50 + 1, tiny, 40'000'000).ok());
}

TEST(PreprocessTest, DecodeAndPreprocessAppliesTheBudgetToEncodedImages) {
  PreprocessSpec spec;
  spec.resize = 36;
  spec.crop = 32;
  // A 1×1,000,000 PNG decodes to 1 M pixels, but resizing its short side to
  // 36 would make 36 M × 36 pixels.
  auto out = DecodeAndPreprocess(ReadBytes(Fixture("thin_1000000x1.png")), spec, 40'000'000);
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  auto ok = DecodeAndPreprocess(ReadBytes(Fixture("rgb_png.png")), spec, 40'000'000);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->sizes(), at::IntArrayRef({3, 32, 32}));
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
  auto pre = Preprocess(*rgb, spec, 40'000'000);
  ASSERT_TRUE(pre.ok()) << pre.status();
  const at::Tensor& x = *pre;
  ASSERT_EQ(x.sizes(), at::IntArrayRef({3, 224, 224}));
  std::vector<float> got(x.data_ptr<float>(), x.data_ptr<float>() + x.numel());
  const auto want = ReadF32(Fixture("img_" + name + ".pre.r50.f32"));
  EXPECT_LE(MaxAbsDiff(got, want), 1e-6);
}

// "resize_mode": "pil": the uint8 crop is the one torchvision's transforms
// make of the PIL image (Resize, CenterCrop), byte for byte.
TEST_P(PreprocessMatchesTorchvision, OnPilImages) {
  const std::string name = GetParam();
  const std::string file = name + "." + (name.find("jpg") != std::string::npos ? "jpg" : "png");
  auto rgb = DecodeImage(ReadBytes(Fixture(file)), 40'000'000);
  ASSERT_TRUE(rgb.ok()) << rgb.status();
  for (const char* interpolation : {"bilinear", "bicubic"}) {
    auto spec = ParsePreprocessSpec(
        absl::StrCat(R"({"resize_mode": "pil", "interpolation": ")", interpolation, "\"}"));
    ASSERT_TRUE(spec.ok()) << spec.status();
    auto pre = PreprocessUint8(*rgb, *spec, 40'000'000);
    ASSERT_TRUE(pre.ok()) << pre.status();
    const at::Tensor hwc = pre->permute({1, 2, 0}).contiguous();
    const std::string want =
        ReadBytes(Fixture(absl::StrCat("img_", name, ".pilcrop_", interpolation, ".r50.u8")));
    ASSERT_EQ(static_cast<size_t>(hwc.numel()), want.size()) << interpolation;
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(hwc.data_ptr<uint8_t>()), want.size()),
              want)
        << name << " " << interpolation;
  }
}

INSTANTIATE_TEST_SUITE_P(AllModes, PreprocessMatchesTorchvision,
                         ::testing::Values("rgb_png", "gray_png", "rgba_png", "palette_png",
                                           "rgb_jpg", "gray_jpg", "small_png"));

}  // namespace
}  // namespace tlserve
