// Resizing as Pillow's Image.resize does it for 8-bit images (modes "L" and
// "RGB"): a separable convolution, horizontal pass first, each pass rounded
// back to 8 bits, with the filter's coefficients normalised to sum to one and
// then held in fixed point (22 fractional bits), as in Pillow's
// libImaging/Resample.c. Downscaling widens the filter by the scale (the
// antialiasing Pillow always does). What torchvision's transforms give a
// model trained on PIL images, byte for byte (tests/core/pil_resize_test.cc
// compares with Pillow over a corpus of sizes). Stateless and thread-safe.
#ifndef TLSERVE_SERVER_CORE_PIL_RESIZE_H_
#define TLSERVE_SERVER_CORE_PIL_RESIZE_H_

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace tlserve {

// Pillow's Image.BILINEAR (support 1) and Image.BICUBIC (support 2, a = -0.5):
// torchvision's InterpolationMode.BILINEAR and BICUBIC on PIL images.
enum class PilFilter { kBilinear, kBicubic };

// uint8 H×W×C (any C; contiguous or not) -> uint8 out_h×out_w×C.
// out_h, out_w >= 1.
at::Tensor PilResize(const at::Tensor& hwc, int64_t out_h, int64_t out_w, PilFilter filter);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_PIL_RESIZE_H_
