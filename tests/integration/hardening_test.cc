// The hardening issue's findings, one test per trigger, on the real binary:
// each provokes what used to abort the server, exhaust it or make it forget
// (an undecodable stored image, BatchNorm on batches of one, thin images, a
// full disk, kill -9 after an unfreeze, an upload cut off or unparsable, a
// missing weight file, a huge head, odd training options, a fine-tune that
// got worse), then checks that the server is alive, answers, and still has
// everything it acknowledged, also after a restart.
//
// Memory bounds (VmHWM of the server process, the CPU, r18small): thin
// images keep the peak under 1.5 GB (a 1x30000 PNG used to cost 4.3 GB); a
// refused wide head raises it by under 64 MB (it used to cost 3.1 GB); 12
// exports left unread raise it by under 256 MB (they used to cost 1.27 GB).
#include <grpcpp/client_context.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/mount.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "client/lib/client.h"
#include "client/lib/image_files.h"
#include "tests/integration/server_process.h"
#include "tests/test_util.h"

namespace tlserve {
namespace {

using ::tlserve::testing::Fixture;
using ::tlserve::testing::ReadBytes;
using ::tlserve::testing::ServerProcess;
using Files = std::vector<std::pair<std::string, std::string>>;  // path, label

// Every `every`-th Fashion-MNIST training image (120 in all, 3 classes).
Files Fmnist(int every = 1) {
  Files out;
  auto files = ListImageFiles({Fixture("fmnist/train")});
  EXPECT_TRUE(files.ok()) << files.status();
  if (!files.ok()) return out;
  for (size_t i = 0; i < files->size(); i += every) {
    const std::string& f = (*files)[i];
    out.emplace_back(f, std::filesystem::path(f).parent_path().filename().string());
  }
  return out;
}

absl::StatusOr<v1::UploadDatasetResponse> Upload(Client& c, const std::string& name,
                                                 const Files& files) {
  return c.UploadDataset(name, false, files.size(), 16,
                         [&](size_t i) -> absl::StatusOr<v1::Example> {
                           v1::Example e;
                           e.set_name(files[i].first);
                           e.set_label(files[i].second);
                           e.set_encoded(ReadBytes(files[i].first));
                           return e;
                         });
}

// Whether an error message or a job's error names `what`.
::testing::AssertionResult Mentions(absl::string_view text, absl::string_view what) {
  if (absl::StrContains(text, what)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "\"" << text << "\" does not mention \"" << what << "\"";
}

// A fine-tuning job reports its starting point as epoch 0 (after the epochs
// of training a cold head first); a head-only job starts at 1.
bool FineTuned(const v1::Job& job) {
  for (const auto& e : job.epochs()) {
    if (e.epoch() == 0) return true;
  }
  return false;
}

// Peak resident memory of a process, in MB (VmHWM of /proc/PID/status).
double PeakMb(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  for (std::string line; std::getline(in, line);) {
    if (absl::StartsWith(line, "VmHWM:")) return std::stod(line.substr(6)) / 1024.0;
  }
  return -1;
}

// Runs `sql` on a stopped server's database; `blob`, when given, is bound to `?1`.
absl::Status Sql(const std::string& db_path, const std::string& sql,
                 const std::string* blob = nullptr) {
  sqlite3* db = nullptr;
  if (sqlite3_open(db_path.c_str(), &db) != SQLITE_OK) {
    absl::Status s = absl::InternalError(sqlite3_errmsg(db));
    sqlite3_close(db);
    return s;
  }
  sqlite3_stmt* st = nullptr;
  int rc = sqlite3_prepare_v2(db, sql.c_str(), -1, &st, nullptr);
  if (rc == SQLITE_OK && blob != nullptr) {
    rc = sqlite3_bind_blob(st, 1, blob->data(), static_cast<int>(blob->size()), SQLITE_TRANSIENT);
  }
  if (rc == SQLITE_OK) rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
  absl::Status s = rc == SQLITE_OK
                       ? absl::OkStatus()
                       : absl::InternalError(absl::StrCat(sql, ": ", sqlite3_errmsg(db)));
  sqlite3_finalize(st);
  sqlite3_close(db);
  return s;
}

class HardeningTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/tlserve-hardening-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    log_ = dir_ + "/server.log";
    data_ = dir_ + "/data";
  }
  void TearDown() override {
    server_.reset();
    process_.reset();  // killed before its disk goes
    if (!mounted_.empty()) ::umount2(mounted_.c_str(), MNT_DETACH);
    if (!HasFailure()) std::filesystem::remove_all(dir_);
  }

