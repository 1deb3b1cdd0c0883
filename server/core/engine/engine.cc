#include "server/core/engine/engine.h"

#include <ATen/ATen.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <torch/nn/module.h>
#include <torch/script.h>

#include <algorithm>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "server/core/contain.h"
#include "server/core/log.h"
#include "server/core/metrics.h"
#include "server/core/preprocess.h"

namespace tlserve {

struct Engine::Resident {
  std::weak_ptr<const ServableVersion> version;
  std::optional<StagePlan> plan;  // the device copy; empty once dropped to the host copy
  int64_t bytes = 0;
  uint64_t last_use = 0;
};

// A launched batch: its items (the ones that did not run have their result
// already), their results (host copies started), and the fence after which
// the results are valid.
struct Engine::InFlight {
  std::vector<Queued> items;
  std::vector<absl::StatusOr<EngineResult>> results;
  std::unique_ptr<DeviceStreams::Fence> fence;
  at::Tensor host_buffer;  // a whole batch buffer, given back to the pool once delivered
  at::Tensor host_input;   // its first rows: alive until the fence (the device copy reads it)
};

absl::Time Engine::Queue::oldest() const {
  absl::Time t = absl::InfiniteFuture();
  for (const auto& [lane, items] : lanes) {
    if (!items.empty()) t = std::min(t, items.front().enqueued);
  }
  return t;
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const Backbone* backbone,
                                                       const Options& options, Metrics* metrics) {
  Options o = options;
  const bool cuda = backbone->torch_device().is_cuda();
  if (o.max_batch_size == 0) o.max_batch_size = cuda ? 256 : 32;
  if (o.max_batch_size < 1 || o.max_batch_size > 4096) {
    return absl::InvalidArgumentError("--max_batch_size must be in [1, 4096] (0: the default)");
  }
  if (o.max_queue_size == 0) o.max_queue_size = std::max(1024, 32 * o.max_batch_size);
  if (o.max_queue_size < o.max_batch_size) {
    return absl::InvalidArgumentError("--max_queue_size must be at least --max_batch_size");
  }
  if (o.max_queue_delay < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--max_queue_delay_us must not be negative");
  }
  if (o.device_memory_budget_bytes < 0) {
    return absl::InvalidArgumentError("--device_memory_budget_mb must not be negative");
  }
  if (o.in_flight < 1 || o.in_flight > 8) return absl::InvalidArgumentError("in_flight: 1 to 8");
  if (cuda) at::globalContext().setBenchmarkCuDNN(true);
  return std::unique_ptr<Engine>(new Engine(backbone, o, metrics));
}

Engine::Engine(const Backbone* backbone, const Options& options, Metrics* metrics)
    : backbone_(backbone),
      options_(options),
      metrics_(metrics),
      device_(std::make_unique<DeviceStreams>(backbone->torch_device())) {
  if (options_.device_memory_budget_bytes == 0) {
    // Half of what is free: the rest is for activations, cuDNN's workspace
    // and fine-tuning (whose prefix cache takes a quarter of this budget).
    options_.device_memory_budget_bytes = device_->FreeBytes() / 2;
  }
  const PreprocessSpec& p = backbone_->preprocess();
  const auto on = at::TensorOptions().device(backbone_->torch_device());
  mean_ = at::tensor({p.mean[0], p.mean[1], p.mean[2]}, on).view({3, 1, 1});
  std_ = at::tensor({p.std[0], p.std[1], p.std[2]}, on).view({3, 1, 1});
  LogInfo("device engine on %s: batches of up to %d images, %d in flight, %d MB for models",
          backbone_->device(), options_.max_batch_size, options_.in_flight,
          options_.device_memory_budget_bytes >> 20);
  launcher_ = std::thread([this] { LaunchLoop(); });
  completer_ = std::thread([this] { CompletionLoop(); });
}

Engine::~Engine() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  launcher_.join();
  completer_.join();
}

int Engine::queue_depth() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(queued_);
}

Engine::Counters Engine::counters() const {
  absl::MutexLock lock(&counters_mu_);
  return counters_;
}

absl::Status Engine::Submit(std::vector<Work> work) { return Enqueue(std::move(work), false); }

bool Engine::HasRoom(const size_t asked[2]) const {
  const size_t limit = static_cast<size_t>(options_.max_queue_size);
  return queued_by_[0] + asked[0] <= limit && queued_by_[1] + asked[1] <= limit;
}

