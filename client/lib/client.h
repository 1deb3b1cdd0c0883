// The client library of tlserve: a thin, synchronous wrapper over the gRPC
// stubs that tlctl, the tests and the benchmarks share. Errors come back as
// absl::Status with the server's code and message.
//
// Thread-safe: one Client may be used from many threads (gRPC channels are).
#ifndef TLSERVE_CLIENT_LIB_CLIENT_H_
#define TLSERVE_CLIENT_LIB_CLIENT_H_

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/lib/channel_security.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "tlserve/v1/datasets.grpc.pb.h"
#include "tlserve/v1/inference.grpc.pb.h"
#include "tlserve/v1/models.grpc.pb.h"

namespace tlserve {

// grpc::Status -> absl::Status (same canonical codes).
absl::Status FromGrpc(const grpc::Status& s);

class Client {
 public:
  // Connects to HOST:PORT, waiting up to `timeout` for the channel:
  // UNAVAILABLE naming the address if nothing answers (over TLS: also when
  // the handshake fails), INVALID_ARGUMENT as security.Validate().
  static absl::StatusOr<std::unique_ptr<Client>> Connect(
      const std::string& target, const ChannelSecurity& security,
      absl::Duration timeout = absl::Seconds(10));
  // The same with a load-balancing policy over the addresses `target`
  // resolves to: "" or "pick_first" (one connection: gRPC's default) or
  // "round_robin" (a connection to every address, calls spread over them:
  // for several replicas behind a headless Service,
  // dns:///tlserve-headless.NAMESPACE.svc:50051, or a list,
  // ipv4:10.0.0.1:50051,10.0.0.2:50051). INVALID_ARGUMENT for another policy.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const std::string& target,
                                                         const ChannelSecurity& security,
                                                         absl::Duration timeout,
                                                         const std::string& lb_policy);
  // Plaintext, no token.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(
      const std::string& target, absl::Duration timeout = absl::Seconds(10));

  // "SERVING", "NOT_SERVING", ... of the standard health service.
  absl::StatusOr<std::string> Health(const std::string& service = "");
  absl::StatusOr<v1::DescribeBackboneResponse> DescribeBackbone(
      const std::vector<int64_t>& input_shape = {});
  absl::StatusOr<v1::EmbedResponse> Embed(const v1::EmbedRequest& request,
                                          absl::Duration deadline = absl::Minutes(5));

  // Streams `count` images, `per_message` to a message; `image(i)` makes the
  // i-th (an error there stops the stream and is returned); `result` sees each
  // result in order as it arrives. Returns the stream's final status.
  absl::Status StreamEmbed(const v1::EmbedOptions& options, size_t count, int per_message,
                           const std::function<absl::StatusOr<v1::Image>(size_t)>& image,
                           const std::function<void(const v1::EmbedResult&)>& result);

  // As StreamEmbed, classifying with `model` (its served version when
  // `version` is 0; `top_k` 0 means 5).
  absl::Status StreamClassify(const std::string& model, int version, int top_k, size_t count,
                              int per_message,
                              const std::function<absl::StatusOr<v1::Image>(size_t)>& image,
                              const std::function<void(const v1::ClassifyResult&)>& result);

  // Uploads `count` examples, `per_message` to a message; `example(i)` makes
  // the i-th (an error there cancels the upload, nothing is stored, and it is
  // returned); `sent(n)` is called after each message.
  absl::StatusOr<v1::UploadDatasetResponse> UploadDataset(
      const std::string& dataset, bool strict, size_t count, int per_message,
      const std::function<absl::StatusOr<v1::Example>(size_t)>& example,
      const std::function<void(size_t)>& sent = nullptr);
  absl::StatusOr<v1::ListDatasetsResponse> ListDatasets();
  absl::StatusOr<v1::Dataset> GetDataset(const std::string& name);
  absl::Status DeleteDataset(const std::string& name);

  // Unary calls of the Models service: `method` is a pointer to the stub's
  // method, e.g. Call(&v1::Models::Stub::GetModel, request).
  template <typename Request, typename Response>
  absl::StatusOr<Response> Call(grpc::Status (v1::Models::Stub::*method)(grpc::ClientContext*,
                                                                         const Request&, Response*),
                                const Request& request,
                                absl::Duration deadline = absl::Minutes(5)) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
    Response response;
    if (auto s = FromGrpc((models_.get()->*method)(&ctx, request, &response)); !s.ok()) return s;
    return response;
  }

  // Streams the job's states to `update` until it ends (OK) or `ctx` is
  // cancelled (CANCELLED).
  absl::Status WatchJob(const std::string& id, grpc::ClientContext* ctx,
                        const std::function<void(const v1::Job&)>& update);

  // Downloads the model (its served version when `version` is 0) as a
  // TorchScript file at `path`: written to path.tmp, checked against the
  // size and SHA-256 the server announced (DATA_LOSS otherwise), fsync'd and
  // renamed. `progress(received, total)` after every chunk.
  absl::StatusOr<v1::ExportInfo> ExportModel(
      const std::string& model, int version, const std::string& path,
      const std::function<void(int64_t, int64_t)>& progress = nullptr);

  // Evaluate and SuggestLabels: `progress(done, total)` for each progress
  // message; the last message (the results) comes back.
  absl::StatusOr<v1::EvaluateResponse> Evaluate(
      const v1::EvaluateRequest& request,
      const std::function<void(int64_t, int64_t)>& progress = nullptr);
  absl::StatusOr<v1::SuggestLabelsResponse> SuggestLabels(
      const v1::SuggestLabelsRequest& request,
      const std::function<void(int64_t, int64_t)>& progress = nullptr);

  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }

 private:
  explicit Client(std::shared_ptr<grpc::Channel> channel);
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Inference::Stub> inference_;
  std::unique_ptr<v1::Datasets::Stub> datasets_;
  std::unique_ptr<v1::Models::Stub> models_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

}  // namespace tlserve

#endif  // TLSERVE_CLIENT_LIB_CLIENT_H_
