// Records one RPC in tlserve_requests_total and
// tlserve_request_duration_seconds when it finishes.
#ifndef TLSERVE_SERVER_API_RPC_TIMER_H_
#define TLSERVE_SERVER_API_RPC_TIMER_H_

#include <string>

#include "absl/status/status.h"
#include "absl/time/clock.h"
#include "server/api/status_util.h"
#include "server/core/metrics.h"

namespace tlserve {

class RpcTimer {
 public:
  RpcTimer(Metrics* metrics, std::string method)
      : metrics_(metrics), method_(std::move(method)), start_(absl::Now()) {}

  void Done(const absl::Status& status) const {
    metrics_->RecordRequest(method_, CodeLabel(status.code()),
                            absl::ToDoubleSeconds(absl::Now() - start_));
  }
  const std::string& method() const { return method_; }

 private:
  Metrics* metrics_;
  std::string method_;
  absl::Time start_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_RPC_TIMER_H_