absl::Status Engine::Enqueue(std::vector<Work> work, bool wait) {
  std::vector<Queued> items;
  items.reserve(work.size());
  const absl::Time now = absl::Now();
  for (size_t i = 0; i < work.size(); ++i) {
    Work& w = work[i];
    const at::Tensor& in = w.input;
    if (!in.defined() || in.dim() != 3 || !in.device().is_cpu() ||
        (in.scalar_type() != at::kByte && in.scalar_type() != at::kFloat)) {
      return absl::InvalidArgumentError(
          absl::StrCat("work[", i, "]: the input must be a uint8 or float32 C×H×W CPU tensor"));
    }
    Queued q;
    switch (w.output) {
      case Output::kEmbedding:
        q.prefix_end = w.spec.stage < 0 ? backbone_->head_index() : w.spec.stage + 1;
        break;
      case Output::kActivations:
        if (w.spec.stage < 0) {
          return absl::InvalidArgumentError(
              absl::StrCat("work[", i, "]: activations need a stage"));
        }
        q.prefix_end = w.spec.stage + 1;
        break;
      case Output::kClassification:
        if (!w.version || !w.version->plan.head()) {
          return absl::InvalidArgumentError(absl::StrCat("work[", i, "]: no model version"));
        }
        q.prefix_end = w.version->plan.prefix_end();
        break;
    }
    if (q.prefix_end > backbone_->head_index()) {
      return absl::InvalidArgumentError(absl::StrCat("work[", i, "]: no such stage"));
    }
    q.work = std::move(w);
    q.enqueued = now;
    items.push_back(std::move(q));
  }
  // Each priority has its own room: training never takes serving's.
  size_t asked[2] = {0, 0};
  for (const Queued& q : items) ++asked[static_cast<int>(q.work.priority)];
  const size_t limit = static_cast<size_t>(options_.max_queue_size);
  if (asked[0] > limit || asked[1] > limit) {
    return absl::ResourceExhaustedError(
        absl::StrCat(items.size(), " images at once, over --max_queue_size (", limit, ")"));
  }
  absl::MutexLock lock(&mu_);
  if (wait) {
    struct Args {
      Engine* e;
      const size_t* asked;
    } args{this, asked};
    mu_.Await(absl::Condition(
        +[](Args* a)
             ABSL_NO_THREAD_SAFETY_ANALYSIS { return a->e->stopping_ || a->e->HasRoom(a->asked); },
        &args));
  }
  if (stopping_) return absl::UnavailableError("the server is shutting down");
  if (!HasRoom(asked)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the device queue is full (", queued_, " of ", options_.max_queue_size, " images queued, ",
        items.size(), " more asked); retry later or raise --max_queue_size"));
  }
  for (Queued& q : items) {
    const at::Tensor& in = q.work.input;
    QueueKey key{static_cast<int>(q.work.priority), static_cast<int>(in.scalar_type()),
                 in.sizes().vec()};
    Queue& queue = queues_[key];
    queue.lanes[q.work.lane].push_back(std::move(q));
    ++queue.size;
    ++queued_;
    ++queued_by_[static_cast<int>(q.work.priority)];
  }
  if (metrics_) metrics_->queue_depth().Set(static_cast<double>(queued_));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<EngineResult>> Engine::Run(std::vector<Work> work) {
  struct State {
    absl::Mutex mu;
    std::vector<EngineResult> results;
    absl::Status error;
    size_t remaining = 0;
    absl::Notification all_done;
  };
  auto state = std::make_shared<State>();
  state->results.resize(work.size());
  state->remaining = work.size();
  if (work.empty()) return state->results;
  for (size_t i = 0; i < work.size(); ++i) {
    work[i].done = [state, i](absl::StatusOr<EngineResult> r) {
      absl::MutexLock lock(&state->mu);
      if (r.ok()) {
        state->results[i] = *std::move(r);
      } else if (state->error.ok()) {
        state->error = r.status();
      }
      if (--state->remaining == 0) state->all_done.Notify();
    };
  }
  // In batch-sized pieces, each waiting for room in its priority's queue.
  const size_t piece = static_cast<size_t>(options_.max_batch_size);
  size_t submitted = 0;
  for (size_t b = 0; b < work.size(); b += piece) {
    std::vector<Work> part(
        std::make_move_iterator(work.begin() + b),
        std::make_move_iterator(work.begin() + std::min(work.size(), b + piece)));
    const size_t n = part.size();
    if (absl::Status s = Enqueue(std::move(part), /*wait=*/true); !s.ok()) {
      // The pieces already queued finish on their own (their callbacks own
      // the state); this one and the rest never will.
      absl::MutexLock lock(&state->mu);
      state->remaining -= work.size() - submitted;
      if (state->remaining == 0) state->all_done.Notify();
      if (state->error.ok()) state->error = s;
      break;
    }
    submitted += n;
  }
  state->all_done.WaitForNotification();
  absl::MutexLock lock(&state->mu);
  if (!state->error.ok()) return state->error;
  return std::move(state->results);
}

