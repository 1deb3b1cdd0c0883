// The device's streams and host buffers, as the device engine and training
// use them. On CUDA: a high-priority compute stream for the engine, a copy
// stream for host-to-device copies, a low-priority stream for training,
// pinned host buffers, and fences (events) that the completion thread waits
// on. On the CPU every method does the plain synchronous thing, so the
// engine's code is the same for both.
//
// The CUDA half is compiled only where LibTorch has CUDA (TLSERVE_WITH_CUDA)
// and chosen at run time by the backbone's device. Thread-safe.
#ifndef TLSERVE_SERVER_CORE_ENGINE_DEVICE_STREAMS_H_
#define TLSERVE_SERVER_CORE_ENGINE_DEVICE_STREAMS_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>

namespace tlserve {

class DeviceStreams {
 public:
  // Something queued on the device that a host thread can wait for.
  class Fence {
   public:
    virtual ~Fence() = default;
    virtual void Wait() = 0;
  };

  explicit DeviceStreams(c10::Device device);
  ~DeviceStreams();
  DeviceStreams(const DeviceStreams&) = delete;
  DeviceStreams& operator=(const DeviceStreams&) = delete;

  bool cuda() const { return device_.is_cuda(); }
  const c10::Device& device() const { return device_; }

  // Makes the calling thread's current stream the engine's compute stream
  // (the launch thread) or the training stream (a job's thread).
  void BindCompute() const;
  void BindTraining() const;

  // A host tensor to stack a batch into: pinned on CUDA.
  at::Tensor HostBuffer(at::IntArrayRef sizes, at::ScalarType dtype) const;
  // A host batch on the device: on CUDA copied asynchronously on the copy
  // stream, the compute stream waiting for it. `host` must live until the
  // next fence of the compute stream has passed.
  at::Tensor ToDevice(const at::Tensor& host) const;
  // Starts the copy of a device tensor into host memory on the current
  // stream (pinned, asynchronous on CUDA); valid once a later fence passed.
  at::Tensor ToHost(const at::Tensor& device) const;
  // Marks a device tensor made on another stream (the engine's) as used on
  // the calling thread's stream, so that the allocator does not hand its
  // memory out again before this stream is done with it. CPU: nothing.
  void UseOnCurrentStream(const at::Tensor& t) const;
  // A fence after everything queued so far on the calling thread's stream.
  std::unique_ptr<Fence> Record() const;

  // Free device memory at start, for the default residency budget: CUDA's
  // free memory, or on the CPU half of MemAvailable.
  int64_t FreeBytes() const;

 private:
  struct Impl;
  const c10::Device device_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_ENGINE_DEVICE_STREAMS_H_
