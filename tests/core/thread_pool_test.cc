#include "server/core/thread_pool.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <new>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

namespace tlserve {
namespace {

// Finding 7 of the hardening issue: one request of 256 costly images stalled
// everyone else's, because all images shared one FIFO.
TEST(ThreadPoolTest, LanesTakeTurnsSoOneCallerCannotStallAnother) {
  ThreadPool pool(1);
  absl::Notification release;
  absl::Mutex mu;
  std::vector<int> order;
  pool.Schedule(1, [&] { release.WaitForNotification(); });  // holds the only worker
  for (int i = 0; i < 100; ++i) {
    pool.Schedule(1, [&, i] {
      absl::MutexLock lock(&mu);
      order.push_back(i);
    });
  }
  absl::Notification other_done;
  pool.Schedule(2, [&] {
    absl::MutexLock lock(&mu);
    order.push_back(-1);
    other_done.Notify();
  });
  EXPECT_GE(pool.queued(), 101u);  // the blocker may or may not have started
  release.Notify();
  other_done.WaitForNotification();
  pool.~ThreadPool();  // drains lane 1
  new (&pool) ThreadPool(1);
  absl::MutexLock lock(&mu);
  ASSERT_EQ(order.size(), 101u);
  // Lane 1 had the turn when lane 2 arrived; lane 2 went next, after at most
  // one more of lane 1's hundred.
  const auto other = std::find(order.begin(), order.end(), -1) - order.begin();
  EXPECT_LE(other, 1) << "lane 2 waited for " << other << " closures of lane 1";
}

TEST(ThreadPoolTest, RunsEveryClosureOfALaneInOrderAndDrainsOnDestruction) {
  std::vector<int> order;
  {
    ThreadPool pool(1);
    for (int i = 0; i < 50; ++i) pool.Schedule(7, [&order, i] { order.push_back(i); });
  }
  ASSERT_EQ(order.size(), 50u);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(order[i], i);
}

}  // namespace
}  // namespace tlserve
