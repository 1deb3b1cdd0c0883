// The Open Inference Protocol's tensors <-> tlserve's images and results:
// which input names and data types tlserve takes, how `contents` and
// `raw_input_contents` become ImageInputs, parameters, and output tensors.
// Validation at the edge: every error is INVALID_ARGUMENT naming the input
// or parameter and what tlserve expected.
#ifndef TLSERVE_SERVER_API_OIP_CONVERT_H_
#define TLSERVE_SERVER_API_OIP_CONVERT_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "inference/open_inference.pb.h"
#include "server/core/embedder.h"

namespace tlserve {

// The backbone's name as an OIP model (model names start with a letter or a
// digit, so no model of a tenant can take it).
inline constexpr char kOipBackboneModel[] = "_backbone";

// The three inputs a model (and the backbone) takes; a request sends one.
inline constexpr char kOipImagesInput[] = "images";  // BYTES [N] or [N, 1]: JPEG/PNG files
inline constexpr char kOipPixelsInput[] = "pixels";  // UINT8 [N, H, W, C], C in {1, 3, 4}
inline constexpr char kOipTensorInput[] = "tensor";  // FP32 [N, 3, H, W], preprocessed

// Describes the three inputs for ModelMetadata.
void AddOipInputs(inference::ModelMetadataResponse* out);

// A request's images. The views point into the request or into `storage`
// (numbers sent in `contents`, converted): both must outlive the images.
struct OipImages {
  std::shared_ptr<std::vector<ImageInput>> images;
  std::shared_ptr<const std::string> storage;
  bool raw = false;  // sent in raw_input_contents: answer in raw_output_contents
};
absl::StatusOr<OipImages> ParseOipImages(const inference::ModelInferRequest& request,
                                         int max_images);

// BYTES elements in raw form: each preceded by its length, 4 bytes little-endian.
absl::StatusOr<std::vector<absl::string_view>> SplitOipBytes(absl::string_view raw, int64_t count);
std::string JoinOipBytes(const std::vector<std::string>& items);

// A parameter of the request, or of the named requested output; `fallback`
// when neither has it. INVALID_ARGUMENT for another value type.
using OipParameters = google::protobuf::Map<std::string, inference::InferParameter>;
absl::StatusOr<int64_t> OipInt(const OipParameters& params, const std::string& name,
                               int64_t fallback);
absl::StatusOr<std::string> OipString(const OipParameters& params, const std::string& name,
                                      const std::string& fallback);
absl::StatusOr<bool> OipBool(const OipParameters& params, const std::string& name, bool fallback);
// Any parameter not in `known` is INVALID_ARGUMENT (a typo must not be ignored).
absl::Status CheckOipParameters(const OipParameters& params, const std::vector<std::string>& known,
                                const std::string& where);

// The outputs the request names (all of `available` when it names none);
// INVALID_ARGUMENT for an unknown or repeated name.
absl::StatusOr<std::vector<std::string>> RequestedOipOutputs(
    const inference::ModelInferRequest& request, const std::vector<std::string>& available);

// Appends an output tensor, in `contents` or in raw_output_contents.
void AddOipFp32(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v,
                bool raw, inference::ModelInferResponse* out);
void AddOipBytes(const std::string& name, std::vector<int64_t> shape,
                 const std::vector<std::string>& v, bool raw, inference::ModelInferResponse* out);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_OIP_CONVERT_H_
