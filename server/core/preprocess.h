// How an image becomes the backbone's input, matching torchvision's canonical
// pipeline on uint8 images: antialiased bilinear resize of the short side
// (rounded back to uint8, as torchvision does for uint8 tensors), centre
// crop, /255, normalise with mean and std. Stateless and thread-safe.
#ifndef TLSERVE_SERVER_CORE_PREPROCESS_H_
#define TLSERVE_SERVER_CORE_PREPROCESS_H_

#include <ATen/core/Tensor.h>

#include <array>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tlserve {

// The TorchScript extra file `preprocess.json`; the defaults are ImageNet's.
struct PreprocessSpec {
  int resize = 256;  // short side; 0 keeps the size
  int crop = 224;
  std::array<float, 3> mean = {0.485f, 0.456f, 0.406f};
  std::array<float, 3> std = {0.229f, 0.224f, 0.225f};
  // How the resizes are done: as torchvision on uint8 tensors (antialiased,
  // rounded back to uint8: "tensor") or as its transforms on PIL images, by
  // Pillow's Image.resize ("pil", server/core/pil_resize.h).
  enum class ResizeMode { kTensor, kPil };
  ResizeMode resize_mode = ResizeMode::kTensor;
  enum class Interpolation { kBilinear, kBicubic };
  Interpolation interpolation = Interpolation::kBilinear;

  std::string ToJson() const;
};

// Parses {"resize": 256, "crop": 224, "mean": [3], "std": [3],
// "resize_mode": "tensor" | "pil", "interpolation": "bilinear" | "bicubic"};
// absent keys keep their defaults. INVALID_ARGUMENT says which key is wrong.
absl::StatusOr<PreprocessSpec> ParsePreprocessSpec(absl::string_view json);

// uint8 H×W×C (C = 1, 3 or 4) -> uint8 H×W×3: gray replicated, alpha dropped.
absl::StatusOr<at::Tensor> ToRgb(const at::Tensor& hwc);

// The pixel budget of preprocessing an H×W image: the decoded image and
// every resized intermediate must hold at most `max_pixels` pixels (a 1×30000
// image upscaled to a short side of 256 would be 256×7,680,000), and an image
// to be resized may not be longer than kMaxAspectRatio times its width.
// INVALID_ARGUMENT naming the limit when over; OK otherwise.
inline constexpr int kMaxAspectRatio = 50;
absl::Status CheckPreprocessBudget(int64_t height, int64_t width, const PreprocessSpec& spec,
                                   int64_t max_pixels);

// uint8 H×W×3 -> uint8 3×crop×crop: resized and cropped, not yet
// normalised (the device engine normalises whole batches on the device).
// Checks the budget first, before any memory is spent.
absl::StatusOr<at::Tensor> PreprocessUint8(const at::Tensor& hwc_rgb, const PreprocessSpec& spec,
                                           int64_t max_pixels);

// uint8 3×H×W (or N×3×H×W), on any device -> float32, /255 then mean/std:
// torchvision's ToTensor and Normalize, in their order of operations.
at::Tensor Normalize(const at::Tensor& chw, const PreprocessSpec& spec);

// uint8 H×W×3 -> float32 3×crop×crop, normalised: PreprocessUint8, then
// Normalize.
absl::StatusOr<at::Tensor> Preprocess(const at::Tensor& hwc_rgb, const PreprocessSpec& spec,
                                      int64_t max_pixels);

// Training augmentation, as torchvision's RandomResizedCrop(crop) (scale
// 0.08-1, aspect ratio 3/4-4/3, 10 tries, else a centre crop) and
// RandomHorizontalFlip, then normalisation. `random` gives uniforms in [0, 1).
// Its intermediates are never larger than the input or crop×crop.
at::Tensor PreprocessAugmented(const at::Tensor& hwc_rgb, const PreprocessSpec& spec,
                               const std::function<double()>& random);

// DecodeImage, then PreprocessUint8, under one pixel budget.
absl::StatusOr<at::Tensor> DecodeAndPreprocessUint8(absl::string_view encoded,
                                                    const PreprocessSpec& spec, int64_t max_pixels);

// DecodeImage, then Preprocess, under one pixel budget.
absl::StatusOr<at::Tensor> DecodeAndPreprocess(absl::string_view encoded,
                                               const PreprocessSpec& spec, int64_t max_pixels);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_PREPROCESS_H_
