// One StreamClassify call (see ImageStreamReactor): the first message names
// the model; the version it resolves to serves the whole stream.
#ifndef TLSERVE_SERVER_API_STREAM_CLASSIFY_REACTOR_H_
#define TLSERVE_SERVER_API_STREAM_CLASSIFY_REACTOR_H_

#include <memory>

#include "server/api/image_stream_reactor.h"
#include "server/core/embedder.h"
#include "server/core/models.h"
#include "tlserve/v1/models.grpc.pb.h"

namespace tlserve {

class StreamClassifyReactor final
    : public ImageStreamReactor<v1::StreamClassifyRequest, v1::StreamClassifyResponse> {
 public:
  StreamClassifyReactor(grpc::CallbackServerContext* context, ModelRegistry* models,
                        Embedder* embedder, Metrics* metrics, int max_images_per_message);

 private:
  absl::Status Begin(const v1::StreamClassifyRequest& first) override;
  void Start(Slot* slot, int64_t first_index) override;

  ModelRegistry* const models_;
  Embedder* const embedder_;
  std::shared_ptr<const ServableVersion> version_;  // set by Begin
  int top_k_ = 5;
};

// The k most probable labels of one image's probabilities.
void TopK(const ServableVersion& version, const at::Tensor& probabilities, int k,
          v1::Classification* out);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_STREAM_CLASSIFY_REACTOR_H_
