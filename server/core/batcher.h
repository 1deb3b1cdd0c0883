// Dynamic batching: single inputs submitted concurrently are stacked into one
// forward, up to `max_batch_size` inputs or until the oldest has waited
// `max_queue_delay`, whichever comes first. Inputs batch together only when
// their key and shape agree. The queue is bounded. An input whose deadline has
// passed, or whose caller gave up, while it queued is dropped uncomputed.
//
// Thread-safe. One worker thread runs the batches in order (one device).
// `done` callbacks run on that thread and must not block.
#ifndef TLSERVE_SERVER_CORE_BATCHER_H_
#define TLSERVE_SERVER_CORE_BATCHER_H_

#include <ATen/core/Tensor.h>

#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace prometheus {
class Gauge;
class Histogram;
}  // namespace prometheus

namespace tlserve {

// Optional instruments of a Batcher; null members are skipped.
struct BatcherInstruments {
  prometheus::Histogram* batch_size = nullptr;
  prometheus::Histogram* queue_seconds = nullptr;
  prometheus::Gauge* queue_depth = nullptr;
};

class Batcher {
 public:
  struct Options {
    int max_batch_size = 32;
    absl::Duration max_queue_delay = absl::Microseconds(2000);
    int max_queue_size = 1024;
  };
  using Instruments = BatcherInstruments;
  // Computes a batch: `batch` is the inputs stacked on a new dim 0; the
  // result has one row per input, in order.
  using RunFn =
      std::function<absl::StatusOr<at::Tensor>(const std::string& key, const at::Tensor& batch)>;

  struct Task {
    std::string key;
    at::Tensor input;
    absl::Time deadline = absl::InfiniteFuture();
    std::function<bool()> cancelled;  // may be empty
    std::function<void(absl::StatusOr<at::Tensor>)> done;
    // Computes this task's batch instead of the batcher's RunFn; tasks with
    // the same key must compute the same thing.
    RunFn run;
  };

  // INVALID_ARGUMENT for options out of range.
  static absl::StatusOr<std::unique_ptr<Batcher>> Create(const Options& options, RunFn run,
                                                         Instruments instruments = {});
  // Finishes what is queued, then stops the worker.
  ~Batcher();
  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  // Queues all tasks or none: RESOURCE_EXHAUSTED when they do not fit,
  // UNAVAILABLE once stopping. On error no `done` is called.
  absl::Status Submit(std::vector<Task> tasks);

  int queue_depth() const;

 private:
  struct Queued {
    Task task;
    std::string group;  // key + shape
    absl::Time enqueued;
  };
  Batcher(const Options& options, RunFn run, Instruments instruments);
  void WorkerLoop();
  bool BatchReady(absl::Time now) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<Queued> TakeBatch() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RunBatch(std::vector<Queued> batch);

  const Options options_;
  const RunFn run_;
  const Instruments instruments_;
  mutable absl::Mutex mu_;
  std::deque<Queued> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread worker_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_BATCHER_H_