  void Start(const std::string& backbone = "r18small.pt", std::vector<std::string> extra = {}) {
    extra_ = extra.empty() ? extra_ : extra;
    backbone_ = backbone;
    process_ = std::make_unique<ServerProcess>(Fixture(backbone), data_, log_, extra_);
    auto c = process_->Connect();
    ASSERT_TRUE(c.ok()) << c.status() << " (server process: " << ProcessState() << ")" << LogTail();
    server_ = *std::move(c);
  }
  // Stops the server with `sig` and starts it again on the same data.
  void Restart(int sig = SIGKILL) {
    Stop(sig);
    Start(backbone_);
  }
  void Stop(int sig) {
    server_.reset();
    process_->Signal(sig);
    EXPECT_EQ(process_->Wait(), sig == SIGKILL ? 128 + SIGKILL : 0) << LogTail();
    process_.reset();
  }
  Client& c() { return *server_; }
  std::string LogTail() const {
    const std::string log = ReadBytes(log_);
    return "\nserver log:\n" + log.substr(log.size() > 6000 ? log.size() - 6000 : 0);
  }

  // The "State:" line of the server's /proc status: a zombie ("Z") has
  // exited (or never started: exec failing leaves no log at all).
  std::string ProcessState() const {
    std::ifstream status(absl::StrCat("/proc/", process_->pid(), "/status"));
    for (std::string line; std::getline(status, line);) {
      if (absl::StartsWith(line, "State:")) return line;
    }
    return "gone";
  }
  // The process has not exited (nor is it a zombie) and answers.
  void ExpectAlive() {
    const std::string state = ProcessState();
    EXPECT_TRUE(absl::StartsWith(state, "State:") && state.find('Z') == std::string::npos)
        << "the server exited: " << state << LogTail();
    auto health = c().Health();
    EXPECT_TRUE(health.ok() && *health == "SERVING") << health.status() << LogTail();
    EXPECT_TRUE(ListModels().ok());
  }

  absl::StatusOr<v1::Job> WaitJob(const std::string& id) {
    v1::GetJobRequest get;
    get.set_id(id);
    for (absl::Time end = absl::Now() + absl::Minutes(3); absl::Now() < end;) {
      auto j = c().Call(&v1::Models::Stub::GetJob, get);
      if (!j.ok() || j->state() >= v1::Job::SUCCEEDED) return j;
      absl::SleepFor(absl::Milliseconds(100));
    }
    return absl::DeadlineExceededError("job " + id + " did not end in 3 minutes");
  }
  // Starts a job and waits for its end; a failed start comes back as the status.
  absl::StatusOr<v1::Job> Train(const std::string& model, const std::string& dataset,
                                const v1::TrainingOptions& options = {}) {
    v1::StartTrainingRequest train;
    train.set_model(model);
    train.set_dataset(dataset);
    *train.mutable_options() = options;
    auto job = c().Call(&v1::Models::Stub::StartTraining, train);
    if (!job.ok()) return job.status();
    return WaitJob(job->id());
  }
  absl::Status CreateModel(const std::string& name, const std::string& dataset) {
    v1::CreateModelRequest create;
    create.set_name(name);
    create.set_dataset(dataset);
    return c().Call(&v1::Models::Stub::CreateModel, create).status();
  }
  absl::StatusOr<v1::Model> GetModel(const std::string& name) {
    v1::GetModelRequest get;
    get.set_name(name);
    return c().Call(&v1::Models::Stub::GetModel, get);
  }
  absl::StatusOr<v1::ListModelsResponse> ListModels() {
    return c().Call(&v1::Models::Stub::ListModels, v1::ListModelsRequest());
  }
  absl::StatusOr<v1::Job> GetJob(const std::string& id) {
    v1::GetJobRequest get;
    get.set_id(id);
    return c().Call(&v1::Models::Stub::GetJob, get);
  }
  absl::StatusOr<v1::ClassifyResponse> Classify(
      const std::string& model, const std::string& file = "fmnist/test/trouser/00002.png") {
    v1::ClassifyRequest classify;
    classify.set_model(model);
    classify.add_images()->set_encoded(ReadBytes(Fixture(file)));
    return c().Call(&v1::Models::Stub::Classify, classify);
  }
  absl::Status Unfreeze(const std::string& model, const std::string& from) {
    v1::UnfreezeLayersRequest unfreeze;
    unfreeze.set_model(model);
    unfreeze.set_from(from);
    return c().Call(&v1::Models::Stub::UnfreezeLayers, unfreeze).status();
  }

