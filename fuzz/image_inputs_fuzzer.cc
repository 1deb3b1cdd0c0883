// Fuzzes the edge of the Inference and Model services: bytes from the wire
// parsed as a ClassifyRequest and as an EmbedRequest, their images turned into
// ImageInputs by ToImageInputs, and each encoded one decoded and preprocessed
// as the embedder's workers do. A conversion must keep every image, in order,
// as a view into the request; errors are INVALID_ARGUMENT. The same bytes as
// an Open Inference Protocol ModelInferRequest go through ParseOipImages:
// shape[0] images, each a view of the request or of the converted storage,
// of the size its shape says; errors are INVALID_ARGUMENT.
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "fuzz/fuzz_util.h"
#include "inference/open_inference.pb.h"
#include "server/api/convert.h"
#include "server/api/oip_convert.h"
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

// Whether `view` lies inside `whole`.
bool Within(absl::string_view view, absl::string_view whole) {
  return view.data() >= whole.data() && view.data() + view.size() <= whole.data() + whole.size();
}

void CheckOip(const inference::ModelInferRequest& request) {
  auto parsed = tlserve::ParseOipImages(request, 64);
  if (!parsed.ok()) {
    TLSERVE_FUZZ_CHECK(parsed.status().code() == absl::StatusCode::kInvalidArgument, "status %s",
                       parsed.status().ToString().c_str());
    return;
  }
  const auto& in = request.inputs(0);
  TLSERVE_FUZZ_CHECK(
      in.shape_size() >= 1 && static_cast<int64_t>(parsed->images->size()) == in.shape(0),
      "%zu images for shape[0]", parsed->images->size());
  TLSERVE_FUZZ_CHECK(parsed->raw == (request.raw_input_contents_size() == 1), "raw flag");
  for (size_t i = 0; i < parsed->images->size(); ++i) {
    const tlserve::ImageInput& image = (*parsed->images)[i];
    TLSERVE_FUZZ_CHECK(image.index == static_cast<int64_t>(i), "index at %zu", i);
    bool inside = false;
    if (parsed->raw) inside = Within(image.data, request.raw_input_contents(0));
    if (parsed->storage) inside = inside || Within(image.data, *parsed->storage);
    for (const std::string& b : in.contents().bytes_contents()) {
      inside = inside || (image.data.data() == b.data() && image.data.size() == b.size());
    }
    TLSERVE_FUZZ_CHECK(inside, "image %zu is not a view of the request or its storage", i);
    if (image.kind != tlserve::ImageInput::Kind::kEncoded) {
      int64_t want = image.kind == tlserve::ImageInput::Kind::kFloatChw ? 4 : 1;
      for (int64_t d : image.shape) want *= d;
      TLSERVE_FUZZ_CHECK(static_cast<int64_t>(image.data.size()) == want, "image %zu has %zu bytes",
                         i, image.data.size());
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
  inference::ModelInferRequest infer;
  if (infer.ParseFromArray(data, static_cast<int>(size))) CheckOip(infer);
  return 0;
}
