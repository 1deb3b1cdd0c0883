#include "server/api/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/server_builder.h>

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/core/device_memory.h"
#include "server/core/log.h"
#include "server/core/metrics_exposer.h"
#include "server/store/data_dir.h"
#include "server/store/database.h"
#include "server/store/disk_budget.h"

namespace tlserve {

absl::StatusOr<std::unique_ptr<Server>> Server::Start(const ServerOptions& options) {
  const absl::Time start = absl::Now();
  std::unique_ptr<Server> s(new Server());
  auto dir = DataDir::Open(options.data_dir);
  if (!dir.ok()) return dir.status();
  s->data_dir_ = std::move(*dir);
  s->metrics_ = std::make_unique<Metrics>();
  auto db = Database::Open(options.data_dir + "/tlserve.db");
  if (!db.ok()) return db.status();
  s->database_ = std::move(*db);
  Database* database = s->database_.get();
  s->disk_ = std::make_unique<DiskBudget>(DiskBudget::FileSystemProbe(options.data_dir),
                                          options.min_free_disk_bytes,
                                          [database] { return database->ReusableBytes(); });
  s->pool_ = std::make_unique<ThreadPool>(options.embedder.preprocess_threads);

  auto backbone = Backbone::Load(options.backbone);
  if (!backbone.ok()) return backbone.status();
  s->backbone_ = std::move(*backbone);
  if (!s->backbone_->pretrained()) {
    LogWarning(
        "backbone %s has RANDOM weights (a test fixture, not pretrained): embeddings "
        "are not meaningful features; see README for real weights",
        s->backbone_->name());
  }
  DatasetLimits dataset_limits = options.datasets;
  dataset_limits.max_image_pixels = options.embedder.max_image_pixels;
  dataset_limits.preprocess = s->backbone_->preprocess();
  s->datasets_ =
      std::make_unique<DatasetCatalog>(s->database_.get(), dataset_limits, s->disk_.get());
  s->metrics_->SetBackboneInfo(s->backbone_->name(), s->backbone_->device(), s->backbone_->dtype(),
                               s->backbone_->pretrained());

  auto engine = Engine::Create(s->backbone_.get(), options.engine, s->metrics_.get());
  if (!engine.ok()) return engine.status();
  s->engine_ = std::move(*engine);
  s->engine_->Warmup();
  auto embedder = Embedder::Create(s->engine_.get(), options.embedder);
  if (!embedder.ok()) return embedder.status();
  s->embedder_ = std::move(*embedder);

  if (!options.metrics_address.empty()) {
    auto exposer = MetricsExposer::Start(options.metrics_address);
    if (!exposer.ok()) {
      return absl::Status(exposer.status().code(),
                          absl::StrCat(exposer.status().message(), " (see --metrics_port)"));
    }
    s->exposer_ = std::move(*exposer);
    s->exposer_->RegisterCollectable(s->metrics_->registry());
    s->device_memory_ = std::make_shared<DeviceMemoryCollector>(s->backbone_->device());
    s->exposer_->RegisterCollectable(s->device_memory_);
  }

  s->inference_ =
      std::make_unique<InferenceService>(s->embedder_.get(), s->metrics_.get(), options.limits);
  auto models = ModelRegistry::Open(s->database_.get(), options.data_dir + "/models",
                                    s->backbone_.get(), options.models, s->disk_.get());
  if (!models.ok()) return models.status();
  s->models_ = std::move(*models);
  JobRunner::Options jobs;
  jobs.feature_cache_bytes = options.feature_cache_bytes;
  // On CUDA, fine-tuning keeps prefix activations on the device up to a
  // quarter of the engine's budget (then in host memory).
  jobs.prefix_cache_device_bytes = s->engine_->device_memory_budget_bytes() / 4;
  jobs.train_threads = options.train_threads;
  jobs.max_image_pixels = options.embedder.max_image_pixels;
  jobs.disk = s->disk_.get();
  jobs.before_step = options.before_training_step;
  s->jobs_ = std::make_unique<JobRunner>(s->database_.get(), s->datasets_.get(), s->models_.get(),
                                         s->engine_.get(), s->metrics_.get(), jobs);
  if (absl::Status st = s->jobs_->Recover(); !st.ok()) return st;
  s->metrics_->SetModels(s->models_->size());
  ExportOptions exports;
  exports.dir = options.data_dir + "/exports";
  exports.max_concurrent = options.max_concurrent_exports;
  exports.disk = s->disk_.get();
  // Exports are unlinked once open; what a crash left behind goes now.
  std::error_code ignored;
  std::filesystem::remove_all(exports.dir, ignored);
  if (absl::Status st = MakeDirectories(exports.dir); !st.ok()) return st;
  s->model_service_ = std::make_unique<ModelService>(
      s->models_.get(), s->jobs_.get(), s->datasets_.get(), s->embedder_.get(), s->pool_.get(),
      s->metrics_.get(), options.limits, exports);
  s->dataset_service_ = std::make_unique<DatasetService>(
      s->datasets_.get(), s->pool_.get(), s->metrics_.get(), options.max_concurrent_uploads);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.grpc_address, grpc::InsecureServerCredentials(), &s->grpc_port_);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  builder.RegisterService(s->inference_.get());
  builder.RegisterService(s->dataset_service_.get());
  builder.RegisterService(s->model_service_.get());
  s->grpc_ = builder.BuildAndStart();
  if (s->grpc_ == nullptr || s->grpc_port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for gRPC on ", options.grpc_address,
                                               " (is the port in use? see --port)"));
  }
  s->grpc_->GetHealthCheckService()->SetServingStatus(true);
  LogInfo("serving %s on gRPC port %d, metrics on port %s (/metrics); started in %.2f s",
          s->backbone_->name(), s->grpc_port_,
          s->exposer_ ? std::to_string(s->exposer_->port()) : "(disabled)",
          absl::ToDoubleSeconds(absl::Now() - start));
  return s;
}

void Server::Shutdown(absl::Duration grace) {
  if (shut_down_ || grpc_ == nullptr) return;
  shut_down_ = true;
  LogInfo("draining: health NOT_SERVING, finishing in-flight calls (up to %s)",
          absl::FormatDuration(grace));
  grpc_->GetHealthCheckService()->SetServingStatus(false);
  grpc_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
  grpc_->Wait();
  LogInfo("stopped");
}

int Server::metrics_port() const { return exposer_ ? exposer_->port() : 0; }

Server::~Server() {
  Shutdown(absl::Seconds(5));
  // Members go in reverse order: gRPC, exposer, services, jobs, models,
  // embedder, engine, backbone.
}

}  // namespace tlserve
