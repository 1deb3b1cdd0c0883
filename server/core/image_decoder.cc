#include "server/core/image_decoder.h"

#include <ATen/ATen.h>
#include <png.h>
#include <turbojpeg.h>

#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace tlserve {
namespace {

absl::Status TooManyPixels(int64_t width, int64_t height, int64_t max_pixels) {
  return absl::InvalidArgumentError(absl::StrCat("image is ", width, "x", height, " = ",
                                                 width * height, " pixels, over the limit of ",
                                                 max_pixels, " (--max_image_pixels)"));
}

absl::StatusOr<at::Tensor> DecodeJpeg(absl::string_view bytes, int64_t max_pixels) {
  std::unique_ptr<void, int (*)(tjhandle)> handle(tjInitDecompress(), tjDestroy);
  if (handle == nullptr) return absl::InternalError("cannot initialise the JPEG decoder");
  const auto* data = reinterpret_cast<const unsigned char*>(bytes.data());
  int width = 0, height = 0, subsamp = 0, colorspace = 0;
  if (tjDecompressHeader3(handle.get(), data, bytes.size(), &width, &height, &subsamp,
                          &colorspace) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("corrupt JPEG header: ", tjGetErrorStr2(handle.get())));
  }
  if (colorspace == TJCS_CMYK || colorspace == TJCS_YCCK) {
    return absl::InvalidArgumentError("CMYK JPEG is not supported; convert it to RGB");
  }
  if (static_cast<int64_t>(width) * height > max_pixels) {
    return TooManyPixels(width, height, max_pixels);
  }
  at::Tensor out = at::empty({height, width, 3}, at::kByte);
  // Default flags: accurate integer DCT and fancy upsampling, as PIL decodes.
  // Warnings (a truncated file) also fail: PIL refuses those images too.
  if (tjDecompress2(handle.get(), data, bytes.size(), out.data_ptr<uint8_t>(), width, 0, height,
                    TJPF_RGB, 0) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("corrupt or truncated JPEG: ", tjGetErrorStr2(handle.get())));
  }
  return out;
}

// libpng reports errors by longjmp; everything it writes lives in this struct,
// owned by the caller, so no C++ object is skipped over by the jump.
struct PngDecode {
  absl::string_view bytes;
  size_t pos = 0;
  char error[256] = {0};
  png_uint_32 width = 0;
  png_uint_32 height = 0;
  bool too_big = false;
  std::vector<uint8_t> pixels;
  std::vector<png_bytep> rows;
};

void PngReadData(png_structp png, png_bytep out, png_size_t n) {
  auto* st = static_cast<PngDecode*>(png_get_io_ptr(png));
  if (st->pos + n > st->bytes.size()) png_error(png, "truncated PNG data");
  std::memcpy(out, st->bytes.data() + st->pos, n);
  st->pos += n;
}

void PngOnError(png_structp png, png_const_charp message) {
  auto* st = static_cast<PngDecode*>(png_get_error_ptr(png));
  std::snprintf(st->error, sizeof(st->error), "%s", message);
  png_longjmp(png, 1);
}

void PngOnWarning(png_structp, png_const_charp) {}

// Returns false with st->error set on a libpng error.
bool DecodePngInto(PngDecode* st, int64_t max_pixels) {
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, st, PngOnError, PngOnWarning);
  if (png == nullptr) return false;
  png_infop info = png_create_info_struct(png);
  if (info == nullptr || setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    return false;
  }
  png_set_read_fn(png, st, PngReadData);
  png_read_info(png, info);
  st->width = png_get_image_width(png, info);
  st->height = png_get_image_height(png, info);
  if (static_cast<int64_t>(st->width) * st->height > max_pixels) {
    st->too_big = true;
    png_destroy_read_struct(&png, &info, nullptr);
    return true;
  }
  const int color = png_get_color_type(png, info);
  const int depth = png_get_bit_depth(png, info);
  if (depth == 16) png_set_scale_16(png);
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) {
    png_set_gray_to_rgb(png);
  }
  if (color & PNG_COLOR_MASK_ALPHA) png_set_strip_alpha(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  // Expanding a palette also expands its transparency (tRNS) into an alpha
  // channel: read 4 channels then, and drop the alpha as PIL's RGB does.
  const size_t channels = png_get_channels(png, info);
  if ((channels != 3 && channels != 4) ||
      png_get_rowbytes(png, info) != static_cast<size_t>(st->width) * channels) {
    png_error(png, "unsupported PNG pixel layout");
  }
  const size_t pixels = static_cast<size_t>(st->width) * st->height;
  st->pixels.resize(pixels * channels);
  st->rows.resize(st->height);
  for (png_uint_32 y = 0; y < st->height; ++y) {
    st->rows[y] = st->pixels.data() + static_cast<size_t>(y) * st->width * channels;
  }
  png_read_image(png, st->rows.data());
  png_destroy_read_struct(&png, &info, nullptr);
  if (channels == 4) {
    for (size_t i = 0; i < pixels; ++i) {
      std::memmove(&st->pixels[i * 3], &st->pixels[i * 4], 3);
    }
    st->pixels.resize(pixels * 3);
  }
  return true;
}