Engine::Queue* Engine::ReadyQueue(absl::Time now, absl::Time* wake) {
  Queue* ready[2] = {nullptr, nullptr};  // by priority: the one with the oldest item
  absl::Time oldest[2] = {absl::InfiniteFuture(), absl::InfiniteFuture()};
  for (auto& [key, q] : queues_) {
    if (q.size == 0) continue;
    const absl::Time first = q.oldest();
    const absl::Time due = first + options_.max_queue_delay;
    const int p = std::get<0>(key);
    if (stopping_ || q.size >= static_cast<size_t>(options_.max_batch_size) || now >= due) {
      if (first < oldest[p]) {
        oldest[p] = first;
        ready[p] = &q;
      }
    } else {
      *wake = std::min(*wake, due);
    }
  }
  const int serving = static_cast<int>(Priority::kServing);
  const int training = static_cast<int>(Priority::kTraining);
  if (ready[serving] && (!ready[training] || serving_in_a_row_ < kTrainingShare - 1)) {
    ++serving_in_a_row_;
    return ready[serving];
  }
  serving_in_a_row_ = 0;
  return ready[training];
}

std::vector<Engine::Queued> Engine::TakeBatch(Queue& q) {
  std::vector<Queued> batch;
  auto it = q.lanes.lower_bound(q.next_lane);
  while (batch.size() < static_cast<size_t>(options_.max_batch_size) && q.size > 0) {
    if (it == q.lanes.end()) it = q.lanes.begin();
    --queued_by_[static_cast<int>(it->second.front().work.priority)];
    batch.push_back(std::move(it->second.front()));
    it->second.pop_front();
    --q.size;
    --queued_;
    it = it->second.empty() ? q.lanes.erase(it) : std::next(it);
  }
  q.next_lane = it == q.lanes.end() ? 0 : it->first;
  if (metrics_) metrics_->queue_depth().Set(static_cast<double>(queued_));
  return batch;
}

void Engine::LaunchLoop() {
  device_->BindCompute();
  if (options_.threads > 0) at::set_num_threads(options_.threads);
  uint64_t seen = 0;
  for (;;) {
    std::vector<Queued> batch;
    {
      absl::MutexLock lock(&mu_);
      for (;;) {
        if (stopping_ && queued_ == 0) break;
        absl::Time wake = absl::InfiniteFuture();
        if (Queue* q = ReadyQueue(absl::Now(), &wake)) {
          batch = TakeBatch(*q);
          for (auto it = queues_.begin(); it != queues_.end();) {
            it = it->second.size == 0 ? queues_.erase(it) : std::next(it);
          }
          break;
        }
        seen = queued_;
        struct Args {
          Engine* e;
          uint64_t seen;
        } args{this, seen};
        mu_.AwaitWithDeadline(absl::Condition(
                                  +[](Args* a) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                                    return a->e->stopping_ || a->e->queued_ != a->seen;
                                  },
                                  &args),
                              wake);
      }
    }
    if (batch.empty()) break;
    const absl::Time before = absl::Now();
    {
      absl::MutexLock lock(&done_mu_);
      struct Args {
        Engine* e;
      } args{this};
      done_mu_.Await(absl::Condition(
          +[](Args* a) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return a->e->in_flight_.size() < static_cast<size_t>(a->e->options_.in_flight);
          },
          &args));
    }
    const double waited = absl::ToDoubleSeconds(absl::Now() - before);
    if (metrics_) {
      metrics_->EngineBatch(static_cast<double>(batch.size()) / options_.max_batch_size, waited);
    }
    std::unique_ptr<InFlight> launched = Launch(std::move(batch));
    absl::MutexLock lock(&done_mu_);
    in_flight_.push_back(std::move(launched));
  }
  absl::MutexLock lock(&done_mu_);
  launch_done_ = true;
}

