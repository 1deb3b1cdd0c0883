// Fuzzes what a client's encoded image goes through before the device sees
// it: DecodeAndPreprocess (header checks, JPEG/PNG decoding, RGB conversion,
// resize, crop, normalisation) under a small pixel budget. An accepted image
// must come out as a finite float 3×crop×crop tensor; a rejected one as
// INVALID_ARGUMENT. Crashes, sanitizer reports and broken invariants are
// findings.
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "fuzz/fuzz_util.h"
#include "server/core/preprocess.h"

namespace {

// Small enough that one input costs little memory, large enough for the
// resize and crop paths (a 1×4096 image upscaled to short side 256 is over).
constexpr int64_t kMaxPixels = int64_t{1} << 20;

tlserve::PreprocessSpec SpecFor(size_t size) {
  // Chosen by the input's length so that plain image files are valid seeds.
  tlserve::PreprocessSpec spec;
  switch (size % 3) {
    case 0:  // ImageNet's defaults: 256 -> 224
      break;
    case 1:  // a small backbone's: 32 -> 32 (as the default backbone)
      spec.resize = 32;
      spec.crop = 32;
      break;
    default:  // no resize: the crop may be larger than the image
      spec.resize = 0;
      spec.crop = 64;
      break;
  }
  return spec;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tlserve::fuzz::InitTorch();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const tlserve::PreprocessSpec spec = SpecFor(size);
  absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto out = tlserve::DecodeAndPreprocess(bytes, spec, kMaxPixels);
  if (!out.ok()) {
    TLSERVE_FUZZ_CHECK(out.status().code() == absl::StatusCode::kInvalidArgument, "status %s",
                       out.status().ToString().c_str());
    return 0;
  }
  const at::Tensor& t = *out;
  TLSERVE_FUZZ_CHECK(t.scalar_type() == at::kFloat && t.dim() == 3 && t.size(0) == 3 &&
                         t.size(1) == spec.crop && t.size(2) == spec.crop,
                     "shape %s", c10::str(t.sizes()).c_str());
  TLSERVE_FUZZ_CHECK(at::isfinite(t).all().item<bool>(), "non-finite values");
  return 0;
}