  std::string dir_, log_, data_, backbone_, mounted_;
  std::vector<std::string> extra_;
  std::unique_ptr<ServerProcess> process_;
  std::unique_ptr<Client> server_;
};

// Finding 1a: a stored image the decoder refuses (a 1x1,000,000-pixel PNG,
// put in the database as an older server would have) fails the job with the
// example named; the process lives on and trains on other data.
TEST_F(HardeningTest, JobOnAnUnusableStoredImageFailsAloneAndIsRemembered) {
  ASSERT_NO_FATAL_FAILURE(Start());
  ASSERT_TRUE(Upload(c(), "clean", Fmnist(2)).ok());
  ASSERT_TRUE(CreateModel("m", "clean").ok());
  // Uploads refuse it now.
  const std::string thin = ReadBytes(Fixture("thin_1000000x1.png"));
  auto refused =
      c().UploadDataset("direct", false, 1, 1, [&](size_t) -> absl::StatusOr<v1::Example> {
        v1::Example e;
        e.set_name("thin_1000000x1.png");
        e.set_label("sandal");
        e.set_encoded(thin);
        return e;
      });
  ASSERT_TRUE(refused.ok()) << refused.status();
  EXPECT_EQ(refused->accepted(), 0);
  ASSERT_EQ(refused->rejected_size(), 1);
  EXPECT_TRUE(Mentions(refused->rejected(0).reason(), "--max_image_pixels"));
  Stop(SIGTERM);

  const std::string db = data_ + "/tlserve.db";
  ASSERT_TRUE(
      Sql(db, "INSERT INTO datasets(name, created_unix) VALUES ('legacy', 1700000000)").ok());
  ASSERT_TRUE(Sql(db,
                  "INSERT INTO examples(dataset, name, label, bytes, hash) SELECT 'legacy', name, "
                  "label, bytes, hash FROM examples WHERE dataset = 'clean' AND id % 2 = 0")
                  .ok());
  ASSERT_TRUE(Sql(db,
                  "INSERT INTO examples(dataset, name, label, bytes, hash) VALUES ('legacy', "
                  "'thin_1000000x1.png', 'sandal', ?1, 999999)",
                  &thin)
                  .ok());
  ASSERT_NO_FATAL_FAILURE(Start());
  auto legacy = c().GetDataset("legacy");
  ASSERT_TRUE(legacy.ok()) << legacy.status();
  EXPECT_EQ(legacy->images(), 31);
  auto failed = Train("m", "legacy");
  ASSERT_TRUE(failed.ok()) << failed.status();
  EXPECT_EQ(failed->state(), v1::Job::FAILED);
  EXPECT_TRUE(Mentions(failed->error(), "thin_1000000x1.png"));
  ExpectAlive();
  auto good = Train("m", "clean");
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_EQ(good->state(), v1::Job::SUCCEEDED) << good->error();
  EXPECT_EQ(good->version(), 1);  // the failed job made no version
  EXPECT_TRUE(Classify("m").ok());

  ASSERT_NO_FATAL_FAILURE(Restart());
  ExpectAlive();
  auto again = GetJob(failed->id());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->state(), v1::Job::FAILED);
  EXPECT_TRUE(Mentions(again->error(), "thin_1000000x1.png"));
  auto clean = c().GetDataset("clean");
  ASSERT_TRUE(clean.ok());
  EXPECT_EQ(clean->images(), 60);
  auto classified = Classify("m");
  ASSERT_TRUE(classified.ok()) << classified.status();
  EXPECT_EQ(classified->version(), 1);
}

// Finding 1b: fine-tuning layer4 of a 32-px backbone (its output is 1x1) with
// batches of one, and with BatchNorm trained, used to throw in BatchNorm.
TEST_F(HardeningTest, FineTunesAOneByOneLayer4WithBatchesOfOne) {
  ASSERT_NO_FATAL_FAILURE(Start("r18tiny.pt"));
  ASSERT_TRUE(Upload(c(), "clothes", Fmnist(2)).ok());
  ASSERT_TRUE(CreateModel("tiny", "clothes").ok());
  ASSERT_TRUE(Unfreeze("tiny", "layer4").ok());
  v1::TrainingOptions o;
  o.set_epochs(1);
  o.set_batch_size(1);
  o.set_freeze_batchnorm(false);
  auto ones = Train("tiny", "clothes", o);
  ASSERT_TRUE(ones.ok()) << ones.status();
  EXPECT_EQ(ones->state(), v1::Job::SUCCEEDED) << ones->error();
  EXPECT_TRUE(FineTuned(*ones)) << "not a fine-tuning job";
  ExpectAlive();
  // Every image in training (validation_fraction 0) in batches of 59: the
  // last batch holds one image.
  o.set_batch_size(59);
  o.set_validation_fraction(0);
  auto last_one = Train("tiny", "clothes", o);
  ASSERT_TRUE(last_one.ok()) << last_one.status();
  EXPECT_EQ(last_one->state(), v1::Job::SUCCEEDED) << last_one->error();
  ExpectAlive();
  auto r = Classify("tiny");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->version(), 2);
}

