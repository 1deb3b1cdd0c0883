#include "server/core/image_decoder.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "tests/test_util.h"

namespace tlserve {
namespace {

using ::tlserve::testing::Fixture;
using ::tlserve::testing::ReadBytes;

constexpr int64_t kMaxPixels = 40'000'000;

// Decoded pixels must equal PIL's Image.open(f).convert("RGB") exactly.
class DecodeMatchesPil : public ::testing::TestWithParam<std::string> {};

TEST_P(DecodeMatchesPil, Exactly) {
  const std::string name = GetParam();
  const std::string file = name + "." + (name.find("jpg") != std::string::npos ? "jpg" : "png");
  auto decoded = DecodeImage(ReadBytes(Fixture(file)), kMaxPixels);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  const std::string want = ReadBytes(Fixture("img_" + name + ".rgb.u8"));
  ASSERT_EQ(decoded->numel(), static_cast<int64_t>(want.size()));
  EXPECT_EQ(decoded->size(2), 3);
  EXPECT_EQ(0, std::memcmp(decoded->data_ptr(), want.data(), want.size()));
}

INSTANTIATE_TEST_SUITE_P(AllModes, DecodeMatchesPil,
                         ::testing::Values("rgb_png", "gray_png", "rgba_png", "palette_png",
                                           "rgb_jpg", "gray_jpg", "small_png"));

TEST(ImageDecoderTest, Reduces16BitPngTo8BitsWithRounding) {
  auto decoded = DecodeImage(ReadBytes(Fixture("gray16_png.png")), kMaxPixels);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  const std::string want = ReadBytes(Fixture("gray16_png.expected8.u8"));
  ASSERT_EQ(decoded->numel(), static_cast<int64_t>(want.size()));
  const auto* got = decoded->data_ptr<uint8_t>();
  int mismatches = 0;
  for (size_t i = 0; i < want.size(); ++i) mismatches += got[i] != static_cast<uint8_t>(want[i]);
  EXPECT_EQ(mismatches, 0);
}

// Finding 9: palette PNGs with transparency were "unsupported PNG pixel
// layout". PIL's convert("RGB") drops the transparency; so does the decoder.
TEST(ImageDecoderTest, DecodesPalettePngWithTransparencyAsPilDoes) {
  auto decoded = DecodeImage(ReadBytes(Fixture("palette_trns.png")), kMaxPixels);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  const std::string want = ReadBytes(Fixture("palette_trns.expected8.u8"));
  ASSERT_EQ(decoded->numel(), static_cast<int64_t>(want.size()));
  EXPECT_EQ(decoded->size(2), 3);
  const auto* got = decoded->data_ptr<uint8_t>();
  int mismatches = 0;
  for (size_t i = 0; i < want.size(); ++i) mismatches += got[i] != static_cast<uint8_t>(want[i]);
  EXPECT_EQ(mismatches, 0);
}

struct BadCase {
  const char* file;
  const char* message_part;
};

class RejectsBadImage : public ::testing::TestWithParam<BadCase> {};

TEST_P(RejectsBadImage, WithInvalidArgument) {
  auto decoded = DecodeImage(ReadBytes(Fixture(GetParam().file)), 1'000'000);
  ASSERT_FALSE(decoded.ok());
  EXPECT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(decoded.status().message().find(GetParam().message_part), absl::string_view::npos)
      << decoded.status();
}

INSTANTIATE_TEST_SUITE_P(Corrupt, RejectsBadImage,
                         ::testing::Values(BadCase{"bad_truncated.jpg", "JPEG"},
                                           BadCase{"bad_crc.png", "CRC"},
                                           BadCase{"bad_empty.png", "empty"},
                                           BadCase{"bad_format.gif", "unsupported"},
                                           BadCase{"bad_bomb.png", "over the limit"}));

TEST(ImageDecoderTest, BombIsRejectedFromTheHeader) {
  // 20000x20000 RGB would need 1.2 GB; the header check must refuse it first.
  auto decoded = DecodeImage(ReadBytes(Fixture("bad_bomb.png")), kMaxPixels);
  ASSERT_FALSE(decoded.ok());
  EXPECT_NE(decoded.status().message().find("400000000 pixels"), absl::string_view::npos)
      << decoded.status();
}

}  // namespace
}  // namespace tlserve
