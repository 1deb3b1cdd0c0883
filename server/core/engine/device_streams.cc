#include "server/core/engine/device_streams.h"

#include <ATen/ATen.h>

#include <fstream>
#include <optional>
#include <string>

#ifdef TLSERVE_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace tlserve {
namespace {

class Done : public DeviceStreams::Fence {
 public:
  void Wait() override {}
};

#ifdef TLSERVE_WITH_CUDA
class CudaFence : public DeviceStreams::Fence {
 public:
  explicit CudaFence(const c10::cuda::CUDAStream& stream) { event_.record(stream); }
  void Wait() override { event_.synchronize(); }

 private:
  // Blocking: the completion thread sleeps instead of spinning on a core.
  at::cuda::CUDAEvent event_{cudaEventDisableTiming | cudaEventBlockingSync};
};
#endif

}  // namespace

struct DeviceStreams::Impl {
#ifdef TLSERVE_WITH_CUDA
  std::optional<c10::cuda::CUDAStream> compute, copy, training;
#endif
};

DeviceStreams::DeviceStreams(c10::Device device)
    : device_(device), impl_(std::make_unique<Impl>()) {
#ifdef TLSERVE_WITH_CUDA
  if (device_.is_cuda()) {
    impl_->compute = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device_.index());
    impl_->copy = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device_.index());
    impl_->training = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device_.index());
  }
#endif
}

DeviceStreams::~DeviceStreams() = default;

void DeviceStreams::BindCompute() const {
#ifdef TLSERVE_WITH_CUDA
  if (device_.is_cuda()) c10::cuda::setCurrentCUDAStream(*impl_->compute);
#endif
}

void DeviceStreams::BindTraining() const {
#ifdef TLSERVE_WITH_CUDA
  if (device_.is_cuda()) c10::cuda::setCurrentCUDAStream(*impl_->training);
#endif
}

at::Tensor DeviceStreams::HostBuffer(at::IntArrayRef sizes, at::ScalarType dtype) const {
  return at::empty(sizes, at::TensorOptions().dtype(dtype).pinned_memory(device_.is_cuda()));
}

at::Tensor DeviceStreams::ToDevice(const at::Tensor& host) const {
  if (!device_.is_cuda()) return host.to(device_);
#ifdef TLSERVE_WITH_CUDA
  at::Tensor on_device;
  {
    c10::cuda::CUDAStreamGuard guard(*impl_->copy);
    on_device = host.to(device_, /*non_blocking=*/true);
  }
  at::cuda::CUDAEvent copied;
  copied.record(*impl_->copy);
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device_.index());
  copied.block(current);
  // Allocated on the copy stream, used on the current one: the allocator
  // must not hand the memory out again before the current stream is done.
  c10::cuda::CUDACachingAllocator::recordStream(on_device.storage().data_ptr(), current);
  return on_device;
#else
  return host.to(device_);
#endif
}

at::Tensor DeviceStreams::ToHost(const at::Tensor& device) const {
  if (!device_.is_cuda()) return device.is_cpu() ? device : device.cpu();
  at::Tensor host = HostBuffer(device.sizes(), device.scalar_type());
  host.copy_(device, /*non_blocking=*/true);
  return host;
}

void DeviceStreams::UseOnCurrentStream(const at::Tensor& t) const {
#ifdef TLSERVE_WITH_CUDA
  if (device_.is_cuda() && t.defined() && t.is_cuda()) {
    c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(),
                                                  c10::cuda::getCurrentCUDAStream(device_.index()));
  }
#else
  (void)t;
#endif
}

std::unique_ptr<DeviceStreams::Fence> DeviceStreams::Record() const {
#ifdef TLSERVE_WITH_CUDA
  if (device_.is_cuda()) {
    return std::make_unique<CudaFence>(c10::cuda::getCurrentCUDAStream(device_.index()));
  }
#endif
  return std::make_unique<Done>();
}

int64_t DeviceStreams::FreeBytes() const {
#ifdef TLSERVE_WITH_CUDA
  if (device_.is_cuda()) {
    c10::cuda::CUDAGuard guard(device_.index());
    size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) == cudaSuccess) return static_cast<int64_t>(free);
    return 0;
  }
#endif
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (meminfo >> key >> kb >> unit) {
    if (key == "MemAvailable:") return kb * 1024 / 2;
  }
  return int64_t{1} << 30;
}

}  // namespace tlserve
