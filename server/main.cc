// tlserve: the flags become ServerOptions; nothing else reads flags.
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "server/api/server.h"
#include "server/core/log.h"
#include "server/store/data_dir.h"
#include "server/store/migrate.h"
#include "server/store/postgres_database.h"

ABSL_FLAG(std::string, backbone, "", "TorchScript backbone file (required)");
ABSL_FLAG(std::string, device, "auto", "auto | cpu | cuda | cuda:N (auto: CUDA when available)");
ABSL_FLAG(std::string, precision, "fp32", "fp32 | bf16 | fp16 (reduced precision only on CUDA)");
ABSL_FLAG(int, port, 50051, "gRPC port");
ABSL_FLAG(int, metrics_port, 9090, "Prometheus /metrics port; 0 disables the exposer");
ABSL_FLAG(std::string, host, "0.0.0.0", "address to listen on for gRPC and metrics");
ABSL_FLAG(int, threads, 0,
          "LibTorch intra-op threads of the device engine's forwards, and OpenBLAS's pool "
          "(0: the machine's cores)");
ABSL_FLAG(int, train_threads, 1,
          "LibTorch intra-op threads of training jobs (their backward passes), so that serving "
          "keeps its cores");
ABSL_FLAG(int, max_concurrent_jobs, 1,
          "training jobs this replica runs at once (up to 16; more queue), or 0 for a "
          "serving-only replica. On a shared PostgreSQL database (--database) every replica "
          "claims queued jobs from the database's queue, and resumes those of a replica that "
          "died");
ABSL_FLAG(int, job_lease_seconds, 10,
          "how long a replica's claim on a running job lasts unrenewed (it renews it every "
          "third of that): a replica that dies leaves its jobs to others this long after");
ABSL_FLAG(int, preprocess_threads, 0,
          "image decoding threads, one intra-op thread each (0: the machine's cores)");
ABSL_FLAG(int, max_batch_size, 0,
          "most images in one batched forward (0: 256 on CUDA, 32 on the CPU)");
ABSL_FLAG(int64_t, device_memory_budget_mb, 0,
          "device memory for models' private stages and heads; least recently used ones go back "
          "to host memory (0: 80% of the free device memory; on the CPU, 40% of MemAvailable)");
ABSL_FLAG(int, max_queue_delay_us, 2000, "longest an image waits for a batch to fill");
ABSL_FLAG(int, max_queue_size, 0,
          "most images queued; more get RESOURCE_EXHAUSTED (0: 32 x the batch size, at least "
          "1024)");
ABSL_FLAG(int64_t, max_image_pixels, 40'000'000,
          "largest image (width*height), decoded or resized for the backbone");
ABSL_FLAG(int64_t, max_request_pixels, 256'000'000,
          "most pixels in the images of one request or stream message together (from their "
          "headers, before decoding)");
ABSL_FLAG(int, max_images_per_request, 256, "most images in one Embed request or stream message");
ABSL_FLAG(int, max_message_bytes, 64 << 20, "largest gRPC message, in bytes");
ABSL_FLAG(int64_t, max_dataset_images, 1'000'000, "most images in one dataset");
ABSL_FLAG(int64_t, max_dataset_classes, 1000, "most classes in one dataset");
ABSL_FLAG(int64_t, max_example_bytes, 20 << 20, "largest encoded image in a dataset");
ABSL_FLAG(int64_t, feature_cache_mb, 1024,
          "memory for training jobs' cached backbone features (least recently used go first); 0: "
          "no cache");
ABSL_FLAG(int64_t, max_head_params, 16'000'000,
          "most parameters in a model's head (a CreateModel over it gets RESOURCE_EXHAUSTED)");
