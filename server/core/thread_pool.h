// A fixed set of worker threads running closures in FIFO order: image
// decoding and preprocessing run here, off the gRPC threads. Thread-safe.
// The destructor runs what is queued, then joins.
#ifndef TLSERVE_SERVER_CORE_THREAD_POOL_H_
#define TLSERVE_SERVER_CORE_THREAD_POOL_H_

#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace tlserve {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  void Schedule(std::function<void()> fn);

 private:
  void WorkerLoop();

  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_THREAD_POOL_H_