// Finding 2: thin images whose resized intermediate would be gigabytes are
// refused, naming the flag, before the memory is spent.
TEST_F(HardeningTest, ThinImagesAreRefusedWithinAMemoryBound) {
  ASSERT_NO_FATAL_FAILURE(Start());
  ASSERT_TRUE(Upload(c(), "clothes", Fmnist(4)).ok());
  ASSERT_TRUE(CreateModel("m", "clothes").ok());
  auto trained = Train("m", "clothes");
  ASSERT_TRUE(trained.ok() && trained->state() == v1::Job::SUCCEEDED) << trained.status();
  const double before = PeakMb(process_->pid());
  for (const char* file : {"thin_1x30000.png", "thin_100000x1.png"}) {
    SCOPED_TRACE(file);
    v1::EmbedRequest embed;
    embed.add_images()->set_encoded(ReadBytes(Fixture(file)));
    auto e = c().Embed(embed);
    EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument) << e.status();
    EXPECT_TRUE(Mentions(e.status().message(), "--max_image_pixels"));
    auto k = Classify("m", file);
    EXPECT_EQ(k.status().code(), absl::StatusCode::kInvalidArgument) << k.status();
    EXPECT_TRUE(Mentions(k.status().message(), "--max_image_pixels"));
  }
  const double after = PeakMb(process_->pid());
  std::printf(
      "[ memory ] thin images: server VmHWM %.0f MB before, %.0f MB after (bound 1536 MB)\n",
      before, after);
  EXPECT_LT(after, 1536) << "peak memory over the documented bound";
  ExpectAlive();
  EXPECT_TRUE(Classify("m").ok());
}

