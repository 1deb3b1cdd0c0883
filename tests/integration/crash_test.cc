// Durability: the real binary is killed (kill -9 and SIGTERM) mid-upload and
// mid-training, then restarted on the same data directory. Everything
// acknowledged is still there; nothing unacknowledged half-exists; the job
// that was running resumes from its last checkpoint (one that may not resume
// is failed, "interrupted") and its model serves its last good version.
#include <gtest/gtest.h>
#include <signal.h>

#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "client/lib/client.h"
#include "client/lib/image_files.h"
#include "tests/integration/server_process.h"
#include "tests/test_util.h"

namespace tlserve {
namespace {

using ::tlserve::testing::Fixture;
using ::tlserve::testing::ReadBytes;
using ::tlserve::testing::ServerProcess;

std::vector<std::pair<std::string, std::string>> TrainingFiles() {
  std::vector<std::pair<std::string, std::string>> out;
  auto files = ListImageFiles({Fixture("fmnist/train")});
  EXPECT_TRUE(files.ok());
  if (!files.ok()) return out;
  for (const auto& f : *files) {
    out.emplace_back(f, std::filesystem::path(f).parent_path().filename().string());
  }
  return out;
}

absl::StatusOr<v1::UploadDatasetResponse> Upload(Client& c, const std::string& name,
                                                 absl::Duration pause = absl::ZeroDuration()) {
  const auto files = TrainingFiles();
  return c.UploadDataset(name, false, files.size(), 8,
                         [&](size_t i) -> absl::StatusOr<v1::Example> {
                           if (i % 8 == 0) absl::SleepFor(pause);
                           v1::Example e;
                           e.set_name(files[i].first);
                           e.set_label(files[i].second);
                           e.set_encoded(ReadBytes(files[i].first));
                           return e;
                         });
}

class CrashTest : public ::testing::TestWithParam<int> {};

TEST_P(CrashTest, LosesNothingAcknowledged) {
  const int sig = GetParam();
  char tmpl[] = "/tmp/tlserve-crash-XXXXXX";
  const std::string dir = ::mkdtemp(tmpl);
  const std::string log = dir + "/server.log", data = dir + "/data";
  std::string job_id, long_job_id, no_resume_id;
  int epochs_before = 0;
  {
    ServerProcess server(Fixture("r18small.pt"), data, log);
    auto c = server.Connect();
    ASSERT_TRUE(c.ok()) << c.status() << ReadBytes(log);
    Client& client = **c;
    ASSERT_TRUE(Upload(client, "keep").ok());
    v1::CreateModelRequest create;
    create.set_name("clothes");
    create.set_dataset("keep");
    ASSERT_TRUE(client.Call(&v1::Models::Stub::CreateModel, create).ok());
    v1::StartTrainingRequest train;
    train.set_model("clothes");
    train.set_dataset("keep");
    auto job = client.Call(&v1::Models::Stub::StartTraining, train);
    ASSERT_TRUE(job.ok()) << job.status();
    job_id = job->id();
    grpc::ClientContext watch;
    ASSERT_TRUE(client.WatchJob(job_id, &watch, [](const v1::Job&) {}).ok());

    // A long job, and an upload in progress, when the server dies.
    train.mutable_options()->set_epochs(10000);
    train.mutable_options()->set_optimizer(v1::TrainingOptions::ADAMW);
    auto long_job = client.Call(&v1::Models::Stub::StartTraining, train);
    ASSERT_TRUE(long_job.ok()) << long_job.status();
    long_job_id = long_job->id();
    // Queued behind it, one that may not resume.
    train.mutable_options()->set_resume_after_restart(false);
    auto no_resume = client.Call(&v1::Models::Stub::StartTraining, train);
    EXPECT_EQ(no_resume.status().code(), absl::StatusCode::kFailedPrecondition)
        << "one job per model";
    v1::CreateModelRequest other = create;
    other.set_name("other");
    ASSERT_TRUE(client.Call(&v1::Models::Stub::CreateModel, other).ok());
    train.set_model("other");
    no_resume = client.Call(&v1::Models::Stub::StartTraining, train);
    ASSERT_TRUE(no_resume.ok()) << no_resume.status();
    no_resume_id = no_resume->id();
    v1::GetJobRequest get;
    get.set_id(long_job_id);
    for (int i = 0; i < 500; ++i) {
      auto j = client.Call(&v1::Models::Stub::GetJob, get);
      if (j.ok() && j->epochs_size() > 1) {
        epochs_before = j->epochs_size();
        break;
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    absl::Status upload;
    std::thread uploader(
        [&] { upload = Upload(client, "partial", absl::Milliseconds(200)).status(); });
    absl::SleepFor(absl::Milliseconds(700));  // a few messages are in
    server.Signal(sig);
    uploader.join();
    if (sig == SIGKILL) {
      EXPECT_FALSE(upload.ok()) << "the upload finished before the kill; the test proves nothing";
    } else {
      // SIGTERM drains: the upload in flight is finished and acknowledged.
      EXPECT_TRUE(upload.ok()) << upload;
    }
    const int exit = server.Wait();
    EXPECT_EQ(exit, sig == SIGKILL ? 128 + SIGKILL : 0) << ReadBytes(log);
  }
  ServerProcess server(Fixture("r18small.pt"), data, log);
  auto c = server.Connect();
  ASSERT_TRUE(c.ok()) << c.status() << ReadBytes(log);
  Client& client = **c;
  auto keep = client.GetDataset("keep");
  ASSERT_TRUE(keep.ok()) << keep.status();
  EXPECT_EQ(keep->images(), 120);
  auto partial = client.GetDataset("partial");
  if (sig == SIGKILL) {
    EXPECT_EQ(partial.status().code(), absl::StatusCode::kNotFound);  // never acknowledged
  } else {
    ASSERT_TRUE(partial.ok()) << partial.status();
    EXPECT_EQ(partial->images(), 120);
  }
  v1::GetJobRequest get;
  get.set_id(job_id);
  auto done = client.Call(&v1::Models::Stub::GetJob, get);
  ASSERT_TRUE(done.ok());
  EXPECT_EQ(done->state(), v1::Job::SUCCEEDED);
  // The long job resumed from its last checkpoint: queued or running again,
  // with the epochs it had (each checkpoint is written before its epoch is
  // reported, so none reported is lost).
  get.set_id(long_job_id);
  auto resumed = client.Call(&v1::Models::Stub::GetJob, get);
  ASSERT_TRUE(resumed.ok());
  EXPECT_TRUE(resumed->state() == v1::Job::QUEUED || resumed->state() == v1::Job::RUNNING)
      << resumed->state() << " " << resumed->error();
  EXPECT_GT(epochs_before, 1);
  for (int i = 0; i < 500 && resumed->epochs_size() < epochs_before; ++i) {
    absl::SleepFor(absl::Milliseconds(20));
    resumed = client.Call(&v1::Models::Stub::GetJob, get);
    ASSERT_TRUE(resumed.ok());
  }
  EXPECT_GE(resumed->epochs_size(), epochs_before);
  // The one that may not resume failed as interrupted.
  get.set_id(no_resume_id);
  auto interrupted = client.Call(&v1::Models::Stub::GetJob, get);
  ASSERT_TRUE(interrupted.ok());
  EXPECT_EQ(interrupted->state(), v1::Job::FAILED);
  EXPECT_NE(interrupted->error().find("interrupted"), std::string::npos) << interrupted->error();
  // Cancelling the resumed one frees its model.
  v1::CancelJobRequest cancel;
  cancel.set_id(long_job_id);
  ASSERT_TRUE(client.Call(&v1::Models::Stub::CancelJob, cancel).ok());
  for (int i = 0; i < 500; ++i) {
    get.set_id(long_job_id);
    auto j = client.Call(&v1::Models::Stub::GetJob, get);
    if (j.ok() && j->state() == v1::Job::CANCELLED) break;
    absl::SleepFor(absl::Milliseconds(20));
  }
  v1::ClassifyRequest classify;
  classify.set_model("clothes");
  v1::Image* img = classify.add_images();
  img->set_encoded(ReadBytes(Fixture("fmnist/test/trouser/00002.png")));
  auto r = client.Call(&v1::Models::Stub::Classify, classify);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->version(), 1);
  // The model can train again: the cancelled job no longer holds it.
  v1::StartTrainingRequest train;
  train.set_model("clothes");
  train.set_dataset("keep");
  EXPECT_TRUE(client.Call(&v1::Models::Stub::StartTraining, train).ok());
}

INSTANTIATE_TEST_SUITE_P(Signals, CrashTest, ::testing::Values(SIGKILL, SIGTERM),
                         [](const auto& info) {
                           return info.param == SIGKILL ? "Kill9" : "Sigterm";
                         });

}  // namespace
}  // namespace tlserve
