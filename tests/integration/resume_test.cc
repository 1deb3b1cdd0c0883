// Jobs that survive restarts: a job interrupted by a server stop resumes
// from its last epoch's checkpoint, ends with as many epochs as an
// uninterrupted run and a model as good; with resume_after_restart off it
// fails as "interrupted"; checkpoints go when jobs end. (crash_test.cc does
// the same with kill -9.)
#include <grpcpp/client_context.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "client/lib/client.h"
#include "server/api/server.h"
#include "tests/integration/loopback_options.h"
#include "tests/integration/test_env.h"
#include "tests/integration/training_fixture.h"
#include "tests/test_util.h"
#include "tlserve/v1/models.grpc.pb.h"

namespace tlserve {
namespace {

std::atomic<int> steps{0};  // fine-tuning steps taken (all servers of a test)

class ResumeTest : public testing::TrainingTest {
 protected:
  // Fine-tuning steps counted and slowed down, so that a restart lands mid-run.
  ServerOptions Options(const std::string& data_dir) override {
    ServerOptions o = TrainingTest::Options(data_dir);
    o.before_training_step = [](const std::string&) {
      ++steps;
      std::this_thread::sleep_for(std::chrono::milliseconds(150));
    };
    return o;
  }
  v1::TrainingOptions FineTuning() {
    v1::TrainingOptions o;
    o.set_epochs(4);
    o.set_seed(11);
    o.set_batch_size(32);
    return o;
  }
  // A model with a private layer4, trained once (v1) so that fine-tuning
  // starts warm.
  void Prepare(const std::string& model) {
    ASSERT_TRUE(CreateModel(model, "fmnist").ok());
    auto first = Start(model, "fmnist");
    ASSERT_TRUE(first.ok()) << first.status();
    ASSERT_EQ(Watch(first->id()).back().state(), v1::Job::SUCCEEDED);
    ASSERT_TRUE(Unfreeze(model, {"layer4"}).ok());
  }
  // Waits until the job has reported epoch `epoch` (of fine-tuning).
  void WaitForEpoch(const std::string& id, int epoch) {
    for (int i = 0; i < 600; ++i) {
      const v1::Job j = GetJob(id);
      if (j.epochs_size() > 0 && j.epochs().rbegin()->epoch() >= epoch) return;
      ASSERT_NE(j.state(), v1::Job::FAILED) << j.error();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    FAIL() << "the job never reached epoch " << epoch;
  }
};

TEST_F(ResumeTest, AJobInterruptedByARestartResumesFromItsLastEpoch) {
  UploadTrainingSet();
  // The uninterrupted run.
  Prepare("whole");
  steps = 0;
  auto whole = Start("whole", "fmnist", FineTuning());
  ASSERT_TRUE(whole.ok()) << whole.status();
  const v1::Job done = Watch(whole->id()).back();
  ASSERT_EQ(done.state(), v1::Job::SUCCEEDED) << done.error();
  const int whole_steps = steps.load();

  // The same run, the server stopped after epoch 2.
  Prepare("resumed");
  auto job = Start("resumed", "fmnist", FineTuning());
  ASSERT_TRUE(job.ok()) << job.status();
  WaitForEpoch(job->id(), 2);
  EXPECT_EQ(StoredCheckpoints(), 1);
  const v1::Job before = GetJob(job->id());
  Restart();
  steps = 0;
  const std::vector<v1::Job> seen = Watch(job->id());
  ASSERT_FALSE(seen.empty());
  const v1::Job after = seen.back();
  ASSERT_EQ(after.state(), v1::Job::SUCCEEDED) << after.error();

  // Resumed, not started over: the epochs reported before the stop come back
  // as they were (their times too), and fewer steps ran after it.
  ASSERT_GE(after.epochs_size(), before.epochs_size());
  for (int i = 0; i < before.epochs_size(); ++i) {
    EXPECT_EQ(after.epochs(i).elapsed_seconds(), before.epochs(i).elapsed_seconds()) << i;
    EXPECT_EQ(after.epochs(i).train_loss(), before.epochs(i).train_loss()) << i;
  }
  EXPECT_GT(steps.load(), 0);
  EXPECT_LT(steps.load(), whole_steps);
  // As many epochs, numbered alike, and a model at least as good.
  ASSERT_EQ(after.epochs_size(), done.epochs_size());
  for (int i = 0; i < after.epochs_size(); ++i) {
    EXPECT_EQ(after.epochs(i).epoch(), done.epochs(i).epoch()) << i;
  }
  EXPECT_GE(after.epochs().rbegin()->validation_accuracy(),
            done.epochs().rbegin()->validation_accuracy() - 1e-9);
  grpc::ClientContext ctx;
  v1::GetModelRequest req;
  req.set_name("resumed");
  v1::Model m;
  ASSERT_TRUE(stub_->GetModel(&ctx, req, &m).ok());
  ASSERT_EQ(m.versions_size(), 2);
  grpc::ClientContext ctx2;
  req.set_name("whole");
  v1::Model w;
  ASSERT_TRUE(stub_->GetModel(&ctx2, req, &w).ok());
  EXPECT_GE(m.versions(1).validation_accuracy(), w.versions(1).validation_accuracy() - 1e-9);
  EXPECT_EQ(StoredCheckpoints(), 0) << "a finished job's checkpoint is deleted";
}

TEST_F(ResumeTest, WithResumeOffAnInterruptedJobFails) {
  UploadTrainingSet();
  Prepare("m");
  v1::TrainingOptions o = FineTuning();
  o.set_resume_after_restart(false);
  auto job = Start("m", "fmnist", o);
  ASSERT_TRUE(job.ok()) << job.status();
  WaitForEpoch(job->id(), 1);
  EXPECT_EQ(StoredCheckpoints(), 0) << "nothing to resume, nothing written";
  Restart();
  const v1::Job after = GetJob(job->id());
  EXPECT_EQ(after.state(), v1::Job::FAILED);
  EXPECT_NE(after.error().find("interrupted"), std::string::npos) << after.error();
  EXPECT_FALSE(after.options().resume_after_restart());
}

}  // namespace
}  // namespace tlserve
