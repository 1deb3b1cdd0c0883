// The tlserve.v1.Datasets gRPC service: uploads are checked example by
// example on the worker pool as they arrive and committed in one transaction
// at the end; queries go straight to the catalogue (SQLite reads are short).
#ifndef TLSERVE_SERVER_API_DATASET_SERVICE_H_
#define TLSERVE_SERVER_API_DATASET_SERVICE_H_

#include "server/core/datasets.h"
#include "server/core/metrics.h"
#include "server/core/thread_pool.h"
#include "tlserve/v1/datasets.grpc.pb.h"

namespace tlserve {

class DatasetService final : public v1::Datasets::CallbackService {
 public:
  // Sets the dataset gauges from what is stored.
  DatasetService(DatasetCatalog* catalog, ThreadPool* pool, Metrics* metrics);

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
  Metrics* metrics_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_DATASET_SERVICE_H_
