// The device engine in a live server: a job that fails in its forward fails
// alone (the server keeps serving and trains again), Embed and Classify keep
// answering while a fine-tune runs, and the engine's metrics are exported.
#include <grpcpp/client_context.h>
#include <gtest/gtest.h>

#include <atomic>
#include <stdexcept>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "tests/integration/http_get.h"
#include "tests/integration/training_fixture.h"

namespace tlserve {
namespace {

using testing::Fixture;
using testing::Folder;

class EngineServerTest : public testing::TrainingTest {
 protected:
  ServerOptions Options(const std::string& dir) override {
    ServerOptions o = TrainingTest::Options(dir);
    // Thrown from inside the job's training step, as a CUDA error or an
    // out-of-memory in its forward would be.
    o.before_training_step = [this](const std::string& model) {
      if (model == "doomed" && fail_) throw std::runtime_error("injected failure in the forward");
    };
    return o;
  }
  v1::Job WaitFor(const std::string& id, const std::function<bool(const v1::Job&)>& until) {
    v1::Job j;
    for (int i = 0; i < 600; ++i) {
      j = GetJob(id);
      if (until(j)) break;
      absl::SleepFor(absl::Milliseconds(100));
    }
    return j;
  }
  std::atomic<bool> fail_{false};
};

bool Final(const v1::Job& j) {
  return j.state() == v1::Job::SUCCEEDED || j.state() == v1::Job::FAILED ||
         j.state() == v1::Job::CANCELLED;
}

TEST_F(EngineServerTest, AJobThatThrowsInItsForwardFailsAloneAndTheServerTrainsAgain) {
  UploadTrainingSet();
  ASSERT_TRUE(CreateModel("doomed", "fmnist").ok());
  ASSERT_TRUE(Unfreeze("doomed", {"layer4"}).ok());
  fail_ = true;
  v1::TrainingOptions o;
  o.set_epochs(1);
  auto job = Start("doomed", "fmnist", o);
  ASSERT_TRUE(job.ok()) << job.status();
  const v1::Job failed = Watch(job->id()).back();
  EXPECT_EQ(failed.state(), v1::Job::FAILED);
  EXPECT_TRUE(absl::StrContains(failed.error(), "injected failure in the forward"))
      << failed.error();

  // The server still serves...
  const auto test = Folder(Fixture("fmnist/test"));
  EXPECT_FALSE(EmbedValues(test[0].first).empty());
  // ...and the same model trains again.
  fail_ = false;
  auto again = Start("doomed", "fmnist", o);
  ASSERT_TRUE(again.ok()) << again.status();
  const v1::Job done = Watch(again->id()).back();
  ASSERT_EQ(done.state(), v1::Job::SUCCEEDED) << done.error();
  auto r = Classify("doomed", {test[0].first});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->results(0).top_size(), 2);
}

TEST_F(EngineServerTest, EmbedAndClassifyAnswerWhileAFineTuneRuns) {
  UploadTrainingSet();
  ASSERT_TRUE(CreateModel("served", "fmnist").ok());
  auto head = Start("served", "fmnist");
  ASSERT_TRUE(head.ok()) << head.status();
  ASSERT_EQ(Watch(head->id()).back().state(), v1::Job::SUCCEEDED);

  ASSERT_TRUE(CreateModel("tuned", "fmnist").ok());
  ASSERT_TRUE(Unfreeze("tuned", {"layer4"}).ok());
  v1::TrainingOptions o;
  o.set_epochs(200);  // longer than the test: cancelled at the end
  auto job = Start("tuned", "fmnist", o);
  ASSERT_TRUE(job.ok()) << job.status();
  const v1::Job running = WaitFor(job->id(), [](const v1::Job& j) {
    return Final(j) || absl::StrContains(j.phase(), "epoch");
  });
  ASSERT_EQ(running.state(), v1::Job::RUNNING) << running.phase() << " " << running.error();

  // Bounded, not timed: each call gets a generous deadline and must answer
  // while the job is still running.
  const auto test = Folder(Fixture("fmnist/test"));
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(EmbedValues(test[i].first).size(), 512u) << "Embed " << i;
    auto r = Classify("served", {test[i].first});
    ASSERT_TRUE(r.ok()) << "Classify " << i << ": " << r.status();
  }
  EXPECT_EQ(GetJob(job->id()).state(), v1::Job::RUNNING);

  grpc::ClientContext ctx;
  v1::CancelJobRequest cancel;
  cancel.set_id(job->id());
  v1::Job cancelled;
  ASSERT_TRUE(stub_->CancelJob(&ctx, cancel, &cancelled).ok());
  EXPECT_EQ(WaitFor(job->id(), Final).state(), v1::Job::CANCELLED);
}

TEST_F(EngineServerTest, ExportsTheEnginesMetrics) {
  UploadTrainingSet();
  ASSERT_TRUE(CreateModel("clothes", "fmnist").ok());
  auto job = Start("clothes", "fmnist");
  ASSERT_TRUE(job.ok()) << job.status();
  ASSERT_EQ(Watch(job->id()).back().state(), v1::Job::SUCCEEDED);
  const auto test = Folder(Fixture("fmnist/test"));
  ASSERT_TRUE(Classify("clothes", {test[0].first, test[1].first}).ok());
  EXPECT_FALSE(EmbedValues(test[0].first).empty());
  const std::string metrics = testing::HttpGet(server_->metrics_port(), "/metrics");
  for (const char* want :
       {"tlserve_engine_forwards_total{queue=\"prefix\"}",
        "tlserve_engine_forwards_total{queue=\"head\"}",
        "tlserve_engine_forwards_total{queue=\"train\"}",
        "tlserve_engine_images_total{queue=\"head\"} 2", "tlserve_engine_batch_fill_count",
        "tlserve_engine_device_wait_seconds_count", "tlserve_model_residency{state=\"device\"} 1",
        "tlserve_model_evictions_total 0"}) {
    EXPECT_TRUE(absl::StrContains(metrics, want)) << want;
  }
}

}  // namespace
}  // namespace tlserve
