#include "server/core/thread_pool.h"

#include <exception>

#include "server/core/contain.h"
#include "server/core/log.h"

namespace tlserve {

ThreadPool::ThreadPool(int threads, std::function<void()> on_start) {
  for (int i = 0; i < std::max(1, threads); ++i) {
    threads_.emplace_back([this, on_start] {
      if (on_start) on_start();
      WorkerLoop();
    });
  }
}

ThreadPool::~ThreadPool() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (auto& t : threads_) t.join();
}

void ThreadPool::Schedule(uint64_t lane, std::function<void()> fn) {
  absl::MutexLock lock(&mu_);
  auto& queue = lanes_[lane];
  if (queue.empty()) turns_.push_back(lane);
  queue.push_back(std::move(fn));
  ++queued_;
}

size_t ThreadPool::queued() const {
  absl::MutexLock lock(&mu_);
  return queued_;
}

void ThreadPool::WorkerLoop() {
  for (;;) {
    std::function<void()> fn;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](ThreadPool* p)
               ABSL_NO_THREAD_SAFETY_ANALYSIS { return p->stopping_ || !p->turns_.empty(); },
          this));
      if (turns_.empty()) return;
      const uint64_t lane = turns_.front();
      turns_.pop_front();
      auto it = lanes_.find(lane);
      fn = std::move(it->second.front());
      it->second.pop_front();
      if (it->second.empty()) {
        lanes_.erase(it);
      } else {
        turns_.push_back(lane);  // its next closure waits for the other lanes' turns
      }
      --queued_;
    }
    // The last line of defence: a closure that throws is a bug of its own
    // (closures contain their work), but it must not end the process.
    try {
      fn();
    } catch (const std::exception& e) {
      LogError("a worker's closure threw (a bug): %s", Bounded(e.what(), 200));
    } catch (...) {
      LogError("a worker's closure threw something that is not a std::exception (a bug)");
    }
  }
}

}  // namespace tlserve
