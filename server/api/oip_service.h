// The Open Inference Protocol (inference.GRPCInferenceService, KServe's v2
// protocol) beside tlserve.v1 on the same port: every model of the caller's
// tenant is an OIP model (its versions are the OIP versions; empty = the
// served one) and the backbone is the model "_backbone" (ModelInfer on it =
// Embed). Translation only: the same Security (keys, tenants, quotas), the
// same Embedder and batched engine, the same limits and metrics as the
// native API (with their own `method` labels). README "Open Inference Protocol".
#ifndef TLSERVE_SERVER_API_OIP_SERVICE_H_
#define TLSERVE_SERVER_API_OIP_SERVICE_H_

#include <atomic>

#include "inference/open_inference.grpc.pb.h"
#include "server/api/inference_service.h"
#include "server/api/security.h"
#include "server/core/embedder.h"
#include "server/core/models.h"

namespace tlserve {

class OipService final : public inference::GRPCInferenceService::CallbackService {
 public:
  OipService(ModelRegistry* models, Embedder* embedder, Security* security, ApiLimits limits)
      : models_(models), embedder_(embedder), security_(security), limits_(limits) {}

  // ServerReady (and ModelReady) answer false from now on: the server drains.
  void Drain() { draining_ = true; }

  grpc::ServerUnaryReactor* ServerLive(grpc::CallbackServerContext* c,
                                       const inference::ServerLiveRequest* req,
                                       inference::ServerLiveResponse* resp) override;
  grpc::ServerUnaryReactor* ServerReady(grpc::CallbackServerContext* c,
                                        const inference::ServerReadyRequest* req,
                                        inference::ServerReadyResponse* resp) override;
  grpc::ServerUnaryReactor* ModelReady(grpc::CallbackServerContext* c,
                                       const inference::ModelReadyRequest* req,
                                       inference::ModelReadyResponse* resp) override;
  grpc::ServerUnaryReactor* ServerMetadata(grpc::CallbackServerContext* c,
                                           const inference::ServerMetadataRequest* req,
                                           inference::ServerMetadataResponse* resp) override;
  grpc::ServerUnaryReactor* ModelMetadata(grpc::CallbackServerContext* c,
                                          const inference::ModelMetadataRequest* req,
                                          inference::ModelMetadataResponse* resp) override;
  grpc::ServerUnaryReactor* ModelInfer(grpc::CallbackServerContext* c,
                                       const inference::ModelInferRequest* req,
                                       inference::ModelInferResponse* resp) override;

 private:
  // The model's record, and the version asked for (0: the served one) after
  // checking it exists (NOT_FOUND otherwise).
  struct Target {
    ModelInfo info;
    int version = 0;
  };
  absl::StatusOr<Target> Find(const Caller& caller, const std::string& name,
                              const std::string& version) const;
  absl::Status InferModel(grpc::CallbackServerContext* c, const inference::ModelInferRequest* req,
                          inference::ModelInferResponse* resp, grpc::ServerUnaryReactor* reactor,
                          const RpcTimer& timer, const Caller& caller);
  absl::Status InferBackbone(grpc::CallbackServerContext* c,
                             const inference::ModelInferRequest* req,
                             inference::ModelInferResponse* resp, grpc::ServerUnaryReactor* reactor,
                             const RpcTimer& timer, const Caller& caller);

  ModelRegistry* models_;
  Embedder* embedder_;
  Security* security_;
  const ApiLimits limits_;
  std::atomic<bool> draining_{false};
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_OIP_SERVICE_H_
