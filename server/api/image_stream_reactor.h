// The shared machinery of the bidirectional image streams (StreamEmbed,
// StreamClassify): reads messages of images, hands each message's images to
// the subclass while reading on (at most kWindow messages in flight, so a
// fast client cannot queue unbounded work), and writes one response per
// message, in order. A bad image becomes an error entry in its response;
// only what the subclass rejects in a message (bad options, too many images)
// ends the stream with an error.
//
// Owns itself: deleted in OnDone, which gRPC calls after Finish, and Finish
// is only called once no image is in flight.
#ifndef TLSERVE_SERVER_API_IMAGE_STREAM_REACTOR_H_
#define TLSERVE_SERVER_API_IMAGE_STREAM_REACTOR_H_

#include <grpcpp/server_context.h>
#include <grpcpp/support/server_callback.h>

#include <deque>
#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "server/api/rpc_timer.h"
#include "server/api/security.h"
#include "server/api/status_util.h"
#include "server/core/contain.h"
#include "server/core/metrics.h"

namespace tlserve {

template <typename Request, typename Response>
class ImageStreamReactor : public grpc::ServerBidiReactor<Request, Response> {
 public:
  static constexpr int kWindow = 4;

  void OnReadDone(bool ok) override {
    absl::Status dispatched;
    // Contained: an exception here would leave the stream hanging (gRPC
    // swallows what a reactor callback throws).
    if (ok) {
      dispatched = Contain(absl::StrCat(method_, " failed"),
                           [&]() -> absl::Status { return Dispatch(std::move(reading_)); });
    }
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      read_pending_ = false;
      if (!ok) reads_done_ = true;
      if (!dispatched.ok() && error_.ok()) error_ = dispatched;
      actions = NextActionsLocked();
    }
    Run(actions);
  }
  void OnWriteDone(bool ok) override {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      slots_.pop_front();
      if (!ok && error_.ok()) error_ = absl::CancelledError("the client stopped receiving");
      actions = NextActionsLocked();
    }
    Run(actions);
  }
  void OnCancel() override {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      actions = NextActionsLocked();
    }
    Run(actions);
  }
  void OnDone() override { delete this; }

 protected:
  // One request message and its response, filled as its images finish.
  struct Slot {
    std::shared_ptr<Request> request;
    Response response;
    size_t remaining = 0;
    std::shared_ptr<const void> images_lease;  // the tenant's in-flight images
  };

  ImageStreamReactor(grpc::CallbackServerContext* context, Security* security, std::string method,
                     int max_images_per_message)
      : context_(context),
        security_(security),
        metrics_(security->metrics()),
        method_(std::move(method)),
        max_images_per_message_(max_images_per_message),
        timer_(metrics_, method_) {
    auto caller = security_->Admit(*context, &timer_);
    if (caller.ok()) {
      caller_ = *caller;
    } else {
      admitted_ = caller.status();
    }
  }
  virtual ~ImageStreamReactor() = default;

  // Subclasses call this last in their constructor.
  // A call that Security did not admit ends here, before reading.
  void StartReading() {
    if (!admitted_.ok()) {
      {
        absl::MutexLock lock(&mu_);
        finished_ = true;
      }
      timer_.Done(admitted_);
      this->Finish(ToGrpcStatus(admitted_));
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      read_pending_ = true;
    }
    StartNextRead();
  }
  const Caller& caller() const { return caller_; }
  // Reads the stream's options from its first message; an error ends it.
  virtual absl::Status Begin(const Request& first) = 0;
  // Starts the images of `slot` (numbered from `first_index` in the whole
  // stream); each finished image must call ImageDone(slot) exactly once,
  // after filling its entry of slot->response.
  virtual void Start(Slot* slot, int64_t first_index) = 0;

  void ImageDone(Slot* slot) {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      if (--slot->remaining > 0) return;
      actions = NextActionsLocked();
    }
    Run(actions);
  }
  // Ends the stream with `error` once the messages in flight are done (for
  // a failure found after Begin, on another thread).
  void Fail(const absl::Status& error) {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      if (error_.ok()) error_ = error;
      actions = NextActionsLocked();
    }
    Run(actions);
  }
  // Work outside the slots that must end before the stream does (a version
  // being read): Hold before starting it, Release when it is over.
  void Hold() {
    absl::MutexLock lock(&mu_);
    ++holds_;
  }
  void Release() {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      --holds_;
      actions = NextActionsLocked();
    }
    Run(actions);
  }
  // For work that must be dropped when the client has gone.
  bool Cancelled() const { return context_->IsCancelled(); }
  grpc::CallbackServerContext* context() const { return context_; }

 private:
  // What to do once the lock is released (gRPC calls are made unlocked).
  struct Actions {
    const Response* write = nullptr;
    bool read = false;
    std::optional<absl::Status> finish;
  };

  void StartNextRead() {
    reading_ = std::make_shared<Request>();
    this->StartRead(reading_.get());
  }

  absl::Status Dispatch(std::shared_ptr<Request> request) {
    if (!begun_) {
      begun_ = true;
      if (absl::Status s = Begin(*request); !s.ok()) return s;
    }
    const int n = request->images_size();
    if (n == 0) return absl::OkStatus();
    if (n > max_images_per_message_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "a ", method_, " message has ", n, " images, over the limit of ", max_images_per_message_,
          " per message (--max_images_per_request); send smaller messages"));
    }
    auto lease = security_->AdmitImages(caller_, n);
    if (!lease.ok()) return lease.status();
    metrics_->AddImages(method_, n);
    const int64_t first = next_index_;
    next_index_ += n;
    auto slot = std::make_unique<Slot>();
    Slot* s = slot.get();
    s->request = std::move(request);
    s->remaining = static_cast<size_t>(n);
    s->images_lease = std::move(*lease);
    {
      absl::MutexLock lock(&mu_);
      slots_.push_back(std::move(slot));
    }
    Start(s, first);
    return absl::OkStatus();
  }

  Actions NextActionsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Actions a;
    if (finished_) return a;
    const bool cancelled = context_->IsCancelled();
    if (!writing_ && !slots_.empty() && slots_.front()->remaining == 0 && error_.ok() &&
        !cancelled) {
      writing_ = true;
      a.write = &slots_.front()->response;
    }
    // Drop results nobody can receive any more.
    if (!writing_ && (!error_.ok() || cancelled)) {
      while (!slots_.empty() && slots_.front()->remaining == 0) slots_.pop_front();
    }
    const bool stop_reading = reads_done_ || !error_.ok() || cancelled;
    if (!stop_reading && !read_pending_ && slots_.size() < kWindow) {
      read_pending_ = true;
      a.read = true;
    }
    if (stop_reading && slots_.empty() && !writing_ && holds_ == 0) {
      finished_ = true;
      a.finish = cancelled ? absl::CancelledError("the client cancelled the stream") : error_;
    }
    return a;
  }

  void Run(const Actions& a) {
    if (a.write != nullptr) this->StartWrite(a.write);
    if (a.read) StartNextRead();
    if (a.finish.has_value()) {
      const absl::Status s = caller_.Scrub(*a.finish);
      timer_.Done(s);
      this->Finish(ToGrpcStatus(s));
    }
  }

  grpc::CallbackServerContext* const context_;
  Security* const security_;
  Metrics* const metrics_;
  Caller caller_;
  absl::Status admitted_;
  const std::string method_;
  const int max_images_per_message_;
  RpcTimer timer_;
  std::shared_ptr<Request> reading_;
  // Touched only by OnReadDone, which gRPC serialises.
  bool begun_ = false;
  int64_t next_index_ = 0;

  absl::Mutex mu_;
  std::deque<std::unique_ptr<Slot>> slots_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool read_pending_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  int holds_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status error_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_IMAGE_STREAM_REACTOR_H_
