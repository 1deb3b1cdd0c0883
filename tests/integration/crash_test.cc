// Durability: the real binary is killed (kill -9 and SIGTERM) mid-upload and
// mid-training, then restarted on the same data directory. Everything
// acknowledged is still there; nothing unacknowledged half-exists; the job
// that was running is failed ("interrupted") and its model serves its last
// good version.
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
  std::string job_id, long_job_id;
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
    v1::GetJobRequest get;
    get.set_id(long_job_id);
    for (int i = 0; i < 500; ++i) {
      auto j = client.Call(&v1::Models::Stub::GetJob, get);
      if (j.ok() && j->epochs_size() > 0) break;
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
  get.set_id(long_job_id);
  auto interrupted = client.Call(&v1::Models::Stub::GetJob, get);
  ASSERT_TRUE(interrupted.ok());
  EXPECT_EQ(interrupted->state(), v1::Job::FAILED);
  EXPECT_NE(interrupted->error().find("interrupted"), std::string::npos) << interrupted->error();
  v1::ClassifyRequest classify;
  classify.set_model("clothes");
  v1::Image* img = classify.add_images();
  img->set_encoded(ReadBytes(Fixture("fmnist/test/trouser/00002.png")));
  auto r = client.Call(&v1::Models::Stub::Classify, classify);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->version(), 1);
  // The model can train again: the interrupted job no longer holds it.
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
