// The Prometheus instruments of the server, in one registry served by the
// exposer on --metrics_port. Names follow Prometheus' conventions: prefix
// tlserve_, seconds, bytes, counters ending in _total. Thread-safe.
#ifndef TLSERVE_SERVER_CORE_METRICS_H_
#define TLSERVE_SERVER_CORE_METRICS_H_

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <memory>
#include <string>

namespace tlserve {

class Metrics {
 public:
  // `model_labels`: per-model series carry the model's name (its key,
  // TENANT:NAME); otherwise only its tenant (--metrics_model_labels).
  explicit Metrics(bool model_labels = false);
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  const std::shared_ptr<prometheus::Registry>& registry() const { return registry_; }

  // One finished RPC: its method, canonical code name ("OK", "INVALID_ARGUMENT") and duration.
  void RecordRequest(const std::string& method, const std::string& code, double seconds);
  void AddImages(const std::string& method, double n);
  void SetBackboneInfo(const std::string& name, const std::string& device, const std::string& dtype,
                       bool pretrained);

  void SetTrainingJobs(const std::string& state, double n);
  void SetTrainingEpoch(const std::string& model, double loss, double train_accuracy,
                        double validation_accuracy);
  // Drops a deleted model's per-model series (so deleted models do not
  // accumulate in every scrape).
  void RemoveModel(const std::string& model);
  void SetModels(double n);
  // A re-read of --api_keys or --quotas ("api_keys", "quotas"): taken or
  // refused (the server keeps what it read before):
  // tlserve_config_reloads_total{file,result="ok|error"}.
  void RecordConfigReload(const std::string& file, bool ok);
  // tlserve_security_info{tls,client_certificates,auth} = 1.
  void SetSecurityInfo(bool tls, bool client_certificates, bool auth);
  void SetDatasets(double datasets, double images);

  // The device engine (server/core/engine): a forward of `images` images
  // through one of its stages of work ("prefix": the shared stages of a
  // serving batch, "train": those of a training batch, "private": a model's
  // own stages, "head": a model's head).
  void EngineForward(const char* queue, double images);
  // A batch's fill (images / max batch size) and the time the launch thread
  // waited for the device (for a slot among the batches in flight).
  void EngineBatch(double fill, double device_wait_seconds);
  // Model versions resident on the device and dropped to host memory, and
  // `evictions` more evictions.
  void SetResidency(double on_device, double on_host, int64_t device_bytes, int evictions);

  prometheus::Histogram& batch_size() { return *batch_size_; }
  prometheus::Histogram& queue_seconds() { return *queue_seconds_; }
  prometheus::Gauge& queue_depth() { return *queue_depth_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  const bool model_labels_;
  prometheus::Family<prometheus::Gauge>* security_info_;
  prometheus::Family<prometheus::Counter>* config_reloads_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Family<prometheus::Histogram>* request_seconds_;
  prometheus::Family<prometheus::Counter>* images_;
  prometheus::Family<prometheus::Gauge>* backbone_info_;
  prometheus::Family<prometheus::Gauge>* training_jobs_;
  prometheus::Family<prometheus::Gauge>* epoch_loss_;
  prometheus::Family<prometheus::Gauge>* accuracy_;
  prometheus::Gauge* models_;
  prometheus::Gauge* datasets_;
  prometheus::Gauge* dataset_images_;
  prometheus::Histogram* batch_size_;
  prometheus::Histogram* queue_seconds_;
  prometheus::Gauge* queue_depth_;
  prometheus::Family<prometheus::Counter>* engine_forwards_;
  prometheus::Family<prometheus::Counter>* engine_images_;
  prometheus::Histogram* batch_fill_;
  prometheus::Histogram* device_wait_;
  prometheus::Family<prometheus::Gauge>* residency_;
  prometheus::Gauge* resident_bytes_;
  prometheus::Counter* evictions_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_METRICS_H_