// Finding 3: on a small tmpfs, uploads stop at --min_free_disk_mb; deletes
// work; a restart on a completely full disk works and loses nothing.
TEST_F(HardeningTest, FullDiskRefusesWritesKeepsDeletesAndRestarts) {
  std::filesystem::create_directories(data_);
  if (::mount("tmpfs", data_.c_str(), "tmpfs", 0, "size=96m") != 0) {
    GTEST_SKIP() << "cannot mount a 96 MB tmpfs at " << data_ << ": " << std::strerror(errno)
                 << " (the test needs root or CAP_SYS_ADMIN)";
  }
  mounted_ = data_;
  ASSERT_NO_FATAL_FAILURE(Start("r18small.pt", {"--min_free_disk_mb=16"}));
  ASSERT_TRUE(Upload(c(), "small", Fmnist(4)).ok());
  const std::string noise = ReadBytes(Fixture("noise_1000x1000.png"));
  ASSERT_GT(noise.size(), 2'000'000u);
  std::vector<std::string> acknowledged;
  absl::Status full;
  for (int i = 0; i < 40 && full.ok(); ++i) {
    const std::string name = absl::StrCat("noise-", i);
    auto up = c().UploadDataset(name, false, 3, 1, [&](size_t k) -> absl::StatusOr<v1::Example> {
      v1::Example e;
      e.set_name(absl::StrCat(name, "/", k, ".png"));
      e.set_label("noise");
      e.set_encoded(noise);
      return e;
    });
    full = up.status();
    if (up.ok()) acknowledged.push_back(name);
  }
  std::printf("[ disk ] %zu uploads of 3 x %zu bytes before: %s\n", acknowledged.size(),
              noise.size(), full.ToString().c_str());
  ASSERT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  EXPECT_TRUE(Mentions(full.message(), "--min_free_disk_mb"));
  ASSERT_GE(acknowledged.size(), 2u);
  EXPECT_TRUE(c().DeleteDataset(acknowledged.back()).ok());
  acknowledged.pop_back();

  // Now fill the disk to the last byte.
  const std::string filler = data_ + "/filler";
  {
    std::FILE* f = std::fopen(filler.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    const std::string mb(1 << 20, 'x');
    while (std::fwrite(mb.data(), 1, mb.size(), f) == mb.size() && std::fflush(f) == 0) {
    }
    std::fclose(f);
    const std::string kb(1024, 'x');  // the last partial megabyte
    f = std::fopen((filler + "2").c_str(), "wb");
    while (f != nullptr && std::fwrite(kb.data(), 1, kb.size(), f) == kb.size() &&
           std::fflush(f) == 0) {
    }
    if (f != nullptr) std::fclose(f);
  }
  // More than the free pages inside the database: refused, nothing stored.
  auto on_full =
      c().UploadDataset("on-full", false, 6, 1, [&](size_t k) -> absl::StatusOr<v1::Example> {
        v1::Example e;
        e.set_name(absl::StrCat("on-full/", k, ".png"));
        e.set_label("noise");
        e.set_encoded(noise);
        return e;
      });
  EXPECT_EQ(on_full.status().code(), absl::StatusCode::kResourceExhausted) << on_full.status();
  // A few kB fit in the database's free pages: stored whole, or refused.
  auto small = Upload(c(), "on-full-small", Fmnist(8));
  std::printf("[ disk ] a 15-image upload on the full disk: %s\n",
              small.status().ToString().c_str());
  EXPECT_TRUE(small.ok() || small.status().code() == absl::StatusCode::kResourceExhausted)
      << small.status();
  EXPECT_TRUE(c().DeleteDataset(acknowledged.back()).ok()) << "a delete on a full disk failed";
  acknowledged.pop_back();
  ExpectAlive();
  ASSERT_NO_FATAL_FAILURE(Restart(SIGKILL));
  ExpectAlive();
  auto listed = c().ListDatasets();
  ASSERT_TRUE(listed.ok()) << listed.status();
  std::set<std::string> names;
  for (const auto& d : listed->datasets()) names.insert(d.name());
  EXPECT_TRUE(names.count("small"));
  for (const auto& a : acknowledged) {
    EXPECT_TRUE(names.count(a)) << a << " was acknowledged and is gone";
    auto d = c().GetDataset(a);
    EXPECT_TRUE(d.ok() && d->images() == 3) << a;
  }
  EXPECT_FALSE(names.count("on-full"));
  EXPECT_EQ(names.count("on-full-small"), small.ok() ? 1u : 0u);
  if (small.ok()) {
    auto d = c().GetDataset("on-full-small");
    EXPECT_TRUE(d.ok() && d->images() == 15) << d.status();
  }

  std::filesystem::remove(filler);
  std::filesystem::remove(filler + "2");
  auto after = Upload(c(), "after", Fmnist(8));
  ASSERT_TRUE(after.ok()) << after.status() << LogTail();
  EXPECT_EQ(after->accepted(), 15);
  ExpectAlive();
}

// Finding 4: an unfreeze, a job's options and a failed (diverged) job are
// all durable across kill -9.
TEST_F(HardeningTest, UnfreezeJobOptionsAndFailedJobsSurviveKill9) {
  ASSERT_NO_FATAL_FAILURE(Start());
  ASSERT_TRUE(Upload(c(), "clothes", Fmnist(2)).ok());
  ASSERT_TRUE(CreateModel("m", "clothes").ok());
  // An MLP head: its gradients grow with its weights, so lr 100 blows up.
  v1::CreateModelRequest mlp;
  mlp.set_name("wild");
  mlp.set_dataset("clothes");
  mlp.mutable_head()->add_hidden(64);
  ASSERT_TRUE(c().Call(&v1::Models::Stub::CreateModel, mlp).ok());
  auto first = Train("m", "clothes");
  ASSERT_TRUE(first.ok() && first->state() == v1::Job::SUCCEEDED) << first.status();
  ASSERT_TRUE(Unfreeze("m", "layer4").ok());
  v1::TrainingOptions sgd;
  sgd.set_optimizer(v1::TrainingOptions::SGD);
  sgd.set_learning_rate(100);
  sgd.set_epochs(20);  // the loss grows ~1e5-fold an epoch: past float's range by ~8
  auto diverged = Train("wild", "clothes", sgd);
  ASSERT_TRUE(diverged.ok()) << diverged.status();
  EXPECT_EQ(diverged->state(), v1::Job::FAILED) << diverged->DebugString();
  EXPECT_TRUE(Mentions(diverged->error(), "diverged"));
  ExpectAlive();

  ASSERT_NO_FATAL_FAILURE(Restart(SIGKILL));
  ExpectAlive();
  auto m = GetModel("m");
  ASSERT_TRUE(m.ok()) << m.status();
  bool layer4_private = false;
  for (const auto& st : m->stages()) layer4_private |= st.name() == "layer4" && st.private_();
  EXPECT_TRUE(layer4_private) << "the unfreeze was forgotten: " << m->DebugString();
  auto wild = GetJob(diverged->id());
  ASSERT_TRUE(wild.ok()) << wild.status();
  EXPECT_EQ(wild->state(), v1::Job::FAILED);
  EXPECT_TRUE(Mentions(wild->error(), "diverged"));
  auto wild_model = GetModel("wild");
  ASSERT_TRUE(wild_model.ok());
  EXPECT_EQ(wild_model->served_version(), 0) << "a diverged job published a version";

  v1::TrainingOptions o;
  o.set_epochs(1);
  o.set_batch_size(16);
  o.set_seed(42);
  o.set_optimizer(v1::TrainingOptions::ADAMW);
  o.set_learning_rate(5e-4f);
  auto tuned = Train("m", "clothes", o);
  ASSERT_TRUE(tuned.ok()) << tuned.status();
  EXPECT_EQ(tuned->state(), v1::Job::SUCCEEDED) << tuned->error();
  EXPECT_TRUE(FineTuned(*tuned)) << "the job silently trained the head only";

  ASSERT_NO_FATAL_FAILURE(Restart(SIGKILL));
  ExpectAlive();
  auto job = GetJob(tuned->id());
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state(), v1::Job::SUCCEEDED);
  EXPECT_EQ(job->options().epochs(), 1);
  EXPECT_EQ(job->options().batch_size(), 16);
  EXPECT_EQ(job->options().seed(), 42u);
  EXPECT_EQ(job->options().optimizer(), v1::TrainingOptions::ADAMW);
  EXPECT_FLOAT_EQ(job->options().learning_rate(), 5e-4f);
  auto r = Classify("m");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->version(), 2);
  v1::ListJobsRequest list;
  list.set_model("wild");
  auto jobs = c().Call(&v1::Models::Stub::ListJobs, list);
  ASSERT_TRUE(jobs.ok());
  ASSERT_EQ(jobs->jobs_size(), 1);
  EXPECT_EQ(jobs->jobs(0).state(), v1::Job::FAILED);
}

