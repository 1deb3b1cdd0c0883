// Decodes encoded images (JPEG through libjpeg-turbo's TurboJPEG, PNG through
// libpng) into uint8 H×W×3 RGB tensors, the way PIL's `Image.convert("RGB")`
// does: gray is replicated, alpha is dropped, 16-bit PNG samples are scaled
// to 8 bits with rounding. Thread-safe (no shared state).
//
// Errors: INVALID_ARGUMENT for empty, corrupt, truncated or unsupported data
// and for images over `max_pixels` (checked from the header, before any
// pixel is decoded, so a decompression bomb costs nothing).
#ifndef TLSERVE_SERVER_CORE_IMAGE_DECODER_H_
#define TLSERVE_SERVER_CORE_IMAGE_DECODER_H_

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tlserve {

absl::StatusOr<at::Tensor> DecodeImage(absl::string_view bytes, int64_t max_pixels);

// Width × height from the header alone (no pixel decoded): what a request's
// images will cost, checked before any of them is decoded. INVALID_ARGUMENT
// for data that is not a JPEG or PNG header.
absl::StatusOr<int64_t> PeekImagePixels(absl::string_view bytes);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_IMAGE_DECODER_H_
