#include "client/lib/client.h"

#include <fcntl.h>
#include <grpcpp/create_channel.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "server/core/sha256.h"

namespace tlserve {

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const std::string& target,
                                                        absl::Duration timeout) {
  return Connect(target, ChannelSecurity(), timeout);
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const std::string& target,
                                                        const ChannelSecurity& security,
                                                        absl::Duration timeout) {
  return Connect(target, security, timeout, "");
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const std::string& target,
                                                        const ChannelSecurity& security,
                                                        absl::Duration timeout,
                                                        const std::string& lb_policy) {
  if (auto s = security.Validate(); !s.ok()) return s;
  if (!lb_policy.empty() && lb_policy != "pick_first" && lb_policy != "round_robin") {
    return absl::InvalidArgumentError(
        absl::StrCat("load-balancing policy \"", lb_policy, "\": use pick_first or round_robin"));
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(256 << 20);
  args.SetMaxSendMessageSize(256 << 20);
  if (!lb_policy.empty()) args.SetLoadBalancingPolicyName(lb_policy);
  auto channel = CreateChannel(target, security, args);
  if (!channel->WaitForConnected(absl::ToChronoTime(absl::Now() + timeout))) {
    // gRPC does not say why a channel failed to connect; a failed TLS
    // handshake looks like a server that is not there.
    return absl::UnavailableError(absl::StrCat(
        "no tlserve answers at ", target,
        security.tls ? " over TLS (is the server running? does its certificate chain to --tls_ca "
                       "and name this address? does it require a client certificate, "
                       "--tls_cert and --tls_key?)"
                     : " (is the server running? see --server; does it use TLS? see --tls_ca)"));
  }
  return std::unique_ptr<Client>(new Client(std::move(channel)));
}

Client::Client(std::shared_ptr<grpc::Channel> channel)
    : channel_(std::move(channel)),
      inference_(v1::Inference::NewStub(channel_)),
      datasets_(v1::Datasets::NewStub(channel_)),
      models_(v1::Models::NewStub(channel_)),
      health_(grpc::health::v1::Health::NewStub(channel_)) {}

absl::StatusOr<std::string> Client::Health(const std::string& service) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse resp;
  if (auto s = FromGrpc(health_->Check(&ctx, req, &resp)); !s.ok()) return s;
  return grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status());
}

absl::StatusOr<v1::DescribeBackboneResponse> Client::DescribeBackbone(
    const std::vector<int64_t>& input_shape) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Minutes(5)));
  v1::DescribeBackboneRequest req;
  for (int64_t d : input_shape) req.add_input_shape(d);
  v1::DescribeBackboneResponse resp;
  if (auto s = FromGrpc(inference_->DescribeBackbone(&ctx, req, &resp)); !s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::EmbedResponse> Client::Embed(const v1::EmbedRequest& request,
                                                absl::Duration deadline) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
  v1::EmbedResponse resp;
  if (auto s = FromGrpc(inference_->Embed(&ctx, request, &resp)); !s.ok()) return s;
  return resp;
}

namespace {

// Writes `count` images, `per_message` to a message, the first message
// starting from `first` (its options); a reader thread hands each response's
// results to `result` while the writer goes on.
template <typename Request, typename Response, typename Result>
absl::Status StreamImages(grpc::ClientContext& ctx,
                          grpc::ClientReaderWriter<Request, Response>& stream, Request first,
                          size_t count, int per_message,
                          const std::function<absl::StatusOr<v1::Image>(size_t)>& image,
                          const std::function<void(const Result&)>& result) {
  std::thread reader([&] {
    Response resp;
    while (stream.Read(&resp)) {
      for (const auto& r : resp.results()) result(r);
    }
  });
  absl::Status load_error;
  Request req = std::move(first);
  bool wrote = false;
  for (size_t i = 0; i < count; ++i) {
    auto img = image(i);
    if (!img.ok()) {
      load_error = img.status();
      ctx.TryCancel();
      break;
    }
    *req.add_images() = std::move(*img);
    if (req.images_size() >= per_message || i + 1 == count) {
      if (!stream.Write(req)) break;
      wrote = true;
      req.Clear();
    }
  }
  if (!wrote && load_error.ok()) stream.Write(req);  // no images: still send the options
  stream.WritesDone();
  reader.join();
  absl::Status final = FromGrpc(stream.Finish());
  return load_error.ok() ? final : load_error;
}

}  // namespace

