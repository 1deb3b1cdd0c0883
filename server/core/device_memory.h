// tlserve_device_memory_bytes{device,kind}, read at scrape time: the CUDA
// caching allocator's allocated and reserved bytes on a GPU, the process'
// resident memory on the CPU. Register it with the exposer.
#ifndef TLSERVE_SERVER_CORE_DEVICE_MEMORY_H_
#define TLSERVE_SERVER_CORE_DEVICE_MEMORY_H_

#include <prometheus/collectable.h>

#include <string>
#include <vector>

namespace tlserve {

class DeviceMemoryCollector : public prometheus::Collectable {
 public:
  explicit DeviceMemoryCollector(std::string device) : device_(std::move(device)) {}
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  const std::string device_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_DEVICE_MEMORY_H_
