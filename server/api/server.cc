#include "server/api/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <grpcpp/server_builder.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <cstdlib>
#include <filesystem>
#include <limits>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/core/catalog/usage.h"
#include "server/core/device_memory.h"
#include "server/core/log.h"
#include "server/core/metrics_exposer.h"
#include "server/store/data_dir.h"
#include "server/store/database.h"
#include "server/store/disk_budget.h"

namespace tlserve {
namespace {

// The TLS files must make a working pair now: gRPC's file watcher would only
// log, and every handshake would then fail. FAILED_PRECONDITION naming the file.
absl::Status CheckTlsFiles(const ServerOptions& o) {
  if (o.tls_cert.empty() != o.tls_key.empty()) {
    return absl::InvalidArgumentError("give both --tls_cert and --tls_key, or neither");
  }
  if (o.tls_cert.empty() && !o.tls_client_ca.empty()) {
    return absl::InvalidArgumentError("--tls_client_ca needs --tls_cert and --tls_key");
  }
  if (o.tls_cert.empty()) return absl::OkStatus();
  std::unique_ptr<SSL_CTX, void (*)(SSL_CTX*)> ctx(SSL_CTX_new(TLS_server_method()), SSL_CTX_free);
  auto fail = [](const std::string& what) {
    char reason[256] = "";
    ERR_error_string_n(ERR_get_error(), reason, sizeof(reason));
    ERR_clear_error();
    return absl::FailedPreconditionError(absl::StrCat(what, " (", reason, ")"));
  };
  if (SSL_CTX_use_certificate_chain_file(ctx.get(), o.tls_cert.c_str()) != 1) {
    return fail(absl::StrCat("--tls_cert ", o.tls_cert, ": not a readable PEM certificate"));
  }
  if (SSL_CTX_use_PrivateKey_file(ctx.get(), o.tls_key.c_str(), SSL_FILETYPE_PEM) != 1) {
    const bool mismatch = ERR_GET_REASON(ERR_peek_error()) == X509_R_KEY_VALUES_MISMATCH;
    return fail(absl::StrCat("--tls_key ", o.tls_key,
                             mismatch ? absl::StrCat(" does not belong to --tls_cert ", o.tls_cert)
                                      : ": not a readable PEM private key"));
  }
  if (SSL_CTX_check_private_key(ctx.get()) != 1) {
    return fail(
        absl::StrCat("--tls_key ", o.tls_key, " does not belong to --tls_cert ", o.tls_cert));
  }
  if (!o.tls_client_ca.empty() &&
      SSL_CTX_load_verify_locations(ctx.get(), o.tls_client_ca.c_str(), nullptr) != 1) {
    return fail(
        absl::StrCat("--tls_client_ca ", o.tls_client_ca, ": not a readable PEM certificate"));
  }
  return absl::OkStatus();
}

std::shared_ptr<grpc::ServerCredentials> Credentials(const ServerOptions& o) {
  if (o.tls_cert.empty()) return grpc::InsecureServerCredentials();
  namespace ex = grpc::experimental;
  // Re-read every tls_refresh_seconds: a renewed certificate (cert-manager)
  // serves new connections without a restart.
  auto provider = o.tls_client_ca.empty()
                      ? std::make_shared<ex::FileWatcherCertificateProvider>(o.tls_key, o.tls_cert,
                                                                             o.tls_refresh_seconds)
                      : std::make_shared<ex::FileWatcherCertificateProvider>(
                            o.tls_key, o.tls_cert, o.tls_client_ca, o.tls_refresh_seconds);
  ex::TlsServerCredentialsOptions tls(provider);
  tls.watch_identity_key_cert_pairs();
  if (o.tls_client_ca.empty()) {
    tls.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  } else {
    tls.watch_root_certs();
    tls.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  }
  return grpc::experimental::TlsServerCredentials(tls);
}

bool Loopback(const std::string& address) {
  return absl::StartsWith(address, "127.") || absl::StartsWith(address, "localhost:") ||
         absl::StartsWith(address, "[::1]:");
}

}  // namespace

absl::StatusOr<std::unique_ptr<Server>> Server::Start(const ServerOptions& options) {
  const absl::Time start = absl::Now();
  if (absl::Status s = CheckTlsFiles(options); !s.ok()) return s;
  std::unique_ptr<Server> s(new Server());
  auto dir = DataDir::Open(options.data_dir);
  if (!dir.ok()) return dir.status();
  s->data_dir_ = std::move(*dir);
  s->metrics_ = std::make_unique<Metrics>(options.metrics_model_labels);
  auto db = Database::Open(options.database.empty() ? options.data_dir + "/tlserve.db"
                                                    : options.database);
  if (!db.ok()) return db.status();
  s->database_ = std::move(*db);
  Database* database = s->database_.get();
  if (options.database.empty()) {
    s->disk_ = std::make_unique<DiskBudget>(DiskBudget::FileSystemProbe(options.data_dir),
                                            options.min_free_disk_bytes,
                                            [database] { return database->ReusableBytes(); });
  } else {
    // The state is on the database server's disk, which it guards itself (a
    // full disk fails the write with RESOURCE_EXHAUSTED, nothing half-written).
    s->disk_ = std::make_unique<DiskBudget>(
        []() -> absl::StatusOr<int64_t> { return std::numeric_limits<int64_t>::max() / 2; }, 0);
  }
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
    MetricsExposer::Options m;
    m.address = options.metrics_address;
    if (options.metrics_tls) {
      m.tls_cert_file = options.tls_cert;
      m.tls_key_file = options.tls_key;
    }
    m.token_file = options.metrics_token_file;
    if (!m.token_file.empty() && !options.metrics_tls) {
      LogWarning(
          "--metrics_token_file without --metrics_tls: the token crosses the network in "
          "the clear");
    }
    auto exposer = MetricsExposer::Start(m);
    if (!exposer.ok()) {
      return absl::Status(exposer.status().code(),
                          absl::StrCat(exposer.status().message(), " (see --metrics_port)"));
    }
    s->exposer_ = std::move(*exposer);
    s->exposer_->RegisterCollectable(s->metrics_->registry());
    s->device_memory_ = std::make_shared<DeviceMemoryCollector>(s->backbone_->device());
    s->exposer_->RegisterCollectable(s->device_memory_);
  }