// Finding 5: an upload stream that ends without `commit`, or carries a
// message the server cannot parse, stores nothing and says so.
TEST_F(HardeningTest, UploadWithoutCommitOrWithUnparsableMessageStoresNothing) {
  ASSERT_NO_FATAL_FAILURE(Start());
  const Files files = Fmnist(4);
  ASSERT_TRUE(Upload(c(), "kept", files).ok());
  auto stub = v1::Datasets::NewStub(c().channel());
  for (const char* name : {"kept", "cut"}) {
    SCOPED_TRACE(name);
    grpc::ClientContext ctx;
    v1::UploadDatasetResponse resp;
    auto stream = stub->UploadDataset(&ctx, &resp);
    v1::UploadDatasetRequest req;
    req.set_dataset(name);
    for (int i = 0; i < 5; ++i) {
      v1::Example* e = req.add_examples();
      e->set_name(files[i].first);
      e->set_label(files[i].second);
      e->set_encoded(ReadBytes(files[i].first));
    }
    ASSERT_TRUE(stream->Write(req));  // no commit
    stream->WritesDone();
    const grpc::Status s = stream->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::ABORTED) << s.error_message();
  }
  // A name (and a class) in Latin-1: the C++ client serializes it anyway.
  for (const char* name : {"kept", "latin1"}) {
    SCOPED_TRACE(name);
    auto bad = c().UploadDataset(name, false, files.size(), 4,
                                 [&](size_t i) -> absl::StatusOr<v1::Example> {
                                   v1::Example e;
                                   e.set_name(i == 6 ? "caf\xe9.png" : files[i].first);
                                   e.set_label(i == 9 ? "caf\xe9" : files[i].second);
                                   e.set_encoded(ReadBytes(files[i].first));
                                   return e;
                                 });
    EXPECT_EQ(bad.status().code(), absl::StatusCode::kAborted) << bad.status();
  }
  ExpectAlive();
  auto check = [&] {
    auto kept = c().GetDataset("kept");
    ASSERT_TRUE(kept.ok()) << kept.status();
    EXPECT_EQ(kept->images(), static_cast<int64_t>(files.size()));
    EXPECT_EQ(c().GetDataset("cut").status().code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(c().GetDataset("latin1").status().code(), absl::StatusCode::kNotFound);
  };
  check();
  auto more = Upload(c(), "kept", files);  // tlctl's way still works
  ASSERT_TRUE(more.ok()) << more.status();
  EXPECT_EQ(more->accepted(), static_cast<int64_t>(files.size()));
  ASSERT_NO_FATAL_FAILURE(Restart(SIGKILL));
  ExpectAlive();
  auto kept = c().GetDataset("kept");
  ASSERT_TRUE(kept.ok());
  EXPECT_EQ(kept->images(), 2 * static_cast<int64_t>(files.size()));
  EXPECT_EQ(c().GetDataset("cut").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(c().GetDataset("latin1").status().code(), absl::StatusCode::kNotFound);
}

// Finding 6: a missing weight file or a corrupt model record makes that
// model report the problem; the server starts and serves the others.
TEST_F(HardeningTest, DamagedModelsDegradeAlone) {
  ASSERT_NO_FATAL_FAILURE(Start());
  ASSERT_TRUE(Upload(c(), "clothes", Fmnist(4)).ok());
  for (const char* name : {"good", "gone", "broken"}) {
    ASSERT_TRUE(CreateModel(name, "clothes").ok());
    auto j = Train(name, "clothes");
    ASSERT_TRUE(j.ok() && j->state() == v1::Job::SUCCEEDED) << name << j.status();
  }
  Stop(SIGTERM);
  const std::string weights = data_ + "/models/gone/v1.head.pt";
  ASSERT_TRUE(std::filesystem::remove(weights)) << weights;
  ASSERT_TRUE(Sql(data_ + "/tlserve.db",
                  "UPDATE records SET json = '{\"na' WHERE kind = 'model' AND key = 'broken'")
                  .ok());
  ASSERT_NO_FATAL_FAILURE(Start());
  ExpectAlive();
  auto good = Classify("good");
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_EQ(good->version(), 1);
  auto gone = Classify("gone");
  EXPECT_TRUE(gone.status().code() == absl::StatusCode::kDataLoss ||
              gone.status().code() == absl::StatusCode::kFailedPrecondition)
      << gone.status();
  EXPECT_TRUE(Mentions(gone.status().message(), "v1.head.pt"));
  auto gone_model = GetModel("gone");
  ASSERT_TRUE(gone_model.ok()) << gone_model.status();
  EXPECT_TRUE(Mentions(gone_model->problem(), "v1.head.pt"));
  auto corrupt = Classify("broken");
  EXPECT_TRUE(corrupt.status().code() == absl::StatusCode::kDataLoss ||
              corrupt.status().code() == absl::StatusCode::kFailedPrecondition)
      << corrupt.status();
  auto corrupt_model = GetModel("broken");
  ASSERT_TRUE(corrupt_model.ok()) << corrupt_model.status();
  EXPECT_TRUE(Mentions(corrupt_model->problem(), "corrupt"));
  auto all = ListModels();
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->models_size(), 3);
  for (const char* name : {"gone", "broken"}) {
    v1::DeleteModelRequest del;
    del.set_name(name);
    auto d = c().Call(&v1::Models::Stub::DeleteModel, del);
    EXPECT_TRUE(d.ok()) << name << ": " << d.status();
  }
  ASSERT_NO_FATAL_FAILURE(Restart(SIGKILL));
  ExpectAlive();
  all = ListModels();
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->models_size(), 1);
  EXPECT_EQ(all->models(0).name(), "good");
  EXPECT_TRUE(all->models(0).problem().empty());
  EXPECT_TRUE(Classify("good").ok());
}

