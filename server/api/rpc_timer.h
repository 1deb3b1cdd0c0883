// Records one RPC in tlserve_requests_total and
// tlserve_request_duration_seconds when it finishes, and logs its failure.
// Security::Admit attaches the call's audit record (written when it
// finishes) and what the call holds until then (its in-flight images).
#ifndef TLSERVE_SERVER_API_RPC_TIMER_H_
#define TLSERVE_SERVER_API_RPC_TIMER_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/api/status_util.h"
#include "server/core/log.h"
#include "server/core/metrics.h"

namespace tlserve {

class RpcTimer {
 public:
  RpcTimer(Metrics* metrics, std::string method)
      : metrics_(metrics), method_(std::move(method)), start_(absl::Now()) {}

  // Every failed call is also one log line: WARN for the caller's mistakes,
  // ERROR for the server's own failures.
  void Done(const absl::Status& status) const {
    metrics_->RecordRequest(method_, CodeLabel(status.code()),
                            absl::ToDoubleSeconds(absl::Now() - start_));
    if (on_done_ != nullptr) (*on_done_)(status);
    if (status.ok()) return;
    const bool server_fault = status.code() == absl::StatusCode::kInternal ||
                              status.code() == absl::StatusCode::kUnknown ||
                              status.code() == absl::StatusCode::kDataLoss;
    LogLine(server_fault ? LogLevel::kError : LogLevel::kWarning,
            absl::StrCat(method_, " failed: ", status.ToString()));
  }
  const std::string& method() const { return method_; }

  // `on_done(status)` runs in Done (the audit trail).
  void OnDone(std::function<void(const absl::Status&)> on_done) {
    on_done_ = std::make_shared<const std::function<void(const absl::Status&)>>(std::move(on_done));
  }
  // Kept alive as long as any copy of this timer (the call's callbacks).
  void Hold(std::shared_ptr<const void> held) { held_ = std::move(held); }

 private:
  Metrics* metrics_;
  std::string method_;
  absl::Time start_;
  std::shared_ptr<const std::function<void(const absl::Status&)>> on_done_;
  std::shared_ptr<const void> held_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_RPC_TIMER_H_
