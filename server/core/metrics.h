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
  Metrics();
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
  void SetDatasets(double datasets, double images);

  prometheus::Histogram& batch_size() { return *batch_size_; }
  prometheus::Histogram& queue_seconds() { return *queue_seconds_; }
  prometheus::Gauge& queue_depth() { return *queue_depth_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
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
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_METRICS_H_