// Finding 8 (heads and classes): a 28-byte request asking for a 3 GB head,
// or more classes than the limit, is refused before anything is allocated.
TEST_F(HardeningTest, HugeHeadsAndClassListsAreRefusedBeforeAllocating) {
  ASSERT_NO_FATAL_FAILURE(Start());
  const double before = PeakMb(process_->pid());
  v1::CreateModelRequest wide;
  wide.set_name("wide");
  wide.add_classes("a");
  wide.add_classes("b");
  for (int i = 0; i < 4; ++i) wide.mutable_head()->add_hidden(16384);
  auto w = c().Call(&v1::Models::Stub::CreateModel, wide);
  EXPECT_EQ(w.status().code(), absl::StatusCode::kResourceExhausted) << w.status();
  EXPECT_TRUE(Mentions(w.status().message(), "--max_head_params"));
  const double after = PeakMb(process_->pid());
  std::printf("[ memory ] wide head: server VmHWM %.0f MB before, %.0f MB after (bound +64 MB)\n",
              before, after);
  EXPECT_LT(after - before, 64);

  v1::CreateModelRequest many;
  many.set_name("many");
  for (int i = 0; i <= 10'000; ++i)
    many.add_classes(absl::StrCat("c", i));  // the default limit + 1
  auto m = c().Call(&v1::Models::Stub::CreateModel, many);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kResourceExhausted) << m.status();
  EXPECT_TRUE(Mentions(m.status().message(), "--max_model_classes"));

  v1::CreateModelRequest fine;
  fine.set_name("fine");
  fine.add_classes("a");
  fine.add_classes("b");
  fine.mutable_head()->add_hidden(64);
  EXPECT_TRUE(c().Call(&v1::Models::Stub::CreateModel, fine).ok());
  ExpectAlive();
  auto all = ListModels();
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->models_size(), 1);
  EXPECT_EQ(all->models(0).name(), "fine");
}

// Finding 8 (exports): exports that nobody reads do not each hold a copy of
// the model in the server's memory.
TEST_F(HardeningTest, UnreadExportsHoldLittleMemory) {
  ASSERT_NO_FATAL_FAILURE(Start());
  ASSERT_TRUE(Upload(c(), "clothes", Fmnist(4)).ok());
  ASSERT_TRUE(CreateModel("m", "clothes").ok());
  ASSERT_TRUE(Unfreeze("m", "layer3").ok());  // its export carries private copies too
  v1::TrainingOptions one_epoch;              // what is trained does not matter here, only its size
  one_epoch.set_epochs(1);
  auto trained = Train("m", "clothes", one_epoch);
  ASSERT_TRUE(trained.ok() && trained->state() == v1::Job::SUCCEEDED) << trained.status();
  const double before = PeakMb(process_->pid());
  auto stub = v1::Models::NewStub(c().channel());
  constexpr int kExports = 12;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<v1::ExportModelResponse>>> readers;
  int64_t size = 0;
  int streaming = 0;
  for (int i = 0; i < kExports; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    v1::ExportModelRequest req;
    req.set_model("m");
    auto reader = stub->ExportModel(contexts.back().get(), req);
    v1::ExportModelResponse info;
    if (reader->Read(&info)) {  // the info, then nothing more is read
      size = info.info().size_bytes();
      readers.push_back(std::move(reader));
      ++streaming;
      continue;
    }
    // Refused at once: over --max_concurrent_exports.
    const absl::Status s = FromGrpc(reader->Finish());
    EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
    EXPECT_TRUE(Mentions(s.message(), "--max_concurrent_exports"));
  }
  EXPECT_GE(streaming, 1);
  absl::SleepFor(absl::Seconds(3));
  const double after = PeakMb(process_->pid());
  std::printf(
      "[ memory ] %d exports asked, %d streaming unread, of %.0f MB: server VmHWM %.0f MB "
      "before, %.0f MB after (bound +256 MB)\n",
      kExports, streaming, size / 1048576.0, before, after);
  EXPECT_LT(after - before, 256);
  for (auto& ctx : contexts) ctx->TryCancel();
  for (auto& r : readers) (void)r->Finish();
  ExpectAlive();
  // The slots free as the server sees the cancellations: retry a moment.
  auto one = c().ExportModel("m", 0, dir_ + "/m.pt");
  for (int i = 0; i < 50 && one.status().code() == absl::StatusCode::kResourceExhausted; ++i) {
    absl::SleepFor(absl::Milliseconds(100));
    one = c().ExportModel("m", 0, dir_ + "/m.pt");
  }
  EXPECT_TRUE(one.ok()) << one.status();
  EXPECT_TRUE(Classify("m").ok());
}

