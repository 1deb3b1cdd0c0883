// The end of a unary call over many images (Embed, Classify): each image's
// result is written into the response as it arrives, and after the last one
// the call finishes with the error of the lowest-numbered failed image, or OK.
#ifndef TLSERVE_SERVER_API_UNARY_IMAGE_CALL_H_
#define TLSERVE_SERVER_API_UNARY_IMAGE_CALL_H_

#include <grpcpp/support/server_callback.h>

#include <cstdint>
#include <functional>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/api/rpc_timer.h"
#include "server/api/status_util.h"
#include "server/core/embedder.h"

namespace tlserve {

// `fill(i, result)` runs under a lock, once per successful image; `last`
// (may be empty) once after every image succeeded, before the call finishes,
// its status the call's (it assembles responses whose tensors hold all images).
inline Embedder::ImageDone FinishAfterImages(grpc::ServerUnaryReactor* reactor, RpcTimer timer,
                                             size_t images,
                                             std::function<void(size_t, const EngineResult&)> fill,
                                             std::function<absl::Status()> last = nullptr) {
  struct State {
    absl::Mutex mu;
    size_t remaining;
    size_t first_error = SIZE_MAX;
    absl::Status error;
  };
  auto state = std::make_shared<State>();
  state->remaining = images;
  return [state, reactor, timer, fill, last](size_t i, absl::StatusOr<EngineResult> result) {
    absl::MutexLock lock(&state->mu);
    if (result.ok()) {
      fill(i, *result);
    } else if (i < state->first_error) {
      state->first_error = i;
      state->error = result.status();
    }
    if (--state->remaining > 0) return;
    if (state->error.ok() && last) state->error = last();
    timer.Done(state->error);
    reactor->Finish(ToGrpcStatus(state->error));
  };
}

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_UNARY_IMAGE_CALL_H_
