#include "server/api/inference_service.h"

#include <algorithm>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/api/contained_call.h"
#include "server/api/convert.h"
#include "server/api/rpc_timer.h"
#include "server/api/status_util.h"
#include "server/api/stream_embed_reactor.h"
#include "server/api/unary_image_call.h"

namespace tlserve {
namespace {

// Finishes a unary call and records it.
void Finish(grpc::ServerUnaryReactor* reactor, const RpcTimer& timer, const absl::Status& s) {
  timer.Done(s);
  reactor->Finish(ToGrpcStatus(s));
}

}  // namespace

grpc::ServerUnaryReactor* InferenceService::DescribeBackbone(
    grpc::CallbackServerContext* context, const v1::DescribeBackboneRequest* request,
    v1::DescribeBackboneResponse* response) {
  return ContainedAsyncUnary(
      context, security_, "DescribeBackbone", "",
      [&](grpc::ServerUnaryReactor* reactor, const RpcTimer& timer, const Caller&) -> absl::Status {
        std::vector<int64_t> shape(request->input_shape().begin(), request->input_shape().end());
        if (!shape.empty() && shape.size() != 3) {
          return absl::InvalidArgumentError(absl::StrCat(
              "input_shape has ", shape.size(), " values; give C, H, W (e.g. 3, 224, 224)"));
        }
        embedder_->Describe(shape, [this, reactor, response, timer](auto summary) {
          if (summary.ok()) ToProto(embedder_->backbone(), *summary, response);
          Finish(reactor, timer,
                 summary.ok()
                     ? absl::OkStatus()
                     : absl::Status(summary.status().code(),
                                    absl::StrCat("input_shape: ", summary.status().message())));
        });
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* InferenceService::Embed(grpc::CallbackServerContext* context,
                                                  const v1::EmbedRequest* request,
                                                  v1::EmbedResponse* response) {
  return ContainedAsyncUnary(
      context, security_, "Embed", "",
      [&](grpc::ServerUnaryReactor* reactor, const RpcTimer& held_timer,
          const Caller& caller) -> absl::Status {
        metrics_->AddImages("Embed", request->images_size());
        if (request->images_size() == 0) {
          return absl::InvalidArgumentError("images: the request has no images");
        }
        if (request->images_size() > limits_.max_images_per_request) {
          return absl::InvalidArgumentError(
              absl::StrCat("images: ", request->images_size(), " images, over the limit of ",
                           limits_.max_images_per_request,
                           " per request (--max_images_per_request); send them with StreamEmbed"));
        }
        const auto& opts = request->options();
        auto spec = embedder_->MakeSpec(opts.layer(), FromProto(opts.pool()), opts.normalize());
        if (!spec.ok()) {
          return absl::InvalidArgumentError(
              absl::StrCat("options.layer: ", spec.status().message()));
        }
        auto inputs = ToImageInputs(request->images(), 0);
        if (!inputs.ok()) return inputs.status();
        // The tenant's in-flight images, until the last image's callback goes.
        auto lease = security_->AdmitImages(caller, request->images_size());
        if (!lease.ok()) return lease.status();
        RpcTimer timer = held_timer;
        timer.Hold(*lease);
        for (int i = 0; i < request->images_size(); ++i) response->add_embeddings();
        // The context outlives every callback: the call finishes after the last.
        embedder_->Embed(
            *inputs, *spec, absl::FromChrono(context->deadline()),
            [context] { return context->IsCancelled(); },
            FinishAfterImages(reactor, timer, (*inputs)->size(),
                              [response](size_t i, const EngineResult& r) {
                                const at::Tensor& v = r.values;
                                const float* p = v.data_ptr<float>();
                                response->set_dim(v.size(0));
                                response->mutable_embeddings(static_cast<int>(i))
                                    ->mutable_values()
                                    ->Add(p, p + v.size(0));
                              }),
            caller.lane);
        return absl::OkStatus();
      });
}

grpc::ServerBidiReactor<v1::StreamEmbedRequest, v1::StreamEmbedResponse>*
InferenceService::StreamEmbed(grpc::CallbackServerContext* context) {
  return new StreamEmbedReactor(context, embedder_, security_, limits_.max_images_per_request);
}

}  // namespace tlserve
