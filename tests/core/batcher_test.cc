#include "server/core/batcher.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <atomic>
#include <vector>

#include "absl/synchronization/notification.h"

namespace tlserve {
namespace {

// A batcher whose forward doubles its input and records batch sizes.
struct Recorder {
  absl::Mutex mu;
  std::vector<int64_t> sizes ABSL_GUARDED_BY(mu);
  std::vector<std::string> keys ABSL_GUARDED_BY(mu);
  absl::Notification* gate = nullptr;  // when set, the first batch waits on it

  Batcher::RunFn Fn() {
    return [this](const std::string& key, const at::Tensor& batch) -> absl::StatusOr<at::Tensor> {
      if (gate != nullptr) gate->WaitForNotification();
      absl::MutexLock lock(&mu);
      sizes.push_back(batch.size(0));
      keys.push_back(key);
      return batch * 2;
    };
  }
};

struct Results {
  absl::Mutex mu;
  std::vector<absl::StatusOr<at::Tensor>> got ABSL_GUARDED_BY(mu);
  int done ABSL_GUARDED_BY(mu) = 0;

  explicit Results(size_t n) : got(n, absl::UnknownError("not called")) {}
  std::function<void(absl::StatusOr<at::Tensor>)> At(size_t i) {
    return [this, i](absl::StatusOr<at::Tensor> v) {
      absl::MutexLock lock(&mu);
      got[i] = std::move(v);
      ++done;
    };
  }
  void WaitFor(int n) {
    absl::MutexLock lock(&mu);
    auto ready = [this, n]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return done >= n; };
    mu.Await(absl::Condition(&ready));
  }
};

Batcher::Task MakeTask(float value, std::function<void(absl::StatusOr<at::Tensor>)> done,
                       std::string key = "k") {
  Batcher::Task t;
  t.key = std::move(key);
  t.input = at::full({2}, value);
  t.done = std::move(done);
  return t;
}

TEST(BatcherTest, CreateValidatesOptions) {
  Recorder r;
  Batcher::Options o;
  o.max_batch_size = 0;
  EXPECT_EQ(Batcher::Create(o, r.Fn()).status().code(), absl::StatusCode::kInvalidArgument);
  o.max_batch_size = 8;
  o.max_queue_size = 4;
  EXPECT_EQ(Batcher::Create(o, r.Fn()).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(BatcherTest, BatchesConcurrentInputsAndReturnsEachItsRow) {
  Recorder r;
  Batcher::Options o;
  o.max_batch_size = 4;
  o.max_queue_delay = absl::Seconds(10);  // only a full batch may go
  auto b = Batcher::Create(o, r.Fn());
  ASSERT_TRUE(b.ok());
  Results res(8);
  for (int i = 0; i < 8; ++i) {
    std::vector<Batcher::Task> one;
    one.push_back(MakeTask(static_cast<float>(i), res.At(i)));
    ASSERT_TRUE((*b)->Submit(std::move(one)).ok());
  }
  res.WaitFor(8);
  absl::MutexLock lock(&r.mu);
  EXPECT_EQ(r.sizes, (std::vector<int64_t>{4, 4}));
  absl::MutexLock lock2(&res.mu);
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(res.got[i].ok()) << res.got[i].status();
    EXPECT_FLOAT_EQ(res.got[i]->select(0, 0).item<float>(), 2.0f * i);
  }
}

TEST(BatcherTest, RunsAPartialBatchAfterTheDelay) {
  Recorder r;
  Batcher::Options o;
  o.max_batch_size = 32;
  o.max_queue_delay = absl::Milliseconds(20);
  auto b = Batcher::Create(o, r.Fn());
  ASSERT_TRUE(b.ok());
  Results res(3);
  std::vector<Batcher::Task> tasks;
  for (int i = 0; i < 3; ++i) tasks.push_back(MakeTask(1, res.At(i)));
  ASSERT_TRUE((*b)->Submit(std::move(tasks)).ok());
  res.WaitFor(3);
  absl::MutexLock lock(&r.mu);
  EXPECT_EQ(r.sizes, (std::vector<int64_t>{3}));
}

TEST(BatcherTest, NeverMixesKeysOrShapesInOneBatch) {
  Recorder r;
  Batcher::Options o;
  o.max_batch_size = 8;
  o.max_queue_delay = absl::Milliseconds(5);
  auto b = Batcher::Create(o, r.Fn());
  ASSERT_TRUE(b.ok());
  Results res(5);
  std::vector<Batcher::Task> tasks;
  tasks.push_back(MakeTask(1, res.At(0), "a"));
  tasks.push_back(MakeTask(1, res.At(1), "b"));
  tasks.push_back(MakeTask(1, res.At(2), "a"));
  Batcher::Task odd = MakeTask(1, res.At(3), "a");
  odd.input = at::ones({3});
  tasks.push_back(std::move(odd));
  tasks.push_back(MakeTask(1, res.At(4), "b"));
  ASSERT_TRUE((*b)->Submit(std::move(tasks)).ok());
  res.WaitFor(5);
  absl::MutexLock lock(&r.mu);
  EXPECT_EQ(r.sizes, (std::vector<int64_t>{2, 2, 1}));
  EXPECT_EQ(r.keys, (std::vector<std::string>{"a", "b", "a"}));
}

TEST(BatcherTest, RejectsWhenQueueFull) {
  Recorder r;
  absl::Notification gate;
  r.gate = &gate;  // the worker holds the first batch, so the queue fills
  Batcher::Options o;
  o.max_batch_size = 1;
  o.max_queue_size = 2;
  o.max_queue_delay = absl::ZeroDuration();
  auto b = Batcher::Create(o, r.Fn());
  ASSERT_TRUE(b.ok());
  Results res(4);
  std::vector<Batcher::Task> first;
  first.push_back(MakeTask(1, res.At(0)));
  ASSERT_TRUE((*b)->Submit(std::move(first)).ok());
  while ((*b)->queue_depth() != 0) absl::SleepFor(absl::Milliseconds(1));  // taken by the worker
  std::vector<Batcher::Task> two;
  two.push_back(MakeTask(1, res.At(1)));
  two.push_back(MakeTask(1, res.At(2)));
  ASSERT_TRUE((*b)->Submit(std::move(two)).ok());
  std::vector<Batcher::Task> more;
  more.push_back(MakeTask(1, res.At(3)));
  const absl::Status full = (*b)->Submit(std::move(more));
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(full.message().find("--max_queue_size"), absl::string_view::npos);
  gate.Notify();
  res.WaitFor(3);
  absl::MutexLock lock(&res.mu);
  EXPECT_EQ(res.done, 3);  // the rejected task's callback is never called
}

TEST(BatcherTest, DropsCancelledAndExpiredInputsWithoutComputingThem) {
  Recorder r;
  absl::Notification gate;
  r.gate = &gate;
  Batcher::Options o;
  o.max_batch_size = 1;
  o.max_queue_delay = absl::ZeroDuration();
  auto b = Batcher::Create(o, r.Fn());
  ASSERT_TRUE(b.ok());
  Results res(3);
  std::atomic<bool> cancelled{false};
  std::vector<Batcher::Task> tasks;
  tasks.push_back(MakeTask(1, res.At(0)));
  Batcher::Task c = MakeTask(2, res.At(1));
  c.cancelled = [&cancelled] { return cancelled.load(); };
  tasks.push_back(std::move(c));
  Batcher::Task d = MakeTask(3, res.At(2));
  d.deadline = absl::Now() + absl::Milliseconds(10);
  tasks.push_back(std::move(d));
  ASSERT_TRUE((*b)->Submit(std::move(tasks)).ok());
  cancelled = true;
  absl::SleepFor(absl::Milliseconds(30));  // past the third task's deadline
  gate.Notify();
  res.WaitFor(3);
  absl::MutexLock lock(&res.mu);
  EXPECT_TRUE(res.got[0].ok());
  EXPECT_EQ(res.got[1].status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(res.got[2].status().code(), absl::StatusCode::kDeadlineExceeded);
  absl::MutexLock lock2(&r.mu);
  EXPECT_EQ(r.sizes.size(), 1u);  // only the live input was computed
}

TEST(BatcherTest, AFailingForwardFailsEveryInputOfTheBatch) {
  Batcher::Options o;
  o.max_batch_size = 2;
  o.max_queue_delay = absl::Seconds(10);
  auto b =
      Batcher::Create(o, [](const std::string&, const at::Tensor&) -> absl::StatusOr<at::Tensor> {
        throw std::runtime_error("device fell over");
      });
  ASSERT_TRUE(b.ok());
  Results res(2);
  std::vector<Batcher::Task> tasks;
  tasks.push_back(MakeTask(1, res.At(0)));
  tasks.push_back(MakeTask(1, res.At(1)));
  ASSERT_TRUE((*b)->Submit(std::move(tasks)).ok());
  res.WaitFor(2);
  absl::MutexLock lock(&res.mu);
  for (const auto& g : res.got) {
    EXPECT_EQ(g.status().code(), absl::StatusCode::kInternal);
    EXPECT_NE(g.status().message().find("device fell over"), absl::string_view::npos);
  }
}

TEST(BatcherTest, DestructionFinishesQueuedWork) {
  Recorder r;
  Results res(5);
  {
    Batcher::Options o;
    o.max_batch_size = 2;
    o.max_queue_delay = absl::Seconds(10);
    auto b = Batcher::Create(o, r.Fn());
    ASSERT_TRUE(b.ok());
    std::vector<Batcher::Task> tasks;
    for (int i = 0; i < 5; ++i) tasks.push_back(MakeTask(1, res.At(i)));
    ASSERT_TRUE((*b)->Submit(std::move(tasks)).ok());
  }
  absl::MutexLock lock(&res.mu);
  EXPECT_EQ(res.done, 5);
}

}  // namespace
}  // namespace tlserve
