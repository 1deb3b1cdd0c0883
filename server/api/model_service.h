// The tlserve.v1.Models gRPC service: models, training jobs (with a
// server-streaming WatchJob) and Classify. Translation and validation only:
// the work is the ModelRegistry's, the JobRunner's and the Embedder's.
#ifndef TLSERVE_SERVER_API_MODEL_SERVICE_H_
#define TLSERVE_SERVER_API_MODEL_SERVICE_H_

#include <atomic>
#include <memory>

#include "server/api/analysis_reactor.h"
#include "server/api/export_reactor.h"
#include "server/api/inference_service.h"
#include "server/api/security.h"
#include "server/core/datasets.h"
#include "server/core/embedder.h"
#include "server/core/jobs.h"
#include "server/core/metrics.h"
#include "server/core/models.h"
#include "tlserve/v1/models.grpc.pb.h"

namespace tlserve {

// A model as the API shows it to `caller`.
void ToProto(const ModelInfo& m, const Caller& caller, v1::Model* out);

class ModelService final : public v1::Models::CallbackService {
 public:
  // `work` runs the handlers that touch the disk (StartTraining) off the
  // gRPC threads.
  ModelService(ModelRegistry* models, JobRunner* jobs, DatasetCatalog* datasets, Embedder* embedder,
               ThreadPool* work, Security* security, ApiLimits limits, ExportOptions exports = {},
               AnalysisLimits analyses = {})
      : models_(models),
        jobs_(jobs),
        datasets_(datasets),
        embedder_(embedder),
        work_(work),
        security_(security),
        metrics_(security->metrics()),
        limits_(limits),
        exports_(std::move(exports)),
        analyses_(std::move(analyses)) {}

  grpc::ServerUnaryReactor* CreateModel(grpc::CallbackServerContext* c,
                                        const v1::CreateModelRequest* req,
                                        v1::Model* resp) override;
  grpc::ServerUnaryReactor* GetModel(grpc::CallbackServerContext* c, const v1::GetModelRequest* req,
                                     v1::Model* resp) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* c,
                                       const v1::ListModelsRequest* req,
                                       v1::ListModelsResponse* resp) override;
  grpc::ServerUnaryReactor* DeleteModel(grpc::CallbackServerContext* c,
                                        const v1::DeleteModelRequest* req,
                                        v1::DeleteModelResponse* resp) override;
  grpc::ServerUnaryReactor* UnfreezeLayers(grpc::CallbackServerContext* c,
                                           const v1::UnfreezeLayersRequest* req,
                                           v1::Model* resp) override;
  grpc::ServerUnaryReactor* FreezeLayers(grpc::CallbackServerContext* c,
                                         const v1::FreezeLayersRequest* req,
                                         v1::Model* resp) override;
  grpc::ServerUnaryReactor* StartTraining(grpc::CallbackServerContext* c,
                                          const v1::StartTrainingRequest* req,
                                          v1::Job* resp) override;
  grpc::ServerWriteReactor<v1::Job>* WatchJob(grpc::CallbackServerContext* c,
                                              const v1::WatchJobRequest* req) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* c, const v1::GetJobRequest* req,
                                   v1::Job* resp) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* c, const v1::ListJobsRequest* req,
                                     v1::ListJobsResponse* resp) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* c,
                                      const v1::CancelJobRequest* req, v1::Job* resp) override;
  grpc::ServerUnaryReactor* Classify(grpc::CallbackServerContext* c, const v1::ClassifyRequest* req,
                                     v1::ClassifyResponse* resp) override;
  grpc::ServerBidiReactor<v1::StreamClassifyRequest, v1::StreamClassifyResponse>* StreamClassify(
      grpc::CallbackServerContext* c) override;
  grpc::ServerWriteReactor<v1::ExportModelResponse>* ExportModel(
      grpc::CallbackServerContext* c, const v1::ExportModelRequest* req) override;
  // model_service_results.cc:
  grpc::ServerWriteReactor<v1::EvaluateResponse>* Evaluate(grpc::CallbackServerContext* c,
                                                           const v1::EvaluateRequest* req) override;
  grpc::ServerUnaryReactor* SetServedVersion(grpc::CallbackServerContext* c,
                                             const v1::SetServedVersionRequest* req,
                                             v1::Model* resp) override;
  grpc::ServerUnaryReactor* SetThresholds(grpc::CallbackServerContext* c,
                                          const v1::SetThresholdsRequest* req,
                                          v1::Model* resp) override;
  grpc::ServerWriteReactor<v1::SuggestLabelsResponse>* SuggestLabels(
      grpc::CallbackServerContext* c, const v1::SuggestLabelsRequest* req) override;

 private:
  ModelRegistry* models_;
  JobRunner* jobs_;
  DatasetCatalog* datasets_;
  Embedder* embedder_;
  ThreadPool* work_;
  Security* security_;
  Metrics* metrics_;
  const ApiLimits limits_;
  const ExportOptions exports_;
  const AnalysisLimits analyses_;
  std::shared_ptr<std::atomic<int>> exports_in_flight_ = std::make_shared<std::atomic<int>>(0);
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_MODEL_SERVICE_H_
