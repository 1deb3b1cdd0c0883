// server/core/pil_resize against Pillow itself: every byte of Image.resize's
// output over a corpus of sizes (tests/fixtures/make_fixtures.py writes it:
// upscaling and downscaling, odd sizes, one-pixel and extreme ratios, gray
// and RGB, bilinear and bicubic).
#include "server/core/pil_resize.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "tests/test_util.h"

namespace tlserve {
namespace {

using ::tlserve::testing::Fixture;
using ::tlserve::testing::ReadBytes;

TEST(PilResizeTest, EqualsPillowByteForByte) {
  std::ifstream in(Fixture("pil_resize.json"));
  ASSERT_TRUE(in.good()) << "run make_fixtures first";
  const auto cases = nlohmann::json::parse(in);
  ASSERT_GE(cases.size(), 20u);
  for (const auto& c : cases) {
    const std::string stem = c.at("stem");
    const int64_t h = c.at("in")[0], w = c.at("in")[1], ch = c.at("in")[2];
    const int64_t oh = c.at("out")[0], ow = c.at("out")[1];
    const PilFilter filter =
        c.at("filter") == "bicubic" ? PilFilter::kBicubic : PilFilter::kBilinear;
    std::string input = ReadBytes(Fixture(stem + ".in.u8"));
    const std::string expected = ReadBytes(Fixture(stem + ".out.u8"));
    ASSERT_EQ(static_cast<int64_t>(input.size()), h * w * ch) << stem;
    ASSERT_EQ(static_cast<int64_t>(expected.size()), oh * ow * ch) << stem;
    const at::Tensor image =
        at::from_blob(input.data(), {h, w, ch}, at::TensorOptions().dtype(at::kByte)).clone();
    const at::Tensor got = PilResize(image, oh, ow, filter);
    ASSERT_EQ(got.sizes(), (std::vector<int64_t>{oh, ow, ch})) << stem;
    const auto* bytes = got.contiguous().data_ptr<uint8_t>();
    int64_t differ = 0, first = -1;
    for (int64_t i = 0; i < oh * ow * ch; ++i) {
      if (bytes[i] != static_cast<uint8_t>(expected[i])) {
        if (first < 0) first = i;
        ++differ;
      }
    }
    EXPECT_EQ(differ, 0) << stem << ": " << differ << " of " << oh * ow * ch
                         << " bytes differ from Pillow's, the first at " << first;
  }
}

TEST(PilResizeTest, TheSameSizeIsACopyAndAStridedInputIsRead) {
  const at::Tensor image = at::randint(0, 256, {9, 7, 3}, at::TensorOptions().dtype(at::kByte));
  EXPECT_TRUE(at::equal(PilResize(image, 9, 7, PilFilter::kBicubic), image));
  // A crop of a bigger image (not contiguous) resizes as its copy does.
  const at::Tensor big = at::randint(0, 256, {20, 30, 3}, at::TensorOptions().dtype(at::kByte));
  const at::Tensor part = big.slice(0, 3, 15).slice(1, 4, 25);
  EXPECT_TRUE(at::equal(PilResize(part, 5, 8, PilFilter::kBilinear),
                        PilResize(part.contiguous(), 5, 8, PilFilter::kBilinear)));
}

}  // namespace
}  // namespace tlserve