absl::Status Client::StreamEmbed(const v1::EmbedOptions& options, size_t count, int per_message,
                                 const std::function<absl::StatusOr<v1::Image>(size_t)>& image,
                                 const std::function<void(const v1::EmbedResult&)>& result) {
  grpc::ClientContext ctx;
  auto stream = inference_->StreamEmbed(&ctx);
  v1::StreamEmbedRequest first;
  *first.mutable_options() = options;
  return StreamImages(ctx, *stream, std::move(first), count, per_message, image, result);
}

absl::Status Client::StreamClassify(const std::string& model, int version, int top_k, size_t count,
                                    int per_message,
                                    const std::function<absl::StatusOr<v1::Image>(size_t)>& image,
                                    const std::function<void(const v1::ClassifyResult&)>& result) {
  grpc::ClientContext ctx;
  auto stream = models_->StreamClassify(&ctx);
  v1::StreamClassifyRequest first;
  first.set_model(model);
  first.set_version(version);
  first.set_top_k(top_k);
  return StreamImages(ctx, *stream, std::move(first), count, per_message, image, result);
}

absl::StatusOr<v1::UploadDatasetResponse> Client::UploadDataset(
    const std::string& dataset, bool strict, size_t count, int per_message,
    const std::function<absl::StatusOr<v1::Example>(size_t)>& example,
    const std::function<void(size_t)>& sent) {
  grpc::ClientContext ctx;
  v1::UploadDatasetResponse resp;
  auto stream = datasets_->UploadDataset(&ctx, &resp);
  v1::UploadDatasetRequest req;
  req.set_dataset(dataset);
  req.set_strict(strict);
  absl::Status load_error;
  for (size_t i = 0; i < count; ++i) {
    auto e = example(i);
    if (!e.ok()) {
      load_error = e.status();
      ctx.TryCancel();
      break;
    }
    *req.add_examples() = std::move(*e);
    if (req.examples_size() >= per_message || i + 1 == count) {
      // The last message commits the upload; without it the server stores nothing.
      req.set_commit(i + 1 == count);
      if (!stream->Write(req)) break;
      req.Clear();
      if (sent) sent(i + 1);
    }
  }
  if (count == 0 && load_error.ok()) {  // no examples: still name the dataset, and commit
    req.set_commit(true);
    stream->Write(req);
  }
  stream->WritesDone();
  absl::Status s = FromGrpc(stream->Finish());
  if (!load_error.ok()) return load_error;
  if (!s.ok()) return s;
  return resp;
}

absl::Status Client::WatchJob(const std::string& id, grpc::ClientContext* ctx,
                              const std::function<void(const v1::Job&)>& update) {
  v1::WatchJobRequest req;
  req.set_id(id);
  auto reader = models_->WatchJob(ctx, req);
  v1::Job job;
  while (reader->Read(&job)) update(job);
  return FromGrpc(reader->Finish());
}

namespace {

// Reads a stream of progress messages and returns the last one, which has
// the results (an analysis that ends with no message is an error).
template <typename Response>
absl::StatusOr<Response> LastMessage(grpc::ClientReader<Response>* reader,
                                     const std::function<void(int64_t, int64_t)>& progress) {
  Response message, last;
  bool any = false;
  while (reader->Read(&message)) {
    if (progress) progress(message.images_done(), message.images_total());
    last = std::move(message);
    any = true;
  }
  if (absl::Status s = FromGrpc(reader->Finish()); !s.ok()) return s;
  if (!any) return absl::InternalError("the server ended the call without a result");
  return last;
}

}  // namespace

