// A server-streaming call that runs a long analysis of a dataset (Evaluate,
// SuggestLabels) on a thread of its own — it blocks on the device engine,
// which a gRPC thread must never do — and streams its progress: the latest
// progress is written whenever the previous write has completed (a slow
// client sees fewer updates, never a growing queue), then one last message
// with the result. At most `max_concurrent` analyses run at once in the
// server (RESOURCE_EXHAUSTED beyond, naming the flag); with tenants, one
// holds at most half of them. A client that goes away cancels the analysis
// between engine batches. Owns itself (deleted in OnDone).
#ifndef TLSERVE_SERVER_API_ANALYSIS_REACTOR_H_
#define TLSERVE_SERVER_API_ANALYSIS_REACTOR_H_

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "server/api/rpc_timer.h"
#include "server/api/security.h"
#include "server/api/status_util.h"
#include "server/core/contain.h"

namespace tlserve {

// What an analysis gets: the caller, a progress callback (images done, of
// total) and whether the client went away.
struct AnalysisContext {
  const Caller& caller;
  std::function<void(int64_t, int64_t)> progress;
  std::function<bool()> cancelled;
};

struct AnalysisLimits {
  int max_concurrent = 2;                 // --max_concurrent_analyses
  int64_t max_image_pixels = 40'000'000;  // decoded and resized, per image
  // What one analysis may hold: its probabilities (and embeddings) and their
  // float64 copies for scoring (--max_analysis_mb).
  int64_t max_bytes = int64_t{2} << 30;
  std::shared_ptr<std::atomic<int>> in_flight = std::make_shared<std::atomic<int>>(0);
};

// `Response` has images_done and images_total fields (the progress).
template <typename Response>
class AnalysisReactor final : public grpc::ServerWriteReactor<Response> {
 public:
  using Body = std::function<absl::StatusOr<Response>(const AnalysisContext&)>;

  AnalysisReactor(grpc::CallbackServerContext* context, Security* security, std::string method,
                  const std::string& object, const AnalysisLimits& limits, Body body)
      : limits_(limits), timer_(security->metrics(), std::move(method)) {
    const int running = limits_.in_flight->fetch_add(1);  // OnDone gives it back
    auto caller = security->Admit(*context, &timer_, object);
    if (!caller.ok()) {
      End(caller.status());
      return;
    }
    caller_ = *caller;
    if (running >= limits_.max_concurrent) {
      End(absl::ResourceExhaustedError(absl::StrCat(
          limits_.max_concurrent,
          " evaluations or suggestions are running (--max_concurrent_analyses); retry when one "
          "ends")));
      return;
    }
    auto slot =
        security->AdmitSlot(caller_, "evaluations", std::max(1, limits_.max_concurrent / 2));
    if (!slot.ok()) {
      End(slot.status());
      return;
    }
    tenant_slot_ = *std::move(slot);
    started_ = true;
    worker_ = std::thread([this, body = std::move(body)] {
      const AnalysisContext ctx{caller_, [this](int64_t d, int64_t t) { Progress(d, t); },
                                [this] { return cancelled_.load(); }};
      absl::StatusOr<Response> result =
          Contain(absl::StrCat(timer_.method(), " failed"), [&] { return body(ctx); });
      // The analysis is over: its slots are free before the client hears of
      // it (OnDone may come later), so the client's next call finds them free.
      tenant_slot_.reset();
      ReleaseSlot();
      {
        absl::MutexLock lock(&mu_);
        if (!result.ok()) {
          ending_ = result.status();
        } else {
          final_ = *std::move(result);
        }
        over_ = true;
      }
      Pump();
    });
  }

  void OnWriteDone(bool ok) override {
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        cancelled_ = true;
        if (!ending_.ok() || final_) final_.reset();
        ending_ = absl::CancelledError("the client went away");
        progress_.reset();
      }
    }
    Pump();
  }
  void OnCancel() override { cancelled_ = true; }
  void OnDone() override {
    if (worker_.joinable()) {
      // OnDone may run on the worker itself, right after its Finish.
      if (worker_.get_id() == std::this_thread::get_id()) {
        worker_.detach();
      } else {
        worker_.join();
      }
    }
    ReleaseSlot();
    delete this;
  }

 private:
  void Progress(int64_t done, int64_t total) {
    {
      absl::MutexLock lock(&mu_);
      Response r;
      r.set_images_done(done);
      r.set_images_total(total);
      progress_ = std::move(r);
    }
    Pump();
  }

  // Decides under the lock, calls gRPC after releasing it (Finish may run
  // OnDone, which deletes this, on another thread at once). Writes the
  // latest progress when no write is in flight; once the analysis is over,
  // its result, then Finish (or Finish with its error).
  void Pump() {
    enum { kNothing, kWrite, kFinish } action = kNothing;
    absl::Status status;
    {
      absl::MutexLock lock(&mu_);
      if (writing_ || finished_) return;
      if (!ending_.ok() && over_) {
        status = ending_;
        action = kFinish;
      } else if (!ending_.ok() && cancelled_) {
        status = ending_;  // the client went away: the worker stops on its own
        action = kFinish;
      } else if (progress_) {
        current_ = *std::move(progress_);
        progress_.reset();
        action = kWrite;
      } else if (final_) {
        current_ = *std::move(final_);
        final_.reset();
        result_written_ = true;
        action = kWrite;
      } else if (result_written_) {
        action = kFinish;
      }
      if (action == kWrite) writing_ = true;
      if (action == kFinish) finished_ = true;
    }
    if (action == kWrite) this->StartWrite(&current_);
    if (action == kFinish) End(status);
  }

  void ReleaseSlot() {
    if (!released_.exchange(true)) limits_.in_flight->fetch_sub(1);
  }

  void End(const absl::Status& status) {
    if (!started_) {  // refused before it started
      tenant_slot_.reset();
      ReleaseSlot();
    }
    const absl::Status scrubbed = caller_.Scrub(status);
    timer_.Done(scrubbed);
    this->Finish(ToGrpcStatus(scrubbed));
  }

  AnalysisLimits limits_;
  RpcTimer timer_;
  Caller caller_;
  std::shared_ptr<const void> tenant_slot_;
  std::thread worker_;
  std::atomic<bool> cancelled_{false};
  std::atomic<bool> released_{false};  // the server-wide slot was given back
  bool started_ = false;               // set before the worker exists, never after
  absl::Mutex mu_;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool result_written_ ABSL_GUARDED_BY(mu_) = false;
  bool over_ ABSL_GUARDED_BY(mu_) = false;  // the analysis has returned
  absl::Status ending_ ABSL_GUARDED_BY(mu_);
  std::optional<Response> progress_ ABSL_GUARDED_BY(mu_);
  std::optional<Response> final_ ABSL_GUARDED_BY(mu_);
  Response current_;  // the message being written
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_ANALYSIS_REACTOR_H_
