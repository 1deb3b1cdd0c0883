// A fixed set of worker threads running closures off the gRPC threads (image
// decoding and preprocessing, upload checks). Fair by lane: closures of one
// lane run in FIFO order, and the lanes with work take turns, so a caller
// (a connection, say) that queues a thousand expensive images delays another
// caller's one image by one closure per worker, not by a thousand.
// Thread-safe. The destructor runs what is queued, then joins.
#ifndef TLSERVE_SERVER_CORE_THREAD_POOL_H_
#define TLSERVE_SERVER_CORE_THREAD_POOL_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace tlserve {

class ThreadPool {
 public:
  // `on_start` (may be empty) runs first on each worker thread, e.g. to
  // set the thread's LibTorch intra-op threads.
  explicit ThreadPool(int threads, std::function<void()> on_start = {});
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // On lane 0.
  void Schedule(std::function<void()> fn) { Schedule(0, std::move(fn)); }
  void Schedule(uint64_t lane, std::function<void()> fn);
  // Closures queued and not yet started.
  size_t queued() const;

 private:
  void WorkerLoop();

  mutable absl::Mutex mu_;
  std::map<uint64_t, std::deque<std::function<void()>>> lanes_ ABSL_GUARDED_BY(mu_);
  std::deque<uint64_t> turns_ ABSL_GUARDED_BY(mu_);  // lanes with work, each once
  size_t queued_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_THREAD_POOL_H_
