// Assembles a running tlserve: data directory, backbone, embedder, metrics
// exposer and the gRPC server with health and reflection. main() turns flags
// into ServerOptions and calls Start; tests do the same on loopback ports.
#ifndef TLSERVE_SERVER_API_SERVER_H_
#define TLSERVE_SERVER_API_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/api/dataset_service.h"
#include "server/api/inference_service.h"
#include "server/api/model_service.h"
#include "server/api/oip_service.h"
#include "server/core/backbone.h"
#include "server/core/embedder.h"

namespace grpc {
class Server;
}

namespace tlserve {

class DataDir;
class Database;
class DiskBudget;
class DeviceMemoryCollector;
class MetricsExposer;

struct ServerOptions {
  BackboneOptions backbone;
  Engine::Options engine;
  Embedder::Options embedder;
  ApiLimits limits;
  DatasetLimits datasets;
  ModelLimits models;
  std::string data_dir = "./tlserve-data";
  // Empty: SQLite and weight files in data_dir. A "postgresql://" URI: the
  // state (datasets, models, weights, jobs, checkpoints) in that database.
  std::string database;
  std::string grpc_address = "0.0.0.0:50051";    // port 0 picks a free one
  std::string metrics_address = "0.0.0.0:9090";  // empty: no exposer
  int max_message_bytes = 64 << 20;
  int64_t feature_cache_bytes = int64_t{1} << 30;  // training jobs' feature cache
  int train_threads = 1;                           // LibTorch intra-op threads of training
  // Training jobs this server runs at once; 0: it serves only (beside
  // replicas of a shared PostgreSQL database that run them).
  int max_concurrent_jobs = 1;
  // How long a replica's claim on a job lasts unrenewed (renewed every third
  // of it): how soon another replica resumes the jobs of one that died.
  absl::Duration job_lease = absl::Seconds(10);
  // Tests only: called before each fine-tuning step (JobRunner::Options).
  std::function<void(const std::string&)> before_training_step;
  int64_t min_free_disk_bytes = int64_t{512} << 20;  // the data directory's reserve
  int max_concurrent_uploads = 16;
  int max_concurrent_exports = 4;
  int max_concurrent_analyses = 2;                // Evaluate and SuggestLabels calls at once
  int64_t max_analysis_bytes = int64_t{2} << 30;  // what one of them may hold

  // Security (README "Security"). tls_cert + tls_key: gRPC over TLS, the
  // files re-read every tls_refresh_seconds; tls_client_ca: clients must
  // present a certificate it signed (mutual TLS).
  std::string tls_cert, tls_key, tls_client_ca;
  int tls_refresh_seconds = 10;
  // Keys, quotas (inflight_images 0: half of the engine's queue when there
  // are keys), audit.
  Security::Options security;
  std::string health_address;  // plaintext grpc.health.v1 only; empty: none
  bool metrics_tls = false;    // /metrics over HTTPS with tls_cert and tls_key
  std::string metrics_token_file;
  bool metrics_model_labels = false;
};

class Server {
 public:
  // Loads and warms up the backbone, then listens; health is SERVING when
  // this returns. Errors say what could not be started and why.
  static absl::StatusOr<std::unique_ptr<Server>> Start(const ServerOptions& options);
  ~Server();

  int grpc_port() const { return grpc_port_; }
  int health_port() const { return health_port_; }
  // Re-reads the API keys and quotas files (SIGHUP).
  void Reload() { security_->Reload(); }
  int metrics_port() const;  // 0 when disabled
  Metrics& metrics() { return *metrics_; }

  // Health to NOT_SERVING, stop accepting, let in-flight calls finish for up
  // to `grace`, then cancel what is left. Idempotent.
  void Shutdown(absl::Duration grace);

 private:
  Server() = default;

  std::unique_ptr<DataDir> data_dir_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<Backbone> backbone_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<Embedder> embedder_;
  std::unique_ptr<Database> database_;
  std::unique_ptr<DiskBudget> disk_;
  std::unique_ptr<DatasetCatalog> datasets_;
  std::unique_ptr<ThreadPool> pool_;  // uploads and other non-device work
  std::unique_ptr<Security> security_;
  std::shared_ptr<prometheus::Collectable> tenant_usage_;
  std::unique_ptr<InferenceService> inference_;
  std::unique_ptr<DatasetService> dataset_service_;
  std::unique_ptr<ModelRegistry> models_;
  std::unique_ptr<JobRunner> jobs_;
  std::unique_ptr<ModelService> model_service_;
  std::unique_ptr<OipService> oip_;  // the Open Inference Protocol
  // Collectables are registered weakly: the server keeps them alive.
  std::shared_ptr<DeviceMemoryCollector> device_memory_;
  std::unique_ptr<MetricsExposer> exposer_;
  std::unique_ptr<grpc::Server> grpc_;
  std::unique_ptr<grpc::Server> health_grpc_;
  int grpc_port_ = 0;
  int health_port_ = 0;
  bool shut_down_ = false;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_SERVER_H_
