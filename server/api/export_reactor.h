// ExportModel: builds the TorchScript file on a thread of its own (it runs
// the network once and serialises every weight, too long for a gRPC callback
// thread) into a temporary file, then streams it from disk: an ExportInfo,
// then chunks of at most 1 MiB — one chunk in memory per export, however
// slowly the client reads. At most ExportOptions::max_concurrent exports at
// once (RESOURCE_EXHAUSTED beyond); the file is unlinked as soon as it is
// open, so nothing is left behind. Owns itself (deleted in OnDone).
#ifndef TLSERVE_SERVER_API_EXPORT_REACTOR_H_
#define TLSERVE_SERVER_API_EXPORT_REACTOR_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "server/api/rpc_timer.h"
#include "server/api/security.h"
#include "server/core/export.h"
#include "server/core/models.h"
#include "server/store/disk_budget.h"
#include "tlserve/v1/models.pb.h"

namespace tlserve {

struct ExportOptions {
  std::string dir;         // for the temporary files; emptied at start
  int max_concurrent = 4;  // exports building or streaming at once (--max_concurrent_exports)
  const DiskBudget* disk = nullptr;
};

class ExportReactor final : public grpc::ServerWriteReactor<v1::ExportModelResponse> {
 public:
  ExportReactor(grpc::CallbackServerContext* context, ModelRegistry* models, Engine* engine,
                Security* security, const v1::ExportModelRequest& req, const ExportOptions& options,
                std::shared_ptr<std::atomic<int>> in_flight);
  void OnWriteDone(bool ok) override;
  void OnCancel() override { cancelled_ = true; }
  void OnDone() override;

 private:
  // On the worker thread: BuildFile, contained, then the first write.
  void Build(std::shared_ptr<const ServableVersion> version);
  absl::Status BuildFile(const std::shared_ptr<const ServableVersion>& version);
  absl::Status ReadNextChunk();
  void End(const absl::Status& status);

  ModelRegistry* models_;
  Engine* engine_;
  const ExportOptions options_;
  std::shared_ptr<std::atomic<int>> in_flight_;
  RpcTimer timer_;
  Caller caller_;
  std::shared_ptr<const void> tenant_slot_;  // Security::AdmitSlot
  std::thread worker_;
  std::atomic<bool> cancelled_{false};
  int fd_ = -1;  // the export, already unlinked
  int64_t size_ = 0;
  int64_t offset_ = 0;
  v1::ExportModelResponse message_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_EXPORT_REACTOR_H_