void Engine::CompletionLoop() {
  for (;;) {
    InFlight* f = nullptr;
    {
      absl::MutexLock lock(&done_mu_);
      done_mu_.Await(absl::Condition(
          +[](Engine* e)
               ABSL_NO_THREAD_SAFETY_ANALYSIS { return e->launch_done_ || !e->in_flight_.empty(); },
          this));
      if (in_flight_.empty()) return;  // launching is over and everything is delivered
      f = in_flight_.front().get();
    }
    absl::Status waited = Contain("the device failed the batch", [&]() -> absl::Status {
      if (f->fence) f->fence->Wait();
      return absl::OkStatus();
    });
    for (size_t i = 0; i < f->items.size(); ++i) {
      absl::StatusOr<EngineResult> r = waited.ok() ? std::move(f->results[i]) : waited;
      try {
        f->items[i].work.done(std::move(r));
      } catch (const std::exception& e) {
        LogError("an engine caller's completion threw: %s", Bounded(e.what(), 200));
      }
    }
    if (f->host_buffer.defined()) GiveBackHostBuffer(std::move(f->host_buffer));
    std::unique_ptr<InFlight> finished;  // destroyed unlocked: it may hold the last references
    absl::MutexLock lock(&done_mu_);
    finished = std::move(in_flight_.front());
    in_flight_.pop_front();
  }
}

at::Tensor Engine::TakeHostBuffer(const at::Tensor& like) {
  std::vector<int64_t> sizes = {options_.max_batch_size};
  sizes.insert(sizes.end(), like.sizes().begin(), like.sizes().end());
  {
    absl::MutexLock lock(&buffers_mu_);
    for (auto it = host_buffers_.begin(); it != host_buffers_.end(); ++it) {
      if (it->scalar_type() == like.scalar_type() && it->sizes().equals(sizes)) {
        at::Tensor buffer = std::move(*it);
        host_buffers_.erase(it);
        return buffer;
      }
    }
  }
  // A normal tensor, not an inference one: serving's batches (InferenceMode)
  // and training's (NoGradGuard) both reuse it.
  c10::InferenceMode normal(/*enabled=*/false);
  return device_->HostBuffer(sizes, like.scalar_type());
}

void Engine::GiveBackHostBuffer(at::Tensor buffer) {
  absl::MutexLock lock(&buffers_mu_);
  // Enough for the batches in flight and the one being formed, of the input
  // sizes in use; the oldest goes first beyond that.
  host_buffers_.push_back(std::move(buffer));
  while (host_buffers_.size() > static_cast<size_t>(2 * (options_.in_flight + 1))) {
    host_buffers_.erase(host_buffers_.begin());
  }
}

const StagePlan& Engine::Acquire(const std::shared_ptr<const ServableVersion>& version,
                                 const std::vector<const ServableVersion*>& pinned) {
  for (auto it = resident_.begin(); it != resident_.end();) {
    if (it->second->version.expired()) {
      if (it->second->plan) resident_bytes_ -= it->second->bytes;
      it = resident_.erase(it);
    } else {
      ++it;
    }
  }
  std::unique_ptr<Resident>& r = resident_[version.get()];
  if (!r) {
    r = std::make_unique<Resident>();
    r->version = version;
  }
  r->last_use = ++use_clock_;
  int evicted = 0;
  if (!r->plan) {
    const StagePlan& host = version->plan;
    if (backbone_->torch_device().is_cpu()) {
      r->plan = host;  // the host copy is what runs
    } else {
      StagePlan::Stages own;
      for (const auto& [i, module] : host.own()) {
        auto copy = std::make_shared<torch::jit::Module>(backbone_->OnDevice(*module, false));
        copy->eval();
        own[i] = std::move(copy);
      }
      auto head = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(host.head()->clone());
      head->to(backbone_->torch_device());
      head->eval();
      r->plan.emplace(*backbone_, std::move(own), torch::nn::Sequential(head),
                      host.feature_stage());
    }
    r->bytes = r->plan->bytes();
    resident_bytes_ += r->bytes;
    // Over the budget: the least recently used versions not in this batch
    // go back to their host copy.
    while (resident_bytes_ > options_.device_memory_budget_bytes) {
      Resident* lru = nullptr;
      for (auto& [key, other] : resident_) {
        if (!other->plan || other.get() == r.get() ||
            std::find(pinned.begin(), pinned.end(), key) != pinned.end()) {
          continue;
        }
        if (lru == nullptr || other->last_use < lru->last_use) lru = other.get();
      }
      if (lru == nullptr) break;  // this batch alone is over the budget: it runs anyway
      lru->plan.reset();
      resident_bytes_ -= lru->bytes;
      ++evicted;
      absl::MutexLock lock(&counters_mu_);
      ++counters_.evictions;
    }
  }
  int on_device = 0, on_host = 0;
  for (const auto& [key, other] : resident_) (other->plan ? on_device : on_host) += 1;
  {
    absl::MutexLock lock(&counters_mu_);
    counters_.resident = on_device;
    counters_.host = on_host;
  }
  if (metrics_) metrics_->SetResidency(on_device, on_host, resident_bytes_, evicted);
  return *r->plan;
}

