// Fuzzes the edge of the Inference and Model services: bytes from the wire
// parsed as a ClassifyRequest and as an EmbedRequest, their images turned into
// ImageInputs by ToImageInputs, and each encoded one decoded and preprocessed
// as the embedder's workers do. A conversion must keep every image, in order,
// as a view into the request; errors are INVALID_ARGUMENT.
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "fuzz/fuzz_util.h"
#include "server/api/convert.h"
#include "server/core/preprocess.h"
#include "tlserve/v1/inference.pb.h"
#include "tlserve/v1/models.pb.h"

namespace {

constexpr int64_t kMaxPixels = int64_t{1} << 20;

void CheckImages(const google::protobuf::RepeatedPtrField<tlserve::v1::Image>& images,
                 int64_t first_index) {
  auto inputs = tlserve::ToImageInputs(images, first_index);
  if (!inputs.ok()) {
    TLSERVE_FUZZ_CHECK(inputs.status().code() == absl::StatusCode::kInvalidArgument, "status %s",
                       inputs.status().ToString().c_str());
    return;
  }
  TLSERVE_FUZZ_CHECK(static_cast<int>((*inputs)->size()) == images.size(), "%zu inputs for %d",
                     (*inputs)->size(), images.size());
  tlserve::PreprocessSpec spec;
  spec.resize = 32;
  spec.crop = 32;
  for (int i = 0; i < images.size(); ++i) {
    const tlserve::ImageInput& in = (**inputs)[i];
    const tlserve::v1::Image& image = images[i];
    TLSERVE_FUZZ_CHECK(in.index == first_index + i, "index %ld at %d", static_cast<long>(in.index),
                       i);
    TLSERVE_FUZZ_CHECK(in.name == image.name(), "name at %d", i);
    if (in.kind == tlserve::ImageInput::Kind::kEncoded) {
      TLSERVE_FUZZ_CHECK(image.has_encoded() && in.data.data() == image.encoded().data() &&
                             in.data.size() == image.encoded().size(),
                         "encoded view at %d", i);
      auto t = tlserve::DecodeAndPreprocess(in.data, spec, kMaxPixels);
      TLSERVE_FUZZ_CHECK(t.ok() || t.status().code() == absl::StatusCode::kInvalidArgument,
                         "status %s", t.status().ToString().c_str());
    } else {
      TLSERVE_FUZZ_CHECK(image.has_tensor() && in.data.data() == image.tensor().data().data() &&
                             static_cast<int>(in.shape.size()) == image.tensor().shape_size(),
                         "tensor view at %d", i);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tlserve::fuzz::InitTorch();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tlserve::v1::ClassifyRequest classify;
  if (classify.ParseFromArray(data, static_cast<int>(size))) CheckImages(classify.images(), 0);
  tlserve::v1::EmbedRequest embed;
  // A stream numbers its images from the count already received.
  if (embed.ParseFromArray(data, static_cast<int>(size))) CheckImages(embed.images(), 1000);
  return 0;
}
