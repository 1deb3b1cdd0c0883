#include "server/core/metrics.h"

#include <map>

#include "server/core/catalog/tenant_key.h"

namespace tlserve {
namespace {

prometheus::Histogram::BucketBoundaries Exponential(double start, double factor, int count) {
  prometheus::Histogram::BucketBoundaries b;
  for (double v = start; count-- > 0; v *= factor) b.push_back(v);
  return b;
}

}  // namespace

Metrics::Metrics(bool model_labels)
    : registry_(std::make_shared<prometheus::Registry>()), model_labels_(model_labels) {
  security_info_ = &prometheus::BuildGauge()
                        .Name("tlserve_security_info")
                        .Help(
                            "How the server is exposed (always 1): tls, client_certificates "
                            "(mutual TLS) and auth (API keys), each \"true\" or \"false\".")
                        .Register(*registry_);
  config_reloads_ = &prometheus::BuildCounter()
                         .Name("tlserve_config_reloads_total")
                         .Help(
                             "Re-reads of --api_keys and --quotas by file and result (ok, or "
                             "error: the file was refused and the last good one is kept).")
                         .Register(*registry_);
  requests_ = &prometheus::BuildCounter()
                   .Name("tlserve_requests_total")
                   .Help("RPCs finished, by method and canonical status code.")
                   .Register(*registry_);
  request_seconds_ = &prometheus::BuildHistogram()
                          .Name("tlserve_request_duration_seconds")
                          .Help("Time from an RPC's arrival to its status, by method.")
                          .Register(*registry_);
  images_ = &prometheus::BuildCounter()
                 .Name("tlserve_images_total")
                 .Help("Images received, by method.")
                 .Register(*registry_);
  backbone_info_ = &prometheus::BuildGauge()
                        .Name("tlserve_backbone_info")
                        .Help("The loaded backbone (always 1); labels say which.")
                        .Register(*registry_);
  batch_size_ = &prometheus::BuildHistogram()
                     .Name("tlserve_batch_size")
                     .Help("Images per batched forward.")
                     .Register(*registry_)
                     .Add({}, Exponential(1, 2, 11));
  queue_seconds_ = &prometheus::BuildHistogram()
                        .Name("tlserve_queue_duration_seconds")
                        .Help("Time an image waited in the batching queue.")
                        .Register(*registry_)
                        .Add({}, Exponential(1e-5, 4, 12));
  engine_forwards_ = &prometheus::BuildCounter()
                          .Name("tlserve_engine_forwards_total")
                          .Help(
                              "Forwards run by the device engine, by queue: prefix (the shared "
                              "stages of a serving batch), train (those of a training batch), "
                              "private (a model's own stages on its slice), head.")
                          .Register(*registry_);
  engine_images_ = &prometheus::BuildCounter()
                        .Name("tlserve_engine_images_total")
                        .Help("Images through the device engine's forwards, by queue.")
                        .Register(*registry_);
  batch_fill_ = &prometheus::BuildHistogram()
                     .Name("tlserve_engine_batch_fill")
                     .Help("Images per engine batch as a fraction of --max_batch_size.")
                     .Register(*registry_)
                     .Add({}, prometheus::Histogram::BucketBoundaries{0.05, 0.1, 0.2, 0.3, 0.4, 0.5,
                                                                      0.6, 0.7, 0.8, 0.9, 1.0});
  device_wait_ = &prometheus::BuildHistogram()
                      .Name("tlserve_engine_device_wait_seconds")
                      .Help(
                          "Time a formed batch waited for the device (a slot among the "
                          "batches in flight).")
                      .Register(*registry_)
                      .Add({}, Exponential(1e-5, 4, 12));
  residency_ = &prometheus::BuildGauge()
                    .Name("tlserve_model_residency")
                    .Help(
                        "Model versions the engine has run, by state: device (private "
                        "stages and head resident on the device) or host (dropped to their "
                        "host copy by the --device_memory_budget_mb budget).")
                    .Register(*registry_);
  resident_bytes_ = &prometheus::BuildGauge()
                         .Name("tlserve_model_resident_bytes")
                         .Help("Bytes of private stages and heads resident on the device.")
                         .Register(*registry_)
                         .Add({});
  evictions_ = &prometheus::BuildCounter()
                    .Name("tlserve_model_evictions_total")
                    .Help(
                        "Model versions dropped from the device to keep within "
                        "--device_memory_budget_mb.")
                    .Register(*registry_)
                    .Add({});
  training_jobs_ = &prometheus::BuildGauge()
                        .Name("tlserve_training_jobs")
                        .Help("Training jobs by state.")
                        .Register(*registry_);
  epoch_loss_ = &prometheus::BuildGauge()
                     .Name("tlserve_training_epoch_loss")
                     .Help(
                         "Training loss of the latest epoch, by tenant (by model with "
                         "--metrics_model_labels).")
                     .Register(*registry_);
  accuracy_ = &prometheus::BuildGauge()
                   .Name("tlserve_training_accuracy")
                   .Help(
                       "Accuracy of the latest epoch, by tenant (by model with "
                       "--metrics_model_labels) and split.")
                   .Register(*registry_);
  models_ = &prometheus::BuildGauge()
                 .Name("tlserve_models")
                 .Help("Models defined.")
                 .Register(*registry_)
                 .Add({});
  datasets_ = &prometheus::BuildGauge()
                   .Name("tlserve_datasets")
                   .Help("Datasets stored.")
                   .Register(*registry_)
                   .Add({});
  dataset_images_ = &prometheus::BuildGauge()
                         .Name("tlserve_dataset_images")
                         .Help("Images stored in all datasets.")
                         .Register(*registry_)
                         .Add({});
  queue_depth_ = &prometheus::BuildGauge()
                      .Name("tlserve_queue_depth")
                      .Help("Images waiting in the batching queue.")
                      .Register(*registry_)
                      .Add({});
}

void Metrics::RecordRequest(const std::string& method, const std::string& code, double seconds) {
  requests_->Add({{"method", method}, {"code", code}}).Increment();
  request_seconds_->Add({{"method", method}}, Exponential(5e-4, 2, 16)).Observe(seconds);
}

void Metrics::AddImages(const std::string& method, double n) {
  images_->Add({{"method", method}}).Increment(n);
}

void Metrics::SetTrainingJobs(const std::string& state, double n) {
  training_jobs_->Add({{"state", state}}).Set(n);
}

void Metrics::SetTrainingEpoch(const std::string& model, double loss, double train_accuracy,
                               double validation_accuracy) {
  // Model names are the tenants' own: only with --metrics_model_labels.
  const std::map<std::string, std::string> who =
      model_labels_ ? std::map<std::string, std::string>{{"model", model}}
                    : std::map<std::string, std::string>{{"tenant", TenantOf(model)}};
  auto with = [&who](const char* split) {
    auto labels = who;
    labels["split"] = split;
    return labels;
  };
  epoch_loss_->Add(who).Set(loss);
  accuracy_->Add(with("train")).Set(train_accuracy);
  accuracy_->Add(with("validation")).Set(validation_accuracy);
}

void Metrics::SetSecurityInfo(bool tls, bool client_certificates, bool auth) {
  auto text = [](bool b) { return b ? "true" : "false"; };
  security_info_
      ->Add({{"tls", text(tls)},
             {"client_certificates", text(client_certificates)},
             {"auth", text(auth)}})
      .Set(1);
}

void Metrics::RecordConfigReload(const std::string& file, bool ok) {
  config_reloads_->Add({{"file", file}, {"result", ok ? "ok" : "error"}}).Increment();
}

void Metrics::RemoveModel(const std::string& model) {
  if (!model_labels_) return;  // the tenant's series stays
  // Add returns the existing series (or makes one), which Remove then drops.
  epoch_loss_->Remove(&epoch_loss_->Add({{"model", model}}));
  for (const char* split : {"train", "validation"}) {
    accuracy_->Remove(&accuracy_->Add({{"model", model}, {"split", split}}));
  }
}

void Metrics::SetModels(double n) { models_->Set(n); }

void Metrics::SetDatasets(double datasets, double images) {
  datasets_->Set(datasets);
  dataset_images_->Set(images);
}

void Metrics::SetBackboneInfo(const std::string& name, const std::string& device,
                              const std::string& dtype, bool pretrained) {
  backbone_info_
      ->Add({{"name", name},
             {"device", device},
             {"dtype", dtype},
             {"pretrained", pretrained ? "true" : "false"}})
      .Set(1);
}

void Metrics::EngineForward(const char* queue, double images) {
  engine_forwards_->Add({{"queue", queue}}).Increment();
  engine_images_->Add({{"queue", queue}}).Increment(images);
}

void Metrics::EngineBatch(double fill, double device_wait_seconds) {
  batch_fill_->Observe(fill);
  device_wait_->Observe(device_wait_seconds);
}

void Metrics::SetResidency(double on_device, double on_host, int64_t device_bytes, int evictions) {
  residency_->Add({{"state", "device"}}).Set(on_device);
  residency_->Add({{"state", "host"}}).Set(on_host);
  resident_bytes_->Set(static_cast<double>(device_bytes));
  if (evictions > 0) evictions_->Increment(evictions);
}

}  // namespace tlserve