// Finding 9: unknown optimizers are refused; weight_decay 0 and
// validation_fraction 0 can be asked for; palette PNGs with transparency are
// taken; concurrent uploads cannot pass --max_dataset_images together.
TEST_F(HardeningTest, TrainingOptionsAreCheckedAndSmallerFindingsHold) {
  ASSERT_NO_FATAL_FAILURE(Start("r18small.pt", {"--max_dataset_images=40"}));
  const Files files = Fmnist(4);
  ASSERT_TRUE(Upload(c(), "clothes", files).ok());
  ASSERT_TRUE(CreateModel("m", "clothes").ok());
  v1::TrainingOptions bad;
  bad.set_optimizer(static_cast<v1::TrainingOptions::Optimizer>(7));
  auto refused = Train("m", "clothes", bad);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
  v1::TrainingOptions zero;
  zero.set_weight_decay(0);
  zero.set_validation_fraction(0);
  auto job = Train("m", "clothes", zero);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state(), v1::Job::SUCCEEDED) << job->error();
  EXPECT_TRUE(job->options().has_weight_decay() && job->options().weight_decay() == 0)
      << job->options().DebugString();
  EXPECT_TRUE(job->options().has_validation_fraction() && job->options().validation_fraction() == 0)
      << job->options().DebugString();

  auto palette = Classify("m", "palette_trns.png");
  EXPECT_TRUE(palette.ok()) << palette.status();

  // 4 concurrent uploads of 6 onto 30 images, with room for 10 more.
  std::vector<std::thread> uploaders;
  for (int t = 0; t < 4; ++t) {
    uploaders.emplace_back([&, t] {
      Files six(files.begin() + 6 * t, files.begin() + 6 * t + 6);
      (void)Upload(c(), "clothes", six);
    });
  }
  for (auto& u : uploaders) u.join();
  auto limited = c().GetDataset("clothes");
  ASSERT_TRUE(limited.ok());
  EXPECT_EQ(limited->images(), 36);  // one fits, whole
  ExpectAlive();
  ASSERT_NO_FATAL_FAILURE(Restart(SIGKILL));
  auto after = c().GetDataset("clothes");
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->images(), limited->images());
  EXPECT_TRUE(Classify("m").ok());
}

// Finding 10: fine-tuning layer4 from a head-only v1 with default options
// publishes a version at least as good on validation.
TEST_F(HardeningTest, FineTuningNeverPublishesAWorseVersion) {
  ASSERT_NO_FATAL_FAILURE(Start());
  ASSERT_TRUE(Upload(c(), "clothes", Fmnist()).ok());
  ASSERT_TRUE(CreateModel("m", "clothes").ok());
  auto first = Train("m", "clothes");
  ASSERT_TRUE(first.ok() && first->state() == v1::Job::SUCCEEDED) << first.status();
  ASSERT_TRUE(Unfreeze("m", "layer4").ok());
  v1::TrainingOptions o;  // 3 epochs, not the default 10: the rule holds for any number
  o.set_epochs(3);
  auto v2 = Train("m", "clothes", o);
  ASSERT_TRUE(v2.ok()) << v2.status();
  ASSERT_EQ(v2->state(), v1::Job::SUCCEEDED) << v2->error();
  auto m = GetModel("m");
  ASSERT_TRUE(m.ok());
  ASSERT_EQ(m->versions_size(), 2);
  std::printf("[ accuracy ] validation: head-only v1 %.3f, fine-tuned v2 %.3f\n",
              m->versions(0).validation_accuracy(), m->versions(1).validation_accuracy());
  EXPECT_GE(m->versions(1).validation_accuracy(), m->versions(0).validation_accuracy());
  EXPECT_EQ(m->served_version(), 2);
  EXPECT_TRUE(FineTuned(*v2));
  ExpectAlive();
  EXPECT_TRUE(Classify("m").ok());
}

}  // namespace
}  // namespace tlserve
