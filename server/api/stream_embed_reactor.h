// One StreamEmbed call: reads image batches, embeds each through the
// Embedder while reading on (at most kWindow messages in flight, so a fast
// client cannot queue unbounded work), and writes one response per message
// in order. A bad image becomes an error entry in its response; only bad
// options or an oversized message end the stream with an error.
//
// Owns itself: deleted in OnDone, which gRPC calls after Finish, and Finish
// is only called once no image is in flight.
#ifndef TLSERVE_SERVER_API_STREAM_EMBED_REACTOR_H_
#define TLSERVE_SERVER_API_STREAM_EMBED_REACTOR_H_

#include <deque>
#include <memory>
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "server/api/rpc_timer.h"
#include "server/core/embedder.h"
#include "server/core/metrics.h"
#include "tlserve/v1/inference.grpc.pb.h"

namespace tlserve {

class StreamEmbedReactor final
    : public grpc::ServerBidiReactor<v1::StreamEmbedRequest, v1::StreamEmbedResponse> {
 public:
  static constexpr int kWindow = 4;

  StreamEmbedReactor(grpc::CallbackServerContext* context, Embedder* embedder, Metrics* metrics,
                     int max_images_per_message);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  // One request message and its response, filled as images finish.
  struct Slot {
    std::shared_ptr<v1::StreamEmbedRequest> request;
    v1::StreamEmbedResponse response;
    size_t remaining = 0;
  };
  // What to do once the lock is released (gRPC calls are made unlocked).
  struct Actions {
    const v1::StreamEmbedResponse* write = nullptr;
    bool read = false;
    std::optional<absl::Status> finish;
  };

  void StartNextRead();
  absl::Status Dispatch(std::shared_ptr<v1::StreamEmbedRequest> request);
  void OnImage(Slot* slot, size_t i, absl::StatusOr<at::Tensor> v);
  Actions NextActionsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Run(const Actions& a);

  grpc::CallbackServerContext* const context_;
  Embedder* const embedder_;
  Metrics* const metrics_;
  const int max_images_per_message_;
  RpcTimer timer_;
  std::shared_ptr<v1::StreamEmbedRequest> reading_;
  // Set by the first message; touched only by OnReadDone, which gRPC serialises.
  std::optional<EmbedSpec> spec_;
  int64_t next_index_ = 0;

  absl::Mutex mu_;
  std::deque<std::unique_ptr<Slot>> slots_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool read_pending_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status error_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_STREAM_EMBED_REACTOR_H_
