// The device engine: the only code that runs modules on the device. Every
// forward pass of serving (Embed, Classify) and of training (features for
// head-only jobs, the frozen prefix of fine-tuning) is a piece of Work
// submitted here; fine-tuning's backward runs on the job's own thread, on
// the same device, at a lower priority (see JobRunner).
//
// Batching, in the style of TF Serving's SharedBatchScheduler: queues are
// keyed by priority and by the input a batch starts from (dtype and shape),
// not by model. Every image of every tenant that starts from the same input
// rides in the same batch: the engine runs the backbone's shared stages once
// for the whole batch, rows leaving where their shared prefix ends (an Embed
// of `layer2` leaves after layer2; a model with a private `layer4` after
// layer3; an Embed of the embedding and every head-only model at the end),
// then each model's private stages on its slice, then every head, with
// softmax and top-k on the device; only the top-k (or the pooled vector)
// comes back to the host. Within a queue, callers' lanes take turns, so one
// tenant's thousand images do not hold back another's one (no head-of-line
// blocking). Serving queues go first; training batches run when no serving
// batch is ready (and at least one in every kTrainingShare batches, so that
// training cannot starve).
//
// The device path: the launch thread forms a batch, stacks its uint8 images
// (pinned host memory on CUDA), copies it to the device (asynchronously, on
// a copy stream, on CUDA), converts and normalises it there (dtype,
// channels_last), runs it, and starts the copy of its results back; a
// completion thread waits for those and calls each caller's `done`, never
// the launch thread. Up to `in_flight` batches are in flight. On the CPU
// the same code runs without streams.
//
// Residency: the private stages and heads of model versions are copied to
// the device in the backbone's dtype when first used and kept within
// --device_memory_budget_mb; the least recently used are dropped back to
// their host copy (ServableVersion::plan) and brought back on use.
//
// Thread-safe.
#ifndef TLSERVE_SERVER_CORE_ENGINE_ENGINE_H_
#define TLSERVE_SERVER_CORE_ENGINE_ENGINE_H_

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/core/backbone.h"
#include "server/core/engine/device_streams.h"
#include "server/core/engine/servable.h"

namespace tlserve {

class Metrics;

// What the engine gives back for one image.
struct EngineResult {
  // kEmbedding: the vector (float32, CPU). kClassification: the top-k
  // probabilities, highest first (float32, CPU). kActivations: the stage's
  // output (one image, on the device, the backbone's dtype).
  at::Tensor values;
  at::Tensor indices;  // kClassification: the top-k class indices (int64, CPU)
};

class Engine {
 public:
  struct Options {
    int max_batch_size = 0;  // 0: 256 on CUDA, 32 on the CPU
    absl::Duration max_queue_delay = absl::Microseconds(2000);
    int max_queue_size = 0;  // 0: 32 × max_batch_size, at least 1024
    int64_t device_memory_budget_bytes =
        0;              // 0: 80% of free device memory (CPU: of MemAvailable / 2)
    int threads = 0;    // intra-op threads of the launch thread; 0 keeps
    int in_flight = 2;  // batches launched and not yet delivered
  };
  enum class Priority { kServing, kTraining };
  enum class Output { kEmbedding, kActivations, kClassification };
  // Training gets at least one batch in this many when both are ready.
  static constexpr int kTrainingShare = 4;

  struct Work {
    // uint8 3×H×W (normalised on the device) or float32 3×H×W (already
    // preprocessed), on the CPU.
    at::Tensor input;
    Output output = Output::kEmbedding;
    // kEmbedding: what to compute. kActivations: spec.stage's output,
    // unpooled, left on the device (pool and normalize are ignored).
    EmbedSpec spec;
    std::shared_ptr<const ServableVersion> version;  // kClassification
    int top_k = 0;                                   // kClassification; 0: every class
    Priority priority = Priority::kServing;
    uint64_t lane = 0;  // the caller (connection, job): lanes take turns
    absl::Time deadline = absl::InfiniteFuture();
    std::function<bool()> cancelled;  // may be empty; polled before the batch runs
    std::function<void(absl::StatusOr<EngineResult>)> done;
  };

  // What the engine has done (for tests and metrics).
  struct Counters {
    int64_t batches = 0;
    int64_t prefix_forwards = 0, prefix_images = 0;  // the shared stages, once per batch
    int64_t prefix_stage_images = 0;  // images through each shared stage, summed over stages
    int64_t private_forwards = 0, private_images = 0;  // a model's private stages on its slice
    int64_t head_forwards = 0, head_images = 0;        // a model's head on its slice
    int64_t evictions = 0;
    int resident = 0, host = 0;  // versions on the device / dropped to their host copy
  };