ABSL_FLAG(int64_t, max_model_classes, 10'000, "most classes in one model");
ABSL_FLAG(int64_t, min_free_disk_mb, 512,
          "free space the data directory's disk keeps: writes that would go below it get "
          "RESOURCE_EXHAUSTED before anything is written; deletes always work");
ABSL_FLAG(int, max_concurrent_uploads, 16,
          "most UploadDataset streams at once; more get RESOURCE_EXHAUSTED");
ABSL_FLAG(int, max_concurrent_exports, 4,
          "most ExportModel streams at once (each builds the whole network into a file); more "
          "get RESOURCE_EXHAUSTED");
ABSL_FLAG(int, max_concurrent_analyses, 2,
          "most Evaluate and SuggestLabels calls at once (each classifies a whole dataset); "
          "more get RESOURCE_EXHAUSTED");
ABSL_FLAG(int64_t, max_analysis_mb, 2048,
          "most memory one Evaluate or SuggestLabels may hold for its probabilities, embeddings "
          "and scores; a larger one gets RESOURCE_EXHAUSTED before it starts");
ABSL_FLAG(std::string, data_dir, "./tlserve-data", "directory for the server's durable state");
ABSL_FLAG(std::string, database, "",
          "where the durable state lives: empty for SQLite and files in --data_dir (one server), "
          "or a PostgreSQL connection URI, postgresql://USER@HOST:PORT/DB?OPTIONS, for a database "
          "that several replicas share (README \"Scaling out\"); give the password in "
          "PGPASSWORD or a ~/.pgpass file rather than in the URI. Unset: $TLSERVE_DATABASE, "
          "if set (keeps the URI out of the command line)");
ABSL_FLAG(int, drain_seconds, 20, "on SIGTERM/SIGINT, how long in-flight calls may finish");

// Security (README "Security").
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate (chain): serve gRPC over TLS (with --tls_key)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA certificate(s): clients must present a certificate signed by one (mutual TLS)");
ABSL_FLAG(int, tls_refresh_seconds, 10,
          "how often the TLS files are re-read (a renewed certificate needs no restart)");
ABSL_FLAG(std::string, api_keys, "",
          "API keys file: lines TENANT ROLE SHA256HEX [LABEL] or TENANT ROLE cn:COMMON_NAME "
          "[LABEL], ROLE admin|write|read; re-read on change and on SIGHUP. Unset: no keys, one "
          "implicit tenant");
ABSL_FLAG(std::string, quotas, "",
          "per-tenant quota overrides: lines TENANT QUOTA VALUE (QUOTA: storage_mb, datasets, "
          "images, models, private_params, jobs, inflight_images); re-read on change");
ABSL_FLAG(int64_t, tenant_storage_mb, 0, "default quota: MiB of images per tenant (0: none)");
ABSL_FLAG(int64_t, tenant_datasets, 0, "default quota: datasets per tenant (0: none)");
ABSL_FLAG(int64_t, tenant_images, 0, "default quota: images in a tenant's datasets (0: none)");
ABSL_FLAG(int64_t, tenant_models, 0, "default quota: models per tenant (0: none)");
ABSL_FLAG(int64_t, tenant_private_params, 0,
          "default quota: parameters of a tenant's private (unfrozen) stages (0: none)");
ABSL_FLAG(int64_t, tenant_jobs, 0, "default quota: queued and running jobs per tenant (0: none)");
ABSL_FLAG(int64_t, tenant_inflight_images, 0,
          "default quota: a tenant's images being computed at once (0: half of --max_queue_size "
          "with --api_keys, else none)");
ABSL_FLAG(std::string, audit_log, "",
          "also append the audit trail (state-changing and denied calls) to this file, as JSON "
          "lines");
ABSL_FLAG(int, health_port, 0,
          "plaintext port serving only grpc.health.v1, for Kubernetes probes (0: off)");
ABSL_FLAG(std::string, metrics_host, "", "address for /metrics (default: --host)");
ABSL_FLAG(bool, metrics_tls, false, "serve /metrics over HTTPS with --tls_cert and --tls_key");
ABSL_FLAG(std::string, metrics_token_file, "",
          "file holding a bearer token that /metrics requires (re-read on change)");
ABSL_FLAG(bool, metrics_model_labels, false,
          "label per-model series with the model's name (tenants' names leak into metrics; "
          "default: the tenant only)");

// tlserve migrate (README "Scaling out").
ABSL_FLAG(std::string, from, "",
          "tlserve migrate: the data directory (--data_dir) of a single-node server, stopped");
ABSL_FLAG(
    std::string, to, "",
    "tlserve migrate: the PostgreSQL connection URI of a new, empty database to copy it into");

namespace {

// tlserve migrate --from=DATA_DIR --to=postgresql://...: copies a single-node
// deployment's state into PostgreSQL and verifies the copy.
int Migrate() {
  const std::string from = absl::GetFlag(FLAGS_from), to = absl::GetFlag(FLAGS_to);
  if (from.empty() || !tlserve::Database::IsPostgresUri(to)) {
    tlserve::LogError(
        "usage: tlserve migrate --from=DATA_DIR --to=postgresql://USER@HOST:PORT/DB "
        "(the data directory of a stopped single-node server, and an empty database)");
    return 2;
  }
  const std::string source_file = from + "/tlserve.db";
  std::error_code ec;
  if (!std::filesystem::is_regular_file(source_file, ec)) {
    tlserve::LogError("%s has no tlserve.db: it is not a tlserve data directory", from);
    return 1;
  }
  // Held to the end: no server may write the source meanwhile.
  auto lock = tlserve::DataDir::Open(from);
  if (!lock.ok()) {
    tlserve::LogError("cannot lock %s (stop the server that uses it first): %s", from,
                      lock.status().ToString());
    return 1;
  }
  auto source = tlserve::Database::Open(source_file);
  if (!source.ok()) {
    tlserve::LogError("cannot open %s: %s", source_file, source.status().ToString());
    return 1;
  }
  const std::string shown = tlserve::PostgresDatabase::Redacted(to);
  auto destination = tlserve::Database::Open(to);
  if (!destination.ok()) {
    tlserve::LogError("cannot open %s: %s", shown, destination.status().ToString());
    return 1;
  }
  tlserve::LogInfo("migrate: copying %s into %s", from, shown);
  auto report = tlserve::CopyStore(**source, **destination, [](const std::string& line) {
    tlserve::LogInfo("migrate: %s", line);
  });
  if (!report.ok()) {
    tlserve::LogError("migrate failed: %s", report.status().ToString());
    return 1;
  }
  std::printf(
      "migrated %s into %s: %lld datasets (%lld images, %lld bytes), %lld records, %lld blobs "
      "(%lld bytes), %lld unfinished jobs queued to resume; verified: counts, names, labels and "
      "the SHA-256 of every image and blob, every record byte for byte\n",
      from.c_str(), shown.c_str(), static_cast<long long>(report->datasets),
      static_cast<long long>(report->examples), static_cast<long long>(report->example_bytes),
      static_cast<long long>(report->records), static_cast<long long>(report->blobs),
      static_cast<long long>(report->blob_bytes), static_cast<long long>(report->queued_jobs));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "tlserve --backbone=FILE.pt [flags]: the transfer-learning server\n"
      "tlserve migrate --from=DATA_DIR --to=postgresql://...: copy a single-node server's state "
      "into PostgreSQL");
  const std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() == 2 && std::string(positional[1]) == "migrate") return Migrate();
  if (positional.size() > 1) {
    tlserve::LogError("unknown command \"%s\" (the one command is \"migrate\"; see --help)",
                      positional[1]);
    return 2;
  }

  // Block the stop signals in every thread; main waits for them below.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGHUP);  // re-read the keys and quotas
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  tlserve::ServerOptions o;
  o.backbone.path = absl::GetFlag(FLAGS_backbone);
  if (o.backbone.path.empty()) {
    tlserve::LogError("--backbone=FILE.pt is required (make one with scripts/make_backbone.py)");
    return 2;
  }
  o.backbone.device = absl::GetFlag(FLAGS_device);
  o.backbone.precision = absl::GetFlag(FLAGS_precision);
  o.backbone.threads = absl::GetFlag(FLAGS_threads) > 0 ? absl::GetFlag(FLAGS_threads) : cores;
  o.engine.max_batch_size = absl::GetFlag(FLAGS_max_batch_size);
  o.engine.max_queue_delay = absl::Microseconds(absl::GetFlag(FLAGS_max_queue_delay_us));
  o.engine.max_queue_size = absl::GetFlag(FLAGS_max_queue_size);
  o.engine.device_memory_budget_bytes = absl::GetFlag(FLAGS_device_memory_budget_mb) << 20;
  o.engine.threads = o.backbone.threads;
  o.train_threads = absl::GetFlag(FLAGS_train_threads);
  o.max_concurrent_jobs = absl::GetFlag(FLAGS_max_concurrent_jobs);
  o.job_lease = absl::Seconds(absl::GetFlag(FLAGS_job_lease_seconds));
  o.embedder.max_image_pixels = absl::GetFlag(FLAGS_max_image_pixels);
  o.embedder.max_request_pixels = absl::GetFlag(FLAGS_max_request_pixels);
  o.embedder.preprocess_threads =
      absl::GetFlag(FLAGS_preprocess_threads) > 0 ? absl::GetFlag(FLAGS_preprocess_threads) : cores;
  o.limits.max_images_per_request = absl::GetFlag(FLAGS_max_images_per_request);
  o.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  o.data_dir = absl::GetFlag(FLAGS_data_dir);
  o.database = absl::GetFlag(FLAGS_database);
  if (const char* env = std::getenv("TLSERVE_DATABASE"); o.database.empty() && env != nullptr) {
    o.database = env;
  }
  o.datasets.max_images = absl::GetFlag(FLAGS_max_dataset_images);
  o.datasets.max_classes = absl::GetFlag(FLAGS_max_dataset_classes);
  o.datasets.max_example_bytes = absl::GetFlag(FLAGS_max_example_bytes);
  o.feature_cache_bytes = absl::GetFlag(FLAGS_feature_cache_mb) << 20;
  o.models.max_head_params = absl::GetFlag(FLAGS_max_head_params);
  o.models.max_classes = absl::GetFlag(FLAGS_max_model_classes);
  o.min_free_disk_bytes = absl::GetFlag(FLAGS_min_free_disk_mb) << 20;
  o.max_concurrent_uploads = absl::GetFlag(FLAGS_max_concurrent_uploads);
  o.max_concurrent_exports = absl::GetFlag(FLAGS_max_concurrent_exports);
  o.max_concurrent_analyses = absl::GetFlag(FLAGS_max_concurrent_analyses);
  o.max_analysis_bytes = absl::GetFlag(FLAGS_max_analysis_mb) << 20;
  const std::string host = absl::GetFlag(FLAGS_host);
  o.grpc_address = absl::StrCat(host, ":", absl::GetFlag(FLAGS_port));
  const std::string metrics_host =
      absl::GetFlag(FLAGS_metrics_host).empty() ? host : absl::GetFlag(FLAGS_metrics_host);
  o.metrics_address = absl::GetFlag(FLAGS_metrics_port) > 0
                          ? absl::StrCat(metrics_host, ":", absl::GetFlag(FLAGS_metrics_port))
                          : "";
  o.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  o.tls_key = absl::GetFlag(FLAGS_tls_key);
  o.tls_client_ca = absl::GetFlag(FLAGS_tls_client_ca);
  o.tls_refresh_seconds = absl::GetFlag(FLAGS_tls_refresh_seconds);
  o.security.api_keys_file = absl::GetFlag(FLAGS_api_keys);
  o.security.quotas_file = absl::GetFlag(FLAGS_quotas);
  o.security.audit_log_file = absl::GetFlag(FLAGS_audit_log);
  tlserve::QuotaLimits& q = o.security.defaults;
  q.storage_bytes = absl::GetFlag(FLAGS_tenant_storage_mb) << 20;
  q.datasets = absl::GetFlag(FLAGS_tenant_datasets);
  q.images = absl::GetFlag(FLAGS_tenant_images);
  q.models = absl::GetFlag(FLAGS_tenant_models);
  q.private_params = absl::GetFlag(FLAGS_tenant_private_params);
  q.jobs = absl::GetFlag(FLAGS_tenant_jobs);
  q.inflight_images = absl::GetFlag(FLAGS_tenant_inflight_images);
  if (absl::GetFlag(FLAGS_health_port) > 0) {
    o.health_address = absl::StrCat(host, ":", absl::GetFlag(FLAGS_health_port));
  }
  o.metrics_tls = absl::GetFlag(FLAGS_metrics_tls);
  o.metrics_token_file = absl::GetFlag(FLAGS_metrics_token_file);
  o.metrics_model_labels = absl::GetFlag(FLAGS_metrics_model_labels);
  if (q.storage_bytes < 0 || q.datasets < 0 || q.images < 0 || q.models < 0 ||
      q.private_params < 0 || q.jobs < 0 || q.inflight_images < 0 || o.tls_refresh_seconds < 1 ||
      absl::GetFlag(FLAGS_health_port) < 0) {
    tlserve::LogError(
        "the --tenant_* quotas and --health_port must be >= 0, "
        "--tls_refresh_seconds >= 1");
    return 2;
  }
  if (o.metrics_tls && o.tls_cert.empty()) {
    tlserve::LogError("--metrics_tls needs --tls_cert and --tls_key");
    return 2;
  }
  if (o.limits.max_images_per_request < 1 || o.max_message_bytes < 1024 ||
      absl::GetFlag(FLAGS_feature_cache_mb) < 0 || o.models.max_head_params < 1 ||
      o.models.max_classes < 2 || o.min_free_disk_bytes < 0 || o.max_concurrent_uploads < 1 ||
      o.max_concurrent_exports < 1 || o.max_concurrent_analyses < 1 ||
      o.max_analysis_bytes < (int64_t{1} << 20) || o.train_threads < 1 ||
      o.max_concurrent_jobs < 0 || o.max_concurrent_jobs > 16 ||
      absl::GetFlag(FLAGS_job_lease_seconds) < 1 ||
      absl::GetFlag(FLAGS_device_memory_budget_mb) < 0) {
    tlserve::LogError(
        "--max_images_per_request must be >= 1, --max_message_bytes >= 1024, "
        "--feature_cache_mb >= 0, --max_head_params >= 1, --max_model_classes >= 2 and "
        "--min_free_disk_mb >= 0, --max_concurrent_uploads >= 1, --max_concurrent_exports >= 1, "
        "--max_concurrent_analyses >= 1, --max_analysis_mb >= 1, "
        "--train_threads >= 1, --max_concurrent_jobs 0 to 16, --job_lease_seconds >= 1 and "
        "--device_memory_budget_mb >= 0");
    return 2;
  }
  tlserve::LogInfo(
      "starting tlserve: backbone %s, device %s, precision %s, %d threads, "
      "max batch %d (0: the device's default), data dir %s, database %s",
      o.backbone.path, o.backbone.device, o.backbone.precision, o.backbone.threads,
      o.engine.max_batch_size, o.data_dir,
      o.database.empty() ? "SQLite in the data dir"
                         : tlserve::PostgresDatabase::Redacted(o.database));

  auto server = tlserve::Server::Start(o);
  if (!server.ok()) {
    tlserve::LogError("cannot start: %s", server.status().ToString());
    return 1;
  }
  int signal = 0;
  while (sigwait(&stop_signals, &signal) == 0 && signal == SIGHUP) {
    tlserve::LogInfo("received SIGHUP: re-reading --api_keys and --quotas");
    (*server)->Reload();
  }
  tlserve::LogInfo("received %s", signal == SIGTERM ? "SIGTERM" : "SIGINT");
  (*server)->Shutdown(absl::Seconds(absl::GetFlag(FLAGS_drain_seconds)));
  return 0;
}
