#include "server/core/metrics.h"

namespace tlserve {
namespace {

prometheus::Histogram::BucketBoundaries Exponential(double start, double factor, int count) {
  prometheus::Histogram::BucketBoundaries b;
  for (double v = start; count-- > 0; v *= factor) b.push_back(v);
  return b;
}

}  // namespace

Metrics::Metrics() : registry_(std::make_shared<prometheus::Registry>()) {
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

void Metrics::SetBackboneInfo(const std::string& name, const std::string& device,
                              const std::string& dtype, bool pretrained) {
  backbone_info_
      ->Add({{"name", name},
             {"device", device},
             {"dtype", dtype},
             {"pretrained", pretrained ? "true" : "false"}})
      .Set(1);
}

}  // namespace tlserve
