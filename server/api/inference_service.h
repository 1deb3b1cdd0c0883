// The tlserve.v1.Inference gRPC service on the callback API: validates and
// translates requests, hands the work to the Embedder and finishes each call
// from the thread that completes it. No RPC blocks a gRPC thread.
#ifndef TLSERVE_SERVER_API_INFERENCE_SERVICE_H_
#define TLSERVE_SERVER_API_INFERENCE_SERVICE_H_

#include "server/api/security.h"
#include "server/core/embedder.h"
#include "server/core/metrics.h"
#include "tlserve/v1/inference.grpc.pb.h"

namespace tlserve {

struct ApiLimits {
  int max_images_per_request = 256;
};

class InferenceService final : public v1::Inference::CallbackService {
 public:
  InferenceService(Embedder* embedder, Security* security, ApiLimits limits)
      : embedder_(embedder), security_(security), metrics_(security->metrics()), limits_(limits) {}

  grpc::ServerUnaryReactor* DescribeBackbone(grpc::CallbackServerContext* context,
                                             const v1::DescribeBackboneRequest* request,
                                             v1::DescribeBackboneResponse* response) override;
  grpc::ServerUnaryReactor* Embed(grpc::CallbackServerContext* context,
                                  const v1::EmbedRequest* request,
                                  v1::EmbedResponse* response) override;
  grpc::ServerBidiReactor<v1::StreamEmbedRequest, v1::StreamEmbedResponse>* StreamEmbed(
      grpc::CallbackServerContext* context) override;

 private:
  Embedder* embedder_;
  Security* security_;
  Metrics* metrics_;
  const ApiLimits limits_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_INFERENCE_SERVICE_H_