std::unique_ptr<Engine::InFlight> Engine::Launch(std::vector<Queued> batch) {
  auto f = std::make_unique<InFlight>();
  f->results.resize(batch.size(), absl::InternalError("not computed"));
  f->items = std::move(batch);
  // Nothing a batch does may end the launch thread: whatever throws (a
  // caller's cancelled(), a CUDA error in a fence) fails that batch alone.
  try {
    Compute(f.get());
  } catch (...) {
    const absl::Status failed = StatusFromCurrentException("the batch failed");
    for (auto& r : f->results) r = failed;
    f->fence.reset();
  }
  return f;
}

void Engine::Compute(InFlight* f) {
  const absl::Time now = absl::Now();
  std::vector<size_t> live;
  for (size_t i = 0; i < f->items.size(); ++i) {
    const Work& w = f->items[i].work;
    if (metrics_) {
      metrics_->queue_seconds().Observe(absl::ToDoubleSeconds(now - f->items[i].enqueued));
    }
    if (w.cancelled && w.cancelled()) {
      f->results[i] = absl::CancelledError("the request was cancelled while queued");
    } else if (now > w.deadline) {
      f->results[i] = absl::DeadlineExceededError("the deadline passed while the image was queued");
    } else {
      live.push_back(i);
    }
  }
  if (live.empty()) return;
  const auto& items = f->items;
  // Rows in the order the shared stages leave them: the longest prefix
  // first, and within a prefix by what is computed next (a model, an
  // embedding spec), so that each group is one contiguous slice.
  auto group_of = [&](size_t i) {
    const Work& w = items[i].work;
    return std::make_tuple(-items[i].prefix_end, static_cast<int>(w.output),
                           reinterpret_cast<uintptr_t>(w.version.get()), w.top_k, w.spec.stage,
                           static_cast<int>(w.spec.pool), w.spec.normalize);
  };
  std::stable_sort(live.begin(), live.end(),
                   [&](size_t a, size_t b) { return group_of(a) < group_of(b); });
  const int64_t n = static_cast<int64_t>(live.size());
  const bool training = items[live[0]].work.priority == Priority::kTraining;

  std::optional<c10::InferenceMode> inference;
  std::optional<torch::NoGradGuard> no_grad;
  if (training) {
    no_grad.emplace();  // normal tensors: training may save them for backward
  } else {
    inference.emplace();
  }
  std::vector<at::Tensor> out(n);  // the prefix output each row left in
  // The shared stages fail the whole batch; a model's own part fails only
  // its rows (a damaged model never takes other tenants' images with it).
  absl::Status failed = Contain("the batch failed", [&]() -> absl::Status {
    const at::Tensor& first = items[live[0]].work.input;
    std::vector<int64_t> sizes = {n};
    sizes.insert(sizes.end(), first.sizes().begin(), first.sizes().end());
    f->host_buffer = TakeHostBuffer(first);
    f->host_input = f->host_buffer.narrow(0, 0, n);
    for (int64_t k = 0; k < n; ++k) f->host_input[k].copy_(items[live[k]].work.input);
    at::Tensor x = device_->ToDevice(f->host_input);
    if (x.scalar_type() == at::kByte) {
      // torchvision's ToTensor and Normalize, in their order of operations
      // (preprocess.h's Normalize), with mean and std already on the device.
      x = x.to(at::kFloat).div(255).sub(mean_).div(std_);
    }
    x = backbone_->ToDevice(x);

    // The shared stages, once for the whole batch; rows leave where their
    // prefix ends (they are sorted by it, longest first).
    auto rows_past = [&](int stage) {  // rows whose prefix runs past `stage`
      int64_t k = 0;
      while (k < n && items[live[k]].prefix_end > stage) ++k;
      return k;
    };
    auto keep = [&](int end, const at::Tensor& t) {  // t: the rows still running
      for (int64_t k = 0; k < t.size(0); ++k) {
        if (items[live[k]].prefix_end == end && !out[k].defined()) out[k] = t;
      }
    };
    const int max_end = items[live[0]].prefix_end;
    int64_t stage_images = 0;
    keep(0, x);
    for (int s = 0; s < max_end; ++s) {
      const int64_t running = rows_past(s);
      if (running < x.size(0)) x = x.narrow(0, 0, running);
      x = backbone_->Forward(x, s, s);
      stage_images += running;
      keep(s + 1, x);
    }
    if (max_end > 0 && metrics_) metrics_->EngineForward(training ? "train" : "prefix", n);
    {
      absl::MutexLock lock(&counters_mu_);
      ++counters_.batches;
      counters_.prefix_stage_images += stage_images;
      if (max_end > 0) {
        ++counters_.prefix_forwards;
        counters_.prefix_images += n;
      }
    }
    if (metrics_) metrics_->batch_size().Observe(static_cast<double>(n));
    return absl::OkStatus();
  });
  if (!failed.ok()) {
    for (size_t i : live) f->results[i] = failed;
    f->fence = device_->Record();
    return;
  }

  // Then each group on its slice: a model's private stages and head, or an
  // embedding's pooling, all on the device.
  std::vector<const ServableVersion*> pinned;
  for (size_t i : live) {
    if (items[i].work.version) pinned.push_back(items[i].work.version.get());
  }
  for (int64_t k = 0; k < n;) {
    int64_t e = k + 1;
    while (e < n && group_of(live[e]) == group_of(live[k])) ++e;
    // Rows k..e-1 share a prefix end: x was only ever cut from the end, so
    // row r of the batch is row r of the tensor its prefix left in.
    const Work& w = items[live[k]].work;
    const absl::Status group = Contain("the batch failed", [&]() -> absl::Status {
      const at::Tensor slice = out[k].narrow(0, k, e - k);
      switch (w.output) {
        case Output::kEmbedding: {
          const at::Tensor v = device_->ToHost(PoolEmbedding(slice, w.spec));
          for (int64_t r = k; r < e; ++r) f->results[live[r]] = EngineResult{v[r - k], {}};
          break;
        }
        case Output::kActivations: {
          for (int64_t r = k; r < e; ++r) f->results[live[r]] = EngineResult{slice[r - k], {}};
          break;
        }
        case Output::kClassification: {
          const StagePlan& plan = Acquire(w.version, pinned);
          // Calibrated: the version's temperature divides its logits.
          const at::Tensor probabilities =
              at::softmax(plan.Logits(slice) / w.version->calibration.temperature, 1);
          const int64_t classes = probabilities.size(1);
          const int64_t top = w.top_k <= 0 ? classes : std::min<int64_t>(w.top_k, classes);
          auto [values, indices] = probabilities.topk(top, 1);
          const at::Tensor hv = device_->ToHost(values), hi = device_->ToHost(indices);
          for (int64_t r = k; r < e; ++r) {
            f->results[live[r]] = EngineResult{hv[r - k], hi[r - k]};
          }
          absl::MutexLock lock(&counters_mu_);
          if (plan.first_private() < backbone_->head_index()) {
            ++counters_.private_forwards;
            counters_.private_images += e - k;
            if (metrics_) metrics_->EngineForward("private", e - k);
          }
          ++counters_.head_forwards;
          counters_.head_images += e - k;
          if (metrics_) metrics_->EngineForward("head", e - k);
          break;
        }
      }
      return absl::OkStatus();
    });
    if (!group.ok()) {
      for (int64_t r = k; r < e; ++r) f->results[live[r]] = group;
    }
    k = e;
  }
  f->fence = device_->Record();
}

void Engine::Warmup() {
  const int64_t crop = backbone_->preprocess().crop;
  std::vector<int> sizes;
  if (device_->cuda()) {
    // cuDNN's benchmark mode picks kernels per shape on first sight: the
    // powers of two up to the largest batch, then the largest itself.
    for (int b = 1; b < options_.max_batch_size; b *= 2) sizes.push_back(b);
  }
  // TorchScript's profiling executor records the first run and optimises on
  // the second: two full batches leave the first request nothing to pay.
  sizes.push_back(options_.max_batch_size);
  sizes.push_back(options_.max_batch_size);
  for (int b : sizes) {
    std::vector<Work> work(b);
    for (Work& w : work) w.input = at::zeros({3, crop, crop}, at::kByte);
    auto done = Run(std::move(work));
    if (!done.ok()) LogWarning("warm-up of a batch of %d failed: %s", b, done.status().ToString());
  }
}

}  // namespace tlserve
