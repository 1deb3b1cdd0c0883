// The tlserve.v1.Datasets gRPC service: uploads are checked example by
// example on the worker pool as they arrive, staged in bounded chunks and
// committed in one transaction when the client's last message says so; at
// most `max_concurrent_uploads` at once. Queries go straight to the
// catalogue (SQLite reads are short).
#ifndef TLSERVE_SERVER_API_DATASET_SERVICE_H_
#define TLSERVE_SERVER_API_DATASET_SERVICE_H_

#include <atomic>
#include <memory>

#include "server/api/security.h"
#include "server/core/datasets.h"
#include "server/core/metrics.h"
#include "server/core/thread_pool.h"
#include "tlserve/v1/datasets.grpc.pb.h"

namespace tlserve {

class DatasetService final : public v1::Datasets::CallbackService {
 public:
  // Sets the dataset gauges from what is stored.
  DatasetService(DatasetCatalog* catalog, ThreadPool* pool, Security* security,
                 int max_concurrent_uploads = 16);

  grpc::ServerReadReactor<v1::UploadDatasetRequest>* UploadDataset(
      grpc::CallbackServerContext* context, v1::UploadDatasetResponse* response) override;
  grpc::ServerUnaryReactor* ListDatasets(grpc::CallbackServerContext* context,
                                         const v1::ListDatasetsRequest* request,
                                         v1::ListDatasetsResponse* response) override;
  grpc::ServerUnaryReactor* GetDataset(grpc::CallbackServerContext* context,
                                       const v1::GetDatasetRequest* request,
                                       v1::Dataset* response) override;
  grpc::ServerUnaryReactor* DeleteDataset(grpc::CallbackServerContext* context,
                                          const v1::DeleteDatasetRequest* request,
                                          v1::DeleteDatasetResponse* response) override;

 private:
  DatasetCatalog* catalog_;
  ThreadPool* pool_;
  Security* security_;
  Metrics* metrics_;
  const int max_concurrent_uploads_;
  std::shared_ptr<std::atomic<int>> uploads_in_flight_ = std::make_shared<std::atomic<int>>(0);
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_DATASET_SERVICE_H_
