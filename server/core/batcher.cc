#include "server/core/batcher.h"

#include <ATen/ATen.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"

namespace tlserve {

absl::StatusOr<std::unique_ptr<Batcher>> Batcher::Create(const Options& options, RunFn run,
                                                         Instruments instruments) {
  if (options.max_batch_size < 1 || options.max_batch_size > 4096) {
    return absl::InvalidArgumentError("max_batch_size must be in [1, 4096]");
  }
  if (options.max_queue_size < options.max_batch_size) {
    return absl::InvalidArgumentError("max_queue_size must be at least max_batch_size");
  }
  if (options.max_queue_delay < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("max_queue_delay must not be negative");
  }
  return std::unique_ptr<Batcher>(new Batcher(options, std::move(run), instruments));
}

Batcher::Batcher(const Options& options, RunFn run, Instruments instruments)
    : options_(options), run_(std::move(run)), instruments_(instruments) {
  worker_ = std::thread([this] { WorkerLoop(); });
}

Batcher::~Batcher() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  worker_.join();
}

int Batcher::queue_depth() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(queue_.size());
}

absl::Status Batcher::Submit(std::vector<Task> tasks) {
  const absl::Time now = absl::Now();
  absl::MutexLock lock(&mu_);
  if (stopping_) return absl::UnavailableError("the server is shutting down");
  if (queue_.size() + tasks.size() > static_cast<size_t>(options_.max_queue_size)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the batching queue is full (", queue_.size(), " of ", options_.max_queue_size,
        " images queued, ", tasks.size(), " more asked); retry later or raise --max_queue_size"));
  }
  for (Task& t : tasks) {
    std::string group = absl::StrCat(t.key, "|", absl::StrJoin(t.input.sizes(), "x"));
    queue_.push_back(Queued{std::move(t), std::move(group), now});
  }
  if (instruments_.queue_depth) instruments_.queue_depth->Set(static_cast<double>(queue_.size()));
  return absl::OkStatus();
}

bool Batcher::BatchReady(absl::Time now) const {
  if (queue_.empty()) return false;
  if (stopping_ || now >= queue_.front().enqueued + options_.max_queue_delay) return true;
  int same = 0;
  for (const Queued& q : queue_) {
    if (q.group == queue_.front().group && ++same >= options_.max_batch_size) return true;
  }
  return false;
}

std::vector<Batcher::Queued> Batcher::TakeBatch() {
  std::vector<Queued> batch;
  const std::string group = queue_.front().group;
  for (auto it = queue_.begin();
       it != queue_.end() && batch.size() < static_cast<size_t>(options_.max_batch_size);) {
    if (it->group == group) {
      batch.push_back(std::move(*it));
      it = queue_.erase(it);
    } else {
      ++it;
    }
  }
  if (instruments_.queue_depth) instruments_.queue_depth->Set(static_cast<double>(queue_.size()));
  return batch;
}

void Batcher::WorkerLoop() {
  for (;;) {
    std::vector<Queued> batch;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](Batcher* b)
               ABSL_NO_THREAD_SAFETY_ANALYSIS { return b->stopping_ || !b->queue_.empty(); },
          this));
      if (queue_.empty()) return;  // stopping, and everything is done
      // Wait for a full batch or the oldest input's delay, whichever is first.
      while (!BatchReady(absl::Now())) {
        const absl::Time until = queue_.front().enqueued + options_.max_queue_delay;
        mu_.AwaitWithDeadline(absl::Condition(
                                  +[](Batcher* b) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                                    return b->BatchReady(absl::Now());
                                  },
                                  this),
                              until);
      }
      batch = TakeBatch();
    }
    RunBatch(std::move(batch));
  }
}

void Batcher::RunBatch(std::vector<Queued> batch) {
  const absl::Time now = absl::Now();
  std::vector<Queued> live;
  for (Queued& q : batch) {
    if (instruments_.queue_seconds) {
      instruments_.queue_seconds->Observe(absl::ToDoubleSeconds(now - q.enqueued));
    }
    if (q.task.cancelled && q.task.cancelled()) {
      q.task.done(absl::CancelledError("the request was cancelled while queued"));
    } else if (now > q.task.deadline) {
      q.task.done(absl::DeadlineExceededError("the deadline passed while the image was queued"));
    } else {
      live.push_back(std::move(q));
    }
  }
  if (live.empty()) return;
  if (instruments_.batch_size) instruments_.batch_size->Observe(static_cast<double>(live.size()));
  std::vector<at::Tensor> inputs;
  inputs.reserve(live.size());
  for (const Queued& q : live) inputs.push_back(q.task.input);
  absl::StatusOr<at::Tensor> out;
  try {
    const RunFn& run = live.front().task.run ? live.front().task.run : run_;
    out = run ? run(live.front().task.key, at::stack(inputs))
              : absl::InternalError("the batcher has no function to run this batch");
  } catch (const std::exception& e) {
    out = absl::InternalError(absl::StrCat("batch of ", live.size(), " failed: ", e.what()));
  }
  for (size_t i = 0; i < live.size(); ++i) {
    if (out.ok()) {
      live[i].task.done(out->select(0, static_cast<int64_t>(i)));
    } else {
      live[i].task.done(out.status());
    }
  }
}

}  // namespace tlserve
