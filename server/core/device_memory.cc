#include "server/core/device_memory.h"

#include <prometheus/client_metric.h>
#include <prometheus/metric_family.h>
#include <prometheus/metric_type.h>
#include <unistd.h>

#include <fstream>

#ifdef TLSERVE_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace tlserve {
namespace {

prometheus::ClientMetric Sample(const std::string& device, const std::string& kind, double v) {
  prometheus::ClientMetric m;
  m.label = {{"device", device}, {"kind", kind}};
  m.gauge.value = v;
  return m;
}

}  // namespace

std::vector<prometheus::MetricFamily> DeviceMemoryCollector::Collect() const {
  prometheus::MetricFamily family;
  family.name = "tlserve_device_memory_bytes";
  family.help = "Memory in use on the device: allocator bytes on CUDA, resident bytes on the CPU.";
  family.type = prometheus::MetricType::Gauge;
  if (device_.rfind("cuda", 0) == 0) {
#ifdef TLSERVE_WITH_CUDA
    const auto colon = device_.find(':');
    const int index = colon == std::string::npos ? 0 : std::stoi(device_.substr(colon + 1));
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(index);
    family.metric.push_back(
        Sample(device_, "allocated", static_cast<double>(stats.allocated_bytes[0].current)));
    family.metric.push_back(
        Sample(device_, "reserved", static_cast<double>(stats.reserved_bytes[0].current)));
#endif
  } else {
    long pages = 0, resident = 0;
    std::ifstream statm("/proc/self/statm");
    if (statm >> pages >> resident) {
      family.metric.push_back(
          Sample(device_, "resident", static_cast<double>(resident) * sysconf(_SC_PAGESIZE)));
    }
  }
  return {family};
}

}  // namespace tlserve
