#include "server/core/preprocess.h"

#include <ATen/ATen.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/core/image_decoder.h"
#include "server/core/pil_resize.h"

namespace tlserve {
namespace {

// torchvision's _compute_resized_output_size for an int size: the short side
// becomes `size`, the long side int(size * long / short).
std::array<int64_t, 2> ResizedSize(int64_t h, int64_t w, int64_t size) {
  const int64_t short_side = std::min(h, w);
  const int64_t long_side = std::max(h, w);
  const auto new_long =
      static_cast<int64_t>(static_cast<double>(size * long_side) / static_cast<double>(short_side));
  return w <= h ? std::array<int64_t, 2>{new_long, size} : std::array<int64_t, 2>{size, new_long};
}

// uint8 3×H×W -> uint8 3×h×w: as torchvision.transforms.functional.resize
// with antialias=True does it on a uint8 tensor (bicubic clamped before it is
// rounded), or on a PIL image (Pillow's Image.resize).
at::Tensor Resize(const at::Tensor& chw, int64_t h, int64_t w, const PreprocessSpec& spec) {
  const bool bicubic = spec.interpolation == PreprocessSpec::Interpolation::kBicubic;
  if (spec.resize_mode == PreprocessSpec::ResizeMode::kPil) {
    return PilResize(chw.permute({1, 2, 0}), h, w,
                     bicubic ? PilFilter::kBicubic : PilFilter::kBilinear)
        .permute({2, 0, 1});
  }
  at::Tensor x = chw.unsqueeze(0).to(at::kFloat);
  if (bicubic) {
    x = at::_upsample_bicubic2d_aa(x, {h, w}, /*align_corners=*/false).clamp(0, 255);
  } else {
    x = at::_upsample_bilinear2d_aa(x, {h, w}, /*align_corners=*/false);
  }
  return at::round(x).to(at::kByte).squeeze(0);
}

at::Tensor ResizeShortSide(const at::Tensor& chw, int64_t size, const PreprocessSpec& spec) {
  const auto out = ResizedSize(chw.size(1), chw.size(2), size);
  if (out[0] == chw.size(1) && out[1] == chw.size(2)) return chw;
  return Resize(chw, out[0], out[1], spec);
}

// torchvision's center_crop: zero padding when the image is smaller, then a
// crop whose offset is rounded half to even, as Python's round() does.
at::Tensor CenterCrop(at::Tensor chw, int64_t crop) {
  int64_t h = chw.size(1), w = chw.size(2);
  if (crop > h || crop > w) {
    const int64_t left = crop > w ? (crop - w) / 2 : 0;
    const int64_t top = crop > h ? (crop - h) / 2 : 0;
    const int64_t right = crop > w ? (crop - w + 1) / 2 : 0;
    const int64_t bottom = crop > h ? (crop - h + 1) / 2 : 0;
    chw = at::constant_pad_nd(chw, {left, right, top, bottom}, 0);
    h = chw.size(1);
    w = chw.size(2);
    if (h == crop && w == crop) return chw;
  }
  const auto top = static_cast<int64_t>(std::nearbyint((h - crop) / 2.0));
  const auto left = static_cast<int64_t>(std::nearbyint((w - crop) / 2.0));
  return chw.slice(1, top, top + crop).slice(2, left, left + crop);
}

}  // namespace

std::string PreprocessSpec::ToJson() const {
  nlohmann::json j = {
      {"resize", resize},
      {"crop", crop},
      {"mean", {mean[0], mean[1], mean[2]}},
      {"std", {std[0], std[1], std[2]}},
      {"resize_mode", resize_mode == ResizeMode::kPil ? "pil" : "tensor"},
      {"interpolation", interpolation == Interpolation::kBicubic ? "bicubic" : "bilinear"}};
  return j.dump();
}

absl::StatusOr<PreprocessSpec> ParsePreprocessSpec(absl::string_view text) {
  PreprocessSpec spec;
  const nlohmann::json j = nlohmann::json::parse(text.begin(), text.end(), nullptr,
                                                 /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("preprocess.json is not a JSON object");
  }
  for (const char* key : {"resize", "crop"}) {
    if (!j.contains(key)) continue;
    if (!j[key].is_number_integer() || j[key].get<int64_t>() < 0 || j[key].get<int64_t>() > 16384) {
      return absl::InvalidArgumentError(
          absl::StrCat("preprocess.json: \"", key, "\" must be an integer in [0, 16384]"));
    }
    (std::string(key) == "resize" ? spec.resize : spec.crop) = j[key].get<int>();
  }
  if (spec.crop == 0) return absl::InvalidArgumentError("preprocess.json: \"crop\" must be > 0");
  for (const char* key : {"mean", "std"}) {
    if (!j.contains(key)) continue;
    const auto& v = j[key];
    if (!v.is_array() || v.size() != 3 || !v[0].is_number() || !v[1].is_number() ||
        !v[2].is_number()) {
      return absl::InvalidArgumentError(
          absl::StrCat("preprocess.json: \"", key, "\" must be a list of 3 numbers"));
    }
    auto& dst = std::string(key) == "mean" ? spec.mean : spec.std;
    for (int c = 0; c < 3; ++c) dst[c] = v[c].get<float>();
  }
  for (float s : spec.std) {
    if (!(s > 0)) return absl::InvalidArgumentError("preprocess.json: \"std\" must be positive");
  }
  if (j.contains("resize_mode")) {
    const auto& v = j["resize_mode"];
    if (!v.is_string() || (v != "tensor" && v != "pil")) {
      return absl::InvalidArgumentError(
          "preprocess.json: \"resize_mode\" must be \"tensor\" or \"pil\"");
    }
    spec.resize_mode =
        v == "pil" ? PreprocessSpec::ResizeMode::kPil : PreprocessSpec::ResizeMode::kTensor;
  }
  if (j.contains("interpolation")) {
    const auto& v = j["interpolation"];
    if (!v.is_string() || (v != "bilinear" && v != "bicubic")) {
      return absl::InvalidArgumentError(
          "preprocess.json: \"interpolation\" must be \"bilinear\" or \"bicubic\"");
    }
    spec.interpolation = v == "bicubic" ? PreprocessSpec::Interpolation::kBicubic
                                        : PreprocessSpec::Interpolation::kBilinear;
  }
  return spec;
}

absl::StatusOr<at::Tensor> ToRgb(const at::Tensor& hwc) {
  if (hwc.dim() != 3 || hwc.scalar_type() != at::kByte) {
    return absl::InvalidArgumentError("image tensor must be uint8 H×W×C");
  }
  switch (hwc.size(2)) {
    case 3:
      return hwc;
    case 1:
      return hwc.expand({hwc.size(0), hwc.size(1), 3});
    case 4:
      return hwc.slice(2, 0, 3);
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("image tensor has ", hwc.size(2), " channels; expected 1, 3 or 4"));
  }
}