absl::StatusOr<v1::EvaluateResponse> Client::Evaluate(
    const v1::EvaluateRequest& request, const std::function<void(int64_t, int64_t)>& progress) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Hours(2)));
  auto reader = models_->Evaluate(&ctx, request);
  return LastMessage(reader.get(), progress);
}

absl::StatusOr<v1::SuggestLabelsResponse> Client::SuggestLabels(
    const v1::SuggestLabelsRequest& request,
    const std::function<void(int64_t, int64_t)>& progress) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Hours(2)));
  auto reader = models_->SuggestLabels(&ctx, request);
  return LastMessage(reader.get(), progress);
}

absl::StatusOr<v1::ExportInfo> Client::ExportModel(
    const std::string& model, int version, const std::string& path,
    const std::function<void(int64_t, int64_t)>& progress) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Minutes(30)));
  v1::ExportModelRequest req;
  req.set_model(model);
  req.set_version(version);
  auto reader = models_->ExportModel(&ctx, req);
  v1::ExportModelResponse msg;
  if (!reader->Read(&msg)) {  // e.g. NOT_FOUND
    absl::Status s = FromGrpc(reader->Finish());
    return s.ok() ? absl::InternalError("the server ended the export without sending anything") : s;
  }
  const v1::ExportInfo info = msg.info();
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    ctx.TryCancel();
    reader->Finish();
    return absl::InvalidArgumentError(absl::StrCat("cannot write ", tmp, ": ", strerror(errno)));
  }
  int64_t received = 0;
  bool write_failed = false;
  Sha256 digest;  // of what arrives, as it arrives
  while (reader->Read(&msg)) {
    const std::string& chunk = msg.chunk();
    digest.Update(chunk);
    if (!write_failed &&
        ::write(fd, chunk.data(), chunk.size()) != static_cast<ssize_t>(chunk.size())) {
      write_failed = true;
      ctx.TryCancel();
    }
    received += static_cast<int64_t>(chunk.size());
    if (progress) progress(received, info.size_bytes());
  }
  absl::Status status = FromGrpc(reader->Finish());
  if (status.ok() && write_failed) {
    status = absl::InternalError(absl::StrCat("cannot write ", tmp, ": ", strerror(errno)));
  }
  if (status.ok() && ::fsync(fd) != 0) {
    status = absl::InternalError(absl::StrCat("cannot fsync ", tmp, ": ", strerror(errno)));
  }
  ::close(fd);
  if (status.ok()) {
    const std::string sha = digest.Hex();
    if (received != info.size_bytes() || sha != info.sha256()) {
      status = absl::DataLossError(absl::StrCat("received ", received, " bytes with sha256 ", sha,
                                                "; the server sent ", info.size_bytes(),
                                                " bytes with sha256 ", info.sha256()));
    }
  }
  if (status.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    status = absl::InternalError(
        absl::StrCat("cannot rename ", tmp, " to ", path, ": ", strerror(errno)));
  }
  if (!status.ok()) {
    ::unlink(tmp.c_str());
    return status;
  }
  return info;
}

absl::StatusOr<v1::ListDatasetsResponse> Client::ListDatasets() {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
  v1::ListDatasetsResponse resp;
  if (auto s = FromGrpc(datasets_->ListDatasets(&ctx, v1::ListDatasetsRequest(), &resp)); !s.ok()) {
    return s;
  }
  return resp;
}

absl::StatusOr<v1::Dataset> Client::GetDataset(const std::string& name) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
  v1::GetDatasetRequest req;
  req.set_name(name);
  v1::Dataset resp;
  if (auto s = FromGrpc(datasets_->GetDataset(&ctx, req, &resp)); !s.ok()) return s;
  return resp;
}

absl::Status Client::DeleteDataset(const std::string& name) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
  v1::DeleteDatasetRequest req;
  req.set_name(name);
  v1::DeleteDatasetResponse resp;
  return FromGrpc(datasets_->DeleteDataset(&ctx, req, &resp));
}

}  // namespace tlserve