  // INVALID_ARGUMENT for options out of range.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const Backbone* backbone,
                                                        const Options& options, Metrics* metrics);
  // Finishes what is queued, then stops.
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues all or none: RESOURCE_EXHAUSTED when they do not fit (each
  // priority has --max_queue_size images of room), UNAVAILABLE once stopping, INVALID_ARGUMENT for
  // work that names nothing to compute. On error no `done` is called. Each `done` is called exactly
  // once, from the completion thread.
  absl::Status Submit(std::vector<Work> work);
  // Submits in batch-sized pieces, each waiting for room in its queue (never
  // RESOURCE_EXHAUSTED), and waits for every result (a job's thread); the
  // first failure is returned.
  absl::StatusOr<std::vector<EngineResult>> Run(std::vector<Work> work);

  // Forwards of the batch sizes used, so that the first requests are not
  // slow (and, on CUDA, cuDNN's benchmark mode has chosen its kernels).
  void Warmup();

  const Backbone& backbone() const { return *backbone_; }
  const DeviceStreams& streams() const { return *device_; }
  int max_batch_size() const { return options_.max_batch_size; }
  int max_queue_size() const { return options_.max_queue_size; }
  int64_t device_memory_budget_bytes() const { return options_.device_memory_budget_bytes; }
  int queue_depth() const;
  Counters counters() const;

 private:
  struct Queued {
    Work work;
    absl::Time enqueued;
    int prefix_end = 0;  // rows run the shared stages [0, prefix_end)
  };
  // Work of one priority starting from one input (dtype, shape), by lane.
  struct Queue {
    std::map<uint64_t, std::deque<Queued>> lanes;
    uint64_t next_lane = 0;  // round-robin cursor
    size_t size = 0;
    absl::Time oldest() const;
  };
  using QueueKey = std::tuple<int, int, std::vector<int64_t>>;  // priority, dtype, shape
  struct Resident;
  struct InFlight;

  Engine(const Backbone* backbone, const Options& options, Metrics* metrics);
  // Submit; with `wait`, waits for room in each priority's queue instead of
  // failing with RESOURCE_EXHAUSTED.
  absl::Status Enqueue(std::vector<Work> work, bool wait);
  bool HasRoom(const size_t asked[2]) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void LaunchLoop();
  void CompletionLoop();
  // The queue whose batch should run now, if any (serving first).
  Queue* ReadyQueue(absl::Time now, absl::Time* wake) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<Queued> TakeBatch(Queue& q) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::unique_ptr<InFlight> Launch(std::vector<Queued> batch);
  void Compute(InFlight* f);  // Launch's work; may throw
  // The device copy of a version's plan, made or refreshed (LRU).
  const StagePlan& Acquire(const std::shared_ptr<const ServableVersion>& version,
                           const std::vector<const ServableVersion*>& pinned);
  // Batch buffers in host memory (pinned on CUDA) of max_batch_size rows,
  // reused: allocated once per input size in use, not per batch.
  at::Tensor TakeHostBuffer(const at::Tensor& like);
  void GiveBackHostBuffer(at::Tensor buffer);

  const Backbone* backbone_;
  Options options_;
  Metrics* metrics_;
  std::unique_ptr<DeviceStreams> device_;
  at::Tensor mean_, std_;  // the preprocessing's, 3×1×1 on the device

  mutable absl::Mutex mu_;
  std::map<QueueKey, Queue> queues_ ABSL_GUARDED_BY(mu_);
  size_t queued_ ABSL_GUARDED_BY(mu_) = 0;
  size_t queued_by_[2] ABSL_GUARDED_BY(mu_) = {0, 0};  // by priority; each up to max_queue_size
  int serving_in_a_row_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;

  mutable absl::Mutex done_mu_;
  std::deque<std::unique_ptr<InFlight>> in_flight_ ABSL_GUARDED_BY(done_mu_);
  bool launch_done_ ABSL_GUARDED_BY(done_mu_) = false;

  // Launch thread only.
  std::map<const ServableVersion*, std::unique_ptr<Resident>> resident_;
  int64_t resident_bytes_ = 0;
  uint64_t use_clock_ = 0;

  absl::Mutex buffers_mu_;
  std::vector<at::Tensor> host_buffers_ ABSL_GUARDED_BY(buffers_mu_);

  mutable absl::Mutex counters_mu_;
  Counters counters_ ABSL_GUARDED_BY(counters_mu_);

  std::thread launcher_, completer_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_ENGINE_ENGINE_H_
