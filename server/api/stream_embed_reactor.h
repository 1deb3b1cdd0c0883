// One StreamEmbed call (see ImageStreamReactor): the first message's options
// say what to compute; each image's vector or error fills its response entry.
#ifndef TLSERVE_SERVER_API_STREAM_EMBED_REACTOR_H_
#define TLSERVE_SERVER_API_STREAM_EMBED_REACTOR_H_

#include <optional>

#include "server/api/image_stream_reactor.h"
#include "server/core/embedder.h"
#include "tlserve/v1/inference.grpc.pb.h"

namespace tlserve {

class StreamEmbedReactor final
    : public ImageStreamReactor<v1::StreamEmbedRequest, v1::StreamEmbedResponse> {
 public:
  StreamEmbedReactor(grpc::CallbackServerContext* context, Embedder* embedder, Security* security,
                     int max_images_per_message);

 private:
  absl::Status Begin(const v1::StreamEmbedRequest& first) override;
  void Start(Slot* slot, int64_t first_index) override;

  Embedder* const embedder_;
  std::optional<EmbedSpec> spec_;  // set by Begin
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_STREAM_EMBED_REACTOR_H_
