// ExportModel: builds the TorchScript file on a thread of its own (it runs
// the network once and serialises every weight, too long for a gRPC callback
// thread), then streams it: an ExportInfo, then chunks of at most 1 MiB.
// Owns itself (deleted in OnDone).
#ifndef TLSERVE_SERVER_API_EXPORT_REACTOR_H_
#define TLSERVE_SERVER_API_EXPORT_REACTOR_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "server/api/rpc_timer.h"
#include "server/core/export.h"
#include "server/core/models.h"
#include "tlserve/v1/models.pb.h"

namespace tlserve {

class ExportReactor final : public grpc::ServerWriteReactor<v1::ExportModelResponse> {
 public:
  ExportReactor(const ModelRegistry* models, Metrics* metrics, const v1::ExportModelRequest& req);
  void OnWriteDone(bool ok) override;
  void OnCancel() override { cancelled_ = true; }
  void OnDone() override;

 private:
  void Build(std::shared_ptr<const ServableVersion> version);
  void WriteNext();
  void End(const absl::Status& status);

  const ModelRegistry* models_;
  RpcTimer timer_;
  std::thread worker_;
  std::atomic<bool> cancelled_{false};
  ExportedModel file_;
  size_t offset_ = 0;
  v1::ExportModelResponse message_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_EXPORT_REACTOR_H_
