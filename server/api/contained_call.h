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
#include "server/api/security.h"
#include "server/api/status_util.h"
#include "server/core/contain.h"
#include "server/core/thread_pool.h"

namespace tlserve {

// Every handler first admits its call (Security::Admit: the key, the
// role, the audit record); `object` is the name the request is about. Bodies
// get the Caller, whose tenant they qualify names with, and what they return
// is scrubbed of the caller's own tenant prefix (Caller::Scrub).

// A synchronous unary handler: `body(caller)` returns the call's status
// (having filled the response when OK); the call finishes with it.
template <typename Body>
grpc::ServerUnaryReactor* ContainedUnary(grpc::CallbackServerContext* context, Security* security,
                                         const char* method, const std::string& object,
                                         Body&& body) {
  RpcTimer timer(security->metrics(), method);
  auto caller = security->Admit(*context, &timer, object);
  const absl::Status status =
      caller.ok() ? caller->Scrub(Contain(absl::StrCat(method, " failed"),
                                          [&]() -> absl::Status { return body(*caller); }))
                  : caller.status();
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  timer.Done(status);
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

// An asynchronous unary handler: `start(reactor, timer, caller)` either hands
// the call to work that finishes it later and returns OK, or returns the
// error to finish with now (also when it throws before handing the call on).
template <typename Start>
grpc::ServerUnaryReactor* ContainedAsyncUnary(grpc::CallbackServerContext* context,
                                              Security* security, const char* method,
                                              const std::string& object, Start&& start) {
  RpcTimer timer(security->metrics(), method);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  auto caller = security->Admit(*context, &timer, object);
  const absl::Status status =
      caller.ok()
          ? caller->Scrub(Contain(absl::StrCat(method, " failed"),
                                  [&]() -> absl::Status { return start(reactor, timer, *caller); }))
          : caller.status();
  if (!status.ok()) {
    timer.Done(status);
    reactor->Finish(ToGrpcStatus(status));
  }
  return reactor;
}

// The rest of an asynchronous unary handler, run later on another thread
// (e.g. when the registry has a version loaded): `body()` runs contained, and
// when it fails (or throws) the call finishes with its status, scrubbed of
// the caller's own tenant. On OK, `body` has handed the call to work that
// finishes it.
// `what` ("Classify failed") heads the message of an exception.
template <typename Body>
void ContainedContinuation(grpc::ServerUnaryReactor* reactor, const RpcTimer& timer,
                           const Caller& caller, const char* what, Body&& body) {
  const absl::Status s = Contain(what, std::forward<Body>(body));
  if (s.ok()) return;
  const absl::Status scrubbed = caller.Scrub(s);
  timer.Done(scrubbed);
  reactor->Finish(ToGrpcStatus(scrubbed));
}

// A unary handler whose body writes to disk (or waits for a lock that a
// write holds): `body(caller)` runs on `pool`, not on the gRPC thread,
// contained, and the call finishes from there. `body` must capture by value
// (the request and response pointers stay valid until the call finishes).
template <typename Body>
grpc::ServerUnaryReactor* ContainedOnWorker(grpc::CallbackServerContext* context,
                                            Security* security, const char* method,
                                            const std::string& object, ThreadPool* pool,
                                            Body body) {
  return ContainedAsyncUnary(
      context, security, method, object,
      [&](grpc::ServerUnaryReactor* reactor, const RpcTimer& timer,
          const Caller& caller) -> absl::Status {
        // The caller's lane: one tenant's (or connection's) work waits for
        // its own, not for another's.
        pool->Schedule(
            caller.lane, [reactor, timer, method, caller, body = std::move(body)]() mutable {
              const absl::Status status = caller.Scrub(Contain(
                  absl::StrCat(method, " failed"), [&]() -> absl::Status { return body(caller); }));
              timer.Done(status);
              reactor->Finish(ToGrpcStatus(status));
            });
        return absl::OkStatus();
      });
}

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_CONTAINED_CALL_H_