// ToTensor then Normalize, in torchvision's order of operations, on the
// input's device.
at::Tensor Normalize(const at::Tensor& chw, const PreprocessSpec& spec) {
  at::Tensor x = chw.to(at::kFloat).div(255);
  const auto on = at::TensorOptions().device(chw.device());
  const auto mean = at::tensor({spec.mean[0], spec.mean[1], spec.mean[2]}, on).view({3, 1, 1});
  const auto std = at::tensor({spec.std[0], spec.std[1], spec.std[2]}, on).view({3, 1, 1});
  return x.sub(mean).div(std).contiguous();
}

at::Tensor PreprocessAugmented(const at::Tensor& hwc_rgb, const PreprocessSpec& spec,
                               const std::function<double()>& random) {
  at::Tensor chw = hwc_rgb.permute({2, 0, 1});
  const int64_t h = chw.size(1), w = chw.size(2);
  const double area = static_cast<double>(h * w);
  int64_t top = 0, left = 0, ch = h, cw = w;
  bool found = false;
  for (int attempt = 0; attempt < 10 && !found; ++attempt) {
    const double target = area * (0.08 + random() * (1 - 0.08));
    const double ratio =
        std::exp(std::log(3.0 / 4) + random() * (std::log(4.0 / 3) - std::log(3.0 / 4)));
    const auto cw_try = static_cast<int64_t>(std::round(std::sqrt(target * ratio)));
    const auto ch_try = static_cast<int64_t>(std::round(std::sqrt(target / ratio)));
    if (cw_try > 0 && ch_try > 0 && cw_try <= w && ch_try <= h) {
      ch = ch_try;
      cw = cw_try;
      top = static_cast<int64_t>(random() * (h - ch + 1));
      left = static_cast<int64_t>(random() * (w - cw + 1));
      found = true;
    }
  }
  if (!found) {  // torchvision's fallback: the whole image, clamped to the ratio range
    const double r = static_cast<double>(w) / h;
    if (r < 3.0 / 4) {
      cw = w;
      ch = static_cast<int64_t>(std::round(w / (3.0 / 4)));
    } else if (r > 4.0 / 3) {
      ch = h;
      cw = static_cast<int64_t>(std::round(h * (4.0 / 3)));
    }
    ch = std::min(ch, h);
    cw = std::min(cw, w);
    top = (h - ch) / 2;
    left = (w - cw) / 2;
  }
  at::Tensor crop =
      Resize(chw.slice(1, top, top + ch).slice(2, left, left + cw), spec.crop, spec.crop, spec);
  if (random() < 0.5) crop = crop.flip({2});
  return Normalize(crop, spec);
}