absl::StatusOr<at::Tensor> DecodePng(absl::string_view bytes, int64_t max_pixels) {
  auto st = std::make_unique<PngDecode>();
  st->bytes = bytes;
  if (!DecodePngInto(st.get(), max_pixels)) {
    return absl::InvalidArgumentError(absl::StrCat("corrupt PNG: ", st->error));
  }
  if (st->too_big) return TooManyPixels(st->width, st->height, max_pixels);
  at::Tensor out =
      at::empty({static_cast<int64_t>(st->height), static_cast<int64_t>(st->width), 3}, at::kByte);
  std::memcpy(out.data_ptr<uint8_t>(), st->pixels.data(), st->pixels.size());
  return out;
}

constexpr unsigned char kPngMagic[] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
constexpr unsigned char kJpegMagic[] = {0xff, 0xd8, 0xff};

bool StartsWith(absl::string_view bytes, const unsigned char* magic, size_t n) {
  return bytes.size() >= n && std::memcmp(bytes.data(), magic, n) == 0;
}

}  // namespace

absl::StatusOr<int64_t> PeekImagePixels(absl::string_view bytes) {
  if (StartsWith(bytes, kPngMagic, sizeof(kPngMagic))) {
    // The IHDR chunk comes first: length (4), "IHDR", width (4), height (4).
    if (bytes.size() < 24 || bytes.substr(12, 4) != "IHDR") {
      return absl::InvalidArgumentError("corrupt PNG: no IHDR chunk");
    }
    auto be32 = [&](size_t at) {
      const auto* p = reinterpret_cast<const unsigned char*>(bytes.data()) + at;
      return (int64_t{p[0]} << 24) | (int64_t{p[1]} << 16) | (int64_t{p[2]} << 8) | p[3];
    };
    const int64_t width = be32(16), height = be32(20);
    if (width > 0x7fffffff || height > 0x7fffffff) {  // the PNG spec's limit
      return absl::InvalidArgumentError("corrupt PNG: width or height over 2^31 - 1");
    }
    return width * height;
  }
  if (StartsWith(bytes, kJpegMagic, sizeof(kJpegMagic))) {
    std::unique_ptr<void, int (*)(tjhandle)> handle(tjInitDecompress(), tjDestroy);
    if (handle == nullptr) return absl::InternalError("cannot initialise the JPEG decoder");
    int width = 0, height = 0, subsamp = 0, colorspace = 0;
    if (tjDecompressHeader3(handle.get(), reinterpret_cast<const unsigned char*>(bytes.data()),
                            bytes.size(), &width, &height, &subsamp, &colorspace) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("corrupt JPEG header: ", tjGetErrorStr2(handle.get())));
    }
    return int64_t{width} * height;
  }
  return absl::InvalidArgumentError(
      "unsupported image format: expected JPEG or PNG bytes (or send a raw tensor)");
}

absl::StatusOr<at::Tensor> DecodeImage(absl::string_view bytes, int64_t max_pixels) {
  if (bytes.empty()) return absl::InvalidArgumentError("image is empty (0 bytes)");
  if (StartsWith(bytes, kPngMagic, sizeof(kPngMagic))) return DecodePng(bytes, max_pixels);
  if (StartsWith(bytes, kJpegMagic, sizeof(kJpegMagic))) return DecodeJpeg(bytes, max_pixels);
  return absl::InvalidArgumentError(
      "unsupported image format: expected JPEG or PNG bytes (or send a raw tensor)");
}

}  // namespace tlserve