  Security::Options security = options.security;
  security.tls = !options.tls_cert.empty();
  security.client_certificates = !options.tls_client_ca.empty();
  if (security.defaults.inflight_images == 0 && !security.api_keys_file.empty()) {
    // With tenants, one cannot fill the engine's whole queue.
    security.defaults.inflight_images = std::max(1, s->engine_->max_queue_size() / 2);
  }
  auto sec = Security::Create(security, s->metrics_.get());
  if (!sec.ok()) return sec.status();
  s->security_ = std::move(*sec);
  s->metrics_->SetSecurityInfo(security.tls, security.client_certificates, s->security_->keys());
  const bool keys = s->security_->keys();
  if ((!security.tls || !keys) && !Loopback(options.grpc_address)) {
    LogWarning(
        "SECURITY: gRPC on %s %s: %s. Set --tls_cert/--tls_key and --api_keys (README "
        "\"Security\"), or listen on loopback only (--host=127.0.0.1)",
        options.grpc_address,
        !security.tls && !keys ? "without TLS and without API keys"
        : !security.tls        ? "without TLS"
                               : "without API keys",
        keys ? "API keys and images cross the network in the clear"
             : "anyone who can reach the port can read, change and delete every model and "
               "dataset");
  }
  s->inference_ =
      std::make_unique<InferenceService>(s->embedder_.get(), s->security_.get(), options.limits);
  auto models =
      ModelRegistry::Open(s->database_.get(), s->backbone_.get(), options.models, s->disk_.get());
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
  jobs.checkpoints = true;
  jobs.before_step = options.before_training_step;
  jobs.max_concurrent_jobs = options.max_concurrent_jobs;
  jobs.lease = options.job_lease;
  s->jobs_ = std::make_unique<JobRunner>(s->database_.get(), s->datasets_.get(), s->models_.get(),
                                         s->engine_.get(), s->metrics_.get(), jobs);
  if (absl::Status st = s->jobs_->Recover(); !st.ok()) return st;
  {
    DatasetCatalog* datasets = s->datasets_.get();
    ModelRegistry* models = s->models_.get();
    JobRunner* jobs = s->jobs_.get();
    s->security_->SetUsage([datasets, models, jobs](const std::string& tenant) {
      return UsageOf(tenant, *datasets, *models, *jobs);
    });
    if (s->exposer_) {
      s->tenant_usage_ = s->security_->UsageCollector(
          [datasets, models, jobs] { return UsageByTenant(*datasets, *models, *jobs); });
      s->exposer_->RegisterCollectable(s->tenant_usage_);
    }
  }
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
      s->security_.get(), options.limits, exports,
      AnalysisLimits{options.max_concurrent_analyses, options.embedder.max_image_pixels,
                     options.max_analysis_bytes});
  s->oip_ = std::make_unique<OipService>(s->models_.get(), s->embedder_.get(), s->security_.get(),
                                         options.limits);
  s->dataset_service_ = std::make_unique<DatasetService>(
      s->datasets_.get(), s->pool_.get(), s->security_.get(), options.max_concurrent_uploads);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.grpc_address, Credentials(options), &s->grpc_port_);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  builder.RegisterService(s->inference_.get());
  builder.RegisterService(s->dataset_service_.get());
  builder.RegisterService(s->model_service_.get());
  builder.RegisterService(s->oip_.get());
  s->grpc_ = builder.BuildAndStart();
  if (s->grpc_ == nullptr || s->grpc_port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for gRPC on ", options.grpc_address,
                                               " (is the port in use? see --port)"));
  }
  if (!options.health_address.empty()) {
    // Kubernetes' gRPC probes speak neither TLS nor keys: only grpc.health.v1 here.
    grpc::ServerBuilder health;
    health.AddListeningPort(options.health_address, grpc::InsecureServerCredentials(),
                            &s->health_port_);
    s->health_grpc_ = health.BuildAndStart();
    if (s->health_grpc_ == nullptr || s->health_port_ == 0) {
      return absl::UnavailableError(absl::StrCat("cannot listen for health checks on ",
                                                 options.health_address,
                                                 " (is the port in use? see --health_port)"));
    }
    s->health_grpc_->GetHealthCheckService()->SetServingStatus(true);
  }
  s->grpc_->GetHealthCheckService()->SetServingStatus(true);
  LogInfo(
      "serving %s on gRPC port %d (%s, %s), metrics on port %s (/metrics), health port %s; "
      "started in %.2f s",
      s->backbone_->name(), s->grpc_port_,
      security.tls ? (security.client_certificates ? "mutual TLS" : "TLS") : "plaintext",
      s->security_->keys() ? "API keys" : "no API keys",
      s->exposer_ ? std::to_string(s->exposer_->port()) : "(disabled)",
      s->health_grpc_ ? std::to_string(s->health_port_) : "(off)",
      absl::ToDoubleSeconds(absl::Now() - start));
  return s;
}

void Server::Shutdown(absl::Duration grace) {
  if (shut_down_ || grpc_ == nullptr) return;
  shut_down_ = true;
  LogInfo("draining: health NOT_SERVING, finishing in-flight calls (up to %s)",
          absl::FormatDuration(grace));
  grpc_->GetHealthCheckService()->SetServingStatus(false);
  oip_->Drain();
  if (health_grpc_) health_grpc_->GetHealthCheckService()->SetServingStatus(false);
  grpc_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
  grpc_->Wait();
  if (health_grpc_) {
    health_grpc_->Shutdown(absl::ToChronoTime(absl::Now()));
    health_grpc_->Wait();
  }
  LogInfo("stopped");
}

int Server::metrics_port() const { return exposer_ ? exposer_->port() : 0; }

Server::~Server() {
  Shutdown(absl::Seconds(5));
  // Members go in reverse order: gRPC, exposer, services, jobs, models,
  // embedder, engine, backbone.
}

}  // namespace tlserve