absl::Status CheckPreprocessBudget(int64_t height, int64_t width, const PreprocessSpec& spec,
                                   int64_t max_pixels) {
  if (height < 1 || width < 1) {
    return absl::InvalidArgumentError(absl::StrCat("image is ", width, "x", height, ": empty"));
  }
  if (height > max_pixels / width) {
    return absl::InvalidArgumentError(absl::StrCat("image is ", width, "x", height,
                                                   " pixels, over the limit of ", max_pixels,
                                                   " (--max_image_pixels)"));
  }
  if (spec.resize > 0) {
    // In double: size × long side overflows int64 for absurd ratios.
    const double short_side = static_cast<double>(std::min(height, width));
    const double long_side = static_cast<double>(std::max(height, width));
    const double resized =
        static_cast<double>(spec.resize) * std::floor(spec.resize * long_side / short_side);
    if (resized > static_cast<double>(max_pixels)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "image is %dx%d; resizing its short side to %d would make it %.0f pixels, over the "
          "limit of %d (--max_image_pixels): its aspect ratio is too extreme",
          width, height, spec.resize, resized, max_pixels));
    }
    // On a small backbone (short side to 36) a 1×30,000 image would still fit
    // the pixel limit, as 36×1,080,000 — a gigabyte of floats for one crop.
    if (long_side > kMaxAspectRatio * short_side) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "image is %dx%d: its aspect ratio is over %d:1, too extreme to resize and crop", width,
          height, kMaxAspectRatio));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> PreprocessUint8(const at::Tensor& hwc_rgb, const PreprocessSpec& spec,
                                           int64_t max_pixels) {
  if (absl::Status s = CheckPreprocessBudget(hwc_rgb.size(0), hwc_rgb.size(1), spec, max_pixels);
      !s.ok()) {
    return s;
  }
  at::Tensor chw = hwc_rgb.permute({2, 0, 1});
  if (spec.resize > 0) chw = ResizeShortSide(chw, spec.resize, spec);
  return CenterCrop(chw, spec.crop).contiguous();
}

absl::StatusOr<at::Tensor> Preprocess(const at::Tensor& hwc_rgb, const PreprocessSpec& spec,
                                      int64_t max_pixels) {
  auto chw = PreprocessUint8(hwc_rgb, spec, max_pixels);
  if (!chw.ok()) return chw.status();
  return Normalize(*chw, spec);
}

absl::StatusOr<at::Tensor> DecodeAndPreprocessUint8(absl::string_view encoded,
                                                    const PreprocessSpec& spec,
                                                    int64_t max_pixels) {
  auto rgb = DecodeImage(encoded, max_pixels);
  if (!rgb.ok()) return rgb.status();
  return PreprocessUint8(*rgb, spec, max_pixels);
}

absl::StatusOr<at::Tensor> DecodeAndPreprocess(absl::string_view encoded,
                                               const PreprocessSpec& spec, int64_t max_pixels) {
  auto rgb = DecodeImage(encoded, max_pixels);
  if (!rgb.ok()) return rgb.status();
  return Preprocess(*rgb, spec, max_pixels);
}

}  // namespace tlserve
