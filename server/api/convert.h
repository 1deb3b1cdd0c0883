// Proto <-> core types for the Inference service, with the validation of
// shapes that belongs at the edge (field names in messages).
#ifndef TLSERVE_SERVER_API_CONVERT_H_
#define TLSERVE_SERVER_API_CONVERT_H_

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "google/protobuf/repeated_field.h"
#include "server/core/backbone.h"
#include "server/core/embedder.h"
#include "tlserve/v1/inference.pb.h"

namespace tlserve {

// Views into `images` (which must outlive the result); `first_index` numbers
// them within a stream. INVALID_ARGUMENT for an image without data.
absl::StatusOr<std::shared_ptr<std::vector<ImageInput>>> ToImageInputs(
    const google::protobuf::RepeatedPtrField<v1::Image>& images, int64_t first_index);

Pool FromProto(v1::Pool pool);

void ToProto(const Backbone& backbone, const BackboneSummary& summary,
             v1::DescribeBackboneResponse* out);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_CONVERT_H_
