// The boundary of every RPC handler: its body runs under Contain, so that an
// exception (a LibTorch error, bad_alloc, a bug) finishes *that* call with
// INTERNAL or RESOURCE_EXHAUSTED and a message — never UNIMPLEMENTED (what
// gRPC answers when a handler throws) and never a crash. The call is counted
// and timed by RpcTimer either way.
#ifndef TLSERVE_SERVER_API_CONTAINED_CALL_H_
#define TLSERVE_SERVER_API_CONTAINED_CALL_H_

#include <grpcpp/support/server_callback.h>

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "server/api/rpc_timer.h"
#include "server/api/status_util.h"
#include "server/core/contain.h"
#include "server/core/thread_pool.h"

namespace tlserve {

// A synchronous unary handler: `body()` returns the call's status (having
// filled the response when OK); the call finishes with it.
template <typename Body>
grpc::ServerUnaryReactor* ContainedUnary(grpc::CallbackServerContext* context, Metrics* metrics,
                                         const char* method, Body&& body) {
  RpcTimer timer(metrics, method);
  const absl::Status status =
      Contain(absl::StrCat(method, " failed"), [&]() -> absl::Status { return body(); });
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  timer.Done(status);
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

// An asynchronous unary handler: `start(timer)` either hands the call to
// work that finishes it later and returns OK, or returns the error to finish
// with now (also when it throws before handing the call on).
template <typename Start>
grpc::ServerUnaryReactor* ContainedAsyncUnary(grpc::CallbackServerContext* context,
                                              Metrics* metrics, const char* method, Start&& start) {
  RpcTimer timer(metrics, method);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Status status = Contain(absl::StrCat(method, " failed"),
                                      [&]() -> absl::Status { return start(reactor, timer); });
  if (!status.ok()) {
    timer.Done(status);
    reactor->Finish(ToGrpcStatus(status));
  }
  return reactor;
}

// A unary handler whose body writes to disk (or waits for a lock that a
// write holds): `body()` runs on `pool`, not on the gRPC thread, contained,
// and the call finishes from there. `body` must capture by value (the
// request and response pointers stay valid until the call finishes).
template <typename Body>
grpc::ServerUnaryReactor* ContainedOnWorker(grpc::CallbackServerContext* context, Metrics* metrics,
                                            const char* method, ThreadPool* pool, Body body) {
  return ContainedAsyncUnary(
      context, metrics, method,
      [&](grpc::ServerUnaryReactor* reactor, const RpcTimer& timer) -> absl::Status {
        pool->Schedule([reactor, timer, method, body = std::move(body)]() mutable {
          const absl::Status status =
              Contain(absl::StrCat(method, " failed"), [&]() -> absl::Status { return body(); });
          timer.Done(status);
          reactor->Finish(ToGrpcStatus(status));
        });
        return absl::OkStatus();
      });
}

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_CONTAINED_CALL_H_
