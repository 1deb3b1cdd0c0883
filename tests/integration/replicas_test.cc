// Two replicas on one PostgreSQL database (the scale-out mode): each is an
// in-process server with its own, empty data directory; what one is told,
// the other serves — through the database and its notifications, never
// through a shared file. Run with $TLSERVE_TEST_DATABASE=postgresql (CTest
// sets it): replica A is the fixture's server, replica B is started here.
#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "tests/integration/http_get.h"
#include "tests/integration/server_process.h"
#include "tests/integration/training_fixture.h"
#include "tlserve/v1/datasets.grpc.pb.h"
#include "tlserve/v1/evaluation.pb.h"

namespace tlserve {
namespace {

using ::tlserve::testing::Fixture;

class ReplicasTest : public testing::TrainingTest {
 protected:
  // Fine-tuning steps slowed down, so that a replica can go mid-job.
  ServerOptions Options(const std::string& data_dir) override {
    ServerOptions o = TrainingTest::Options(data_dir);
    o.before_training_step = [](const std::string&) {
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    };
    // A replica's jobs pass to another 2 s after it died (10 s by default).
    o.job_lease = absl::Seconds(2);
    return o;
  }
  void SetUp() override {
    ASSERT_TRUE(OnPostgres()) << "run with TLSERVE_TEST_DATABASE=postgresql (as CTest does)";
    ASSERT_NO_FATAL_FAILURE(TrainingTest::SetUp());
    ServerOptions o = Options(dir_ + "/replica-b");
    o.data_dir = dir_ + "/replica-b";
    o.database = database_;
    o.max_concurrent_jobs = 0;  // A runs the jobs; B serves
    auto b = Server::Start(o);
    ASSERT_TRUE(b.ok()) << b.status();
    server_b_ = std::move(*b);
    auto c = Client::Connect(absl::StrCat("127.0.0.1:", server_b_->grpc_port()));
    ASSERT_TRUE(c.ok());
    client_b_ = std::move(*c);
    stub_b_ = v1::Models::NewStub(client_b_->channel());
  }
  void TearDown() override {
    stub_b_.reset();
    client_b_.reset();
    server_b_.reset();
  }
  // Runs `f` with the fixture's helpers talking to replica B.
  template <typename F>
  auto OnB(F f) {
    std::swap(stub_, stub_b_);
    std::swap(client_, client_b_);
    auto result = f();
    std::swap(stub_, stub_b_);
    std::swap(client_, client_b_);
    return result;
  }
  // Polls `f` until it returns true, for at most `bound` (five times that
  // in a sanitizer build, whose code runs several times slower).
  template <typename F>
  bool Within(absl::Duration bound, F f) {
    if (std::getenv("ASAN_OPTIONS") != nullptr) bound *= 5;
    for (absl::Time end = absl::Now() + bound; absl::Now() < end;) {
      if (f()) return true;
      absl::SleepFor(absl::Milliseconds(20));
    }
    return f();
  }
  absl::Status Serve(const std::string& model, int version) {
    grpc::ClientContext ctx;
    v1::SetServedVersionRequest req;
    req.set_model(model);
    req.set_version(version);
    v1::Model m;
    return FromGrpc(stub_->SetServedVersion(&ctx, req, &m));
  }
  absl::Status Delete(const std::string& model) {
    grpc::ClientContext ctx;
    v1::DeleteModelRequest req;
    req.set_name(model);
    v1::DeleteModelResponse r;
    return FromGrpc(stub_->DeleteModel(&ctx, req, &r));
  }
  // B's WatchJob of `id` on a thread (and a stub) of its own, every update
  // into `seen`; bounded: a job that no replica resumes fails the test
  // instead of hanging it.
  std::thread WatchOnB(const std::string& id, std::vector<v1::Job>* seen) {
    return std::thread([id, seen, stub = v1::Models::NewStub(client_b_->channel())] {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(5));
      v1::WatchJobRequest req;
      req.set_id(id);
      auto reader = stub->WatchJob(&ctx, req);
      v1::Job j;
      while (reader->Read(&j)) seen->push_back(j);
      const absl::Status s = FromGrpc(reader->Finish());
      EXPECT_TRUE(s.ok()) << s;
    });
  }
  int TrainOnce(const std::string& model) {
    auto job = Start(model, "fmnist");
    EXPECT_TRUE(job.ok()) << job.status();
    if (!job.ok()) return 0;
    const v1::Job end = Watch(job->id()).back();
    EXPECT_EQ(end.state(), v1::Job::SUCCEEDED) << end.error();
    return end.version();
  }

  std::unique_ptr<Server> server_b_;
  std::unique_ptr<Client> client_b_;
  std::unique_ptr<v1::Models::Stub> stub_b_;
  // A model "clothes" with a version and a private layer4, then a fine-tune
  // of it started through A and watched through B (every update into
  // `seen`), once its first epoch is reported.
  absl::StatusOr<v1::Job> StartFineTuneWatchedOnB(int epochs, int seed, std::vector<v1::Job>* seen,
                                                  std::thread* watcher) {
    UploadTrainingSet();
    if (HasFatalFailure()) return absl::InternalError("the upload failed");
    if (absl::Status s = CreateModel("clothes", "fmnist"); !s.ok()) return s;
    if (TrainOnce("clothes") != 1) return absl::InternalError("the first version failed");
    if (auto m = Unfreeze("clothes", {"layer4"}); !m.ok()) return m.status();
    v1::TrainingOptions fine;
    fine.set_epochs(epochs);
    fine.set_batch_size(32);
    fine.set_seed(seed);
    auto job = Start("clothes", "fmnist", fine);
    if (!job.ok()) return job.status();
    *watcher = WatchOnB(job->id(), seen);
    if (!Within(absl::Seconds(120), [&] {
          const v1::Job j = GetJob(job->id());
          return j.epochs_size() > 0 && j.epochs().rbegin()->epoch() >= 1;
        })) {
      return absl::DeadlineExceededError("no epoch reported in 120 s");
    }
    return job;
  }
  // Starts a replica that runs jobs (as A does) on the same database.
  std::unique_ptr<Server> StartReplica(const std::string& name, int workers = 1) {
    ServerOptions o = Options(dir_ + "/" + name);
    o.data_dir = dir_ + "/" + name;
    o.database = database_;
    o.max_concurrent_jobs = workers;
    auto s = Server::Start(o);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? std::move(*s) : nullptr;
  }
  // The job queue's owners, by job (SQL on the shared database).
  std::map<std::string, std::string> QueueOwners() {
    std::map<std::string, std::string> out;
    PGconn* c = PQconnectdb(database_.c_str());
    PGresult* r = PQexec(c, "SELECT id, owner FROM job_queue WHERE lease_until > now()");
    for (int i = 0; PQresultStatus(r) == PGRES_TUPLES_OK && i < PQntuples(r); ++i) {
      out[PQgetvalue(r, i, 0)] = PQgetvalue(r, i, 1);
    }
    PQclear(r);
    PQfinish(c);
    return out;
  }
  bool Sql(const std::string& statement) {
    PGconn* c = PQconnectdb(database_.c_str());
    PGresult* r = PQexec(c, statement.c_str());
    const bool ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;
    EXPECT_TRUE(ok) << PQresultErrorMessage(r);
    PQclear(r);
    PQfinish(c);
    return ok;
  }
};

TEST_F(ReplicasTest, WhatOneReplicaIsToldTheOtherServesWithinASecond) {
  // Upload and create through B (a serving-only replica); train through A.
  ASSERT_NO_FATAL_FAILURE(OnB([&] {
    UploadTrainingSet();
    return 0;
  }));
  const auto folder = testing::Folder(Fixture("fmnist/train"));
  ASSERT_GE(folder.size(), 2u);
  const std::vector<std::string> files = {folder.front().first, folder.back().first};
  ASSERT_TRUE(OnB([&] { return CreateModel("clothes", "fmnist"); }).ok());
  // B runs no jobs, but queues one: A claims and runs it.
  auto job = OnB([&] { return Start("clothes", "fmnist"); });
  ASSERT_TRUE(job.ok()) << job.status();

  // B's WatchJob follows A's job to its end.
  const std::vector<v1::Job> seen = OnB([&] { return Watch(job->id()); });
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen.back().state(), v1::Job::SUCCEEDED) << seen.back().error();
  EXPECT_EQ(seen.back().version(), 1);
  auto on_a = Classify("clothes", files);
  ASSERT_TRUE(on_a.ok()) << on_a.status();
  // B serves the version A published, with A's probabilities, within a
  // second of the job's end (it never read a file of A's).
  absl::StatusOr<v1::ClassifyResponse> on_b;
  EXPECT_TRUE(Within(absl::Seconds(1), [&] {
    on_b = OnB([&] { return Classify("clothes", files); });
    return on_b.ok() && on_b->version() == 1;
  })) << on_b.status();
  ASSERT_TRUE(on_b.ok());
  for (int i = 0; i < 2; ++i) {
    ASSERT_EQ(on_a->results(i).top_size(), on_b->results(i).top_size());
    for (int k = 0; k < on_a->results(i).top_size(); ++k) {
      EXPECT_EQ(on_a->results(i).top(k).label(), on_b->results(i).top(k).label());
      EXPECT_NEAR(on_a->results(i).top(k).probability(), on_b->results(i).top(k).probability(),
                  1e-6);
    }
  }

  // A second version, served; then a roll back to v1 through B: A follows
  // B's choice.
  ASSERT_EQ(TrainOnce("clothes"), 2);
  EXPECT_TRUE(Within(absl::Seconds(1), [&] {
    auto r = OnB([&] { return Classify("clothes", files); });
    return r.ok() && r->version() == 2;
  }));
  ASSERT_TRUE(OnB([&] { return Serve("clothes", 1); }).ok());
  EXPECT_TRUE(Within(absl::Seconds(1), [&] {
    auto r = Classify("clothes", files);
    return r.ok() && r->version() == 1;
  }));

  // Deleted through A: gone from B too.
  ASSERT_TRUE(Delete("clothes").ok());
  EXPECT_TRUE(Within(absl::Seconds(1), [&] {
    auto r = OnB([&] { return Classify("clothes", files); });
    return r.status().code() == absl::StatusCode::kNotFound;
  }));
  // The dataset A stored is B's as well.
  auto datasets = client_b_->ListDatasets();
  ASSERT_TRUE(datasets.ok()) << datasets.status();
  ASSERT_EQ(datasets->datasets_size(), 1);
  EXPECT_EQ(datasets->datasets(0).name(), "fmnist");
}

// A runs a fine-tune when C, which runs jobs too, starts; when A stops mid
// job, it gives the job's lease up, C claims the job at once, resumes it from
// its checkpoint and finishes it, and B's WatchJob follows it to the end.
TEST_F(ReplicasTest, AJobOfAReplicaThatStopsIsResumedByAnother) {
  // B watches from the start, on a stub of its own (the fixture's helpers
  // stay A's on this thread).
  std::vector<v1::Job> seen;
  std::thread watcher;
  auto job = StartFineTuneWatchedOnB(/*epochs=*/4, /*seed=*/11, &seen, &watcher);
  if (!job.ok() && watcher.joinable()) watcher.join();
  ASSERT_TRUE(job.ok()) << job.status();
  // C starts while A runs the job.
  std::unique_ptr<Server> server_c = StartReplica("replica-c");
  ASSERT_NE(server_c, nullptr);
  const v1::Job before = GetJob(job->id());
  EXPECT_EQ(StoredCheckpoints(), 1);
  // A stops (and gives the job's lease up).
  stub_.reset();
  client_.reset();
  server_.reset();
  watcher.join();
  ASSERT_FALSE(seen.empty());
  const v1::Job& end = seen.back();
  EXPECT_EQ(end.state(), v1::Job::SUCCEEDED) << end.error() << " / " << end.phase();
  EXPECT_EQ(end.version(), 2);
  // Resumed, not started over: the epochs before A went are there as they were.
  ASSERT_GE(end.epochs_size(), before.epochs_size());
  for (int i = 0; i < before.epochs_size(); ++i) {
    EXPECT_EQ(end.epochs(i).train_loss(), before.epochs(i).train_loss()) << i;
  }
  EXPECT_EQ(end.epochs().rbegin()->epoch(), 4);
  EXPECT_EQ(StoredCheckpoints(), 0);
  EXPECT_TRUE(QueueOwners().empty());
}

// kill -9 of the replica that runs a fine-tune — R, the real binary in a
// process of its own: its lease runs out (2 s here), C claims the job,
// resumes it from R's last checkpoint and finishes it; B's WatchJob follows
// it to the end; nothing R acknowledged is lost (the dataset, the model, the
// epochs it reported).
TEST_F(ReplicasTest, AReplicaKilledMidFineTuneIsResumedByAnother) {
  // A (in this process) goes: R runs the job.
  stub_.reset();
  client_.reset();
  server_.reset();
  const std::string log = dir_ + "/replica-r.log";
  testing::ServerProcess r(
      Fixture("r18small.pt"), dir_ + "/replica-r", log,
      {"--database=" + database_, "--max_concurrent_jobs=1", "--job_lease_seconds=2"});
  auto on_r = r.Connect();
  ASSERT_TRUE(on_r.ok()) << on_r.status() << testing::ReadBytes(log);
  client_ = std::move(*on_r);
  stub_ = v1::Models::NewStub(client_->channel());
  ASSERT_NO_FATAL_FAILURE(UploadTrainingSet());
  ASSERT_TRUE(CreateModel("clothes", "fmnist").ok());
  ASSERT_EQ(TrainOnce("clothes"), 1);
  ASSERT_TRUE(Unfreeze("clothes", {"layer4"}).ok());

  v1::TrainingOptions fine;
  fine.set_epochs(4);
  fine.set_batch_size(32);
  fine.set_seed(5);
  auto job = Start("clothes", "fmnist", fine);
  ASSERT_TRUE(job.ok()) << job.status();
  std::vector<v1::Job> seen;
  std::thread watcher = WatchOnB(job->id(), &seen);
  ASSERT_TRUE(Within(absl::Seconds(60), [&] {
    return GetJob(job->id()).state() == v1::Job::RUNNING;
  })) << testing::ReadBytes(log);
  // C starts once R runs the job (or it could have claimed it first).
  std::unique_ptr<Server> server_c = StartReplica("replica-c");
  ASSERT_NE(server_c, nullptr);
  v1::Job before;
  ASSERT_TRUE(Within(absl::Seconds(120), [&] {
    before = GetJob(job->id());
    return before.epochs_size() > 0 && before.epochs().rbegin()->epoch() >= 1;
  })) << testing::ReadBytes(log);
  r.Signal(SIGKILL);
  const absl::Time killed = absl::Now();
  EXPECT_EQ(r.Wait(), 128 + SIGKILL);
  ASSERT_EQ(before.state(), v1::Job::RUNNING)
      << "the job ended before the kill; the test proves nothing";
  stub_.reset();
  client_.reset();
  watcher.join();
  std::printf("killed after epoch %d of 4; the job ended on another replica %.1f s later\n",
              before.epochs().rbegin()->epoch(), absl::ToDoubleSeconds(absl::Now() - killed));
  ASSERT_FALSE(seen.empty());
  const v1::Job& end = seen.back();
  EXPECT_EQ(end.state(), v1::Job::SUCCEEDED) << end.error() << " / " << end.phase();
  EXPECT_EQ(end.version(), 2);
  ASSERT_GE(end.epochs_size(), before.epochs_size());
  for (int i = 0; i < before.epochs_size(); ++i) {
    EXPECT_EQ(end.epochs(i).train_loss(), before.epochs(i).train_loss()) << i;
  }
  EXPECT_EQ(end.epochs().rbegin()->epoch(), 4);
  EXPECT_EQ(StoredCheckpoints(), 0);
  // C serves what it finished; B too.
  auto on_c = Client::Connect(absl::StrCat("127.0.0.1:", server_c->grpc_port()));
  ASSERT_TRUE(on_c.ok());
  client_ = std::move(*on_c);
  stub_ = v1::Models::NewStub(client_->channel());
  const std::vector<std::string> files = {testing::Folder(Fixture("fmnist/train"))[3].first};
  absl::StatusOr<v1::ClassifyResponse> served;
  EXPECT_TRUE(Within(absl::Seconds(1), [&] {
    served = OnB([&] { return Classify("clothes", files); });
    return served.ok() && served->version() == 2;
  })) << served.status();
  auto on_c_served = Classify("clothes", files);
  ASSERT_TRUE(on_c_served.ok()) << on_c_served.status();
  EXPECT_EQ(on_c_served->version(), 2);
  auto datasets = client_->ListDatasets();
  ASSERT_TRUE(datasets.ok());
  EXPECT_EQ(datasets->datasets_size(), 1);
}

// CancelJob through a replica that does not run the job: acknowledged once
// the request is in the database; the replica running it hears it and
// cancels the job.
TEST_F(ReplicasTest, ACancelThroughAnyReplicaReachesTheRunner) {
  ASSERT_NO_FATAL_FAILURE(UploadTrainingSet());
  ASSERT_TRUE(CreateModel("clothes", "fmnist").ok());
  ASSERT_EQ(TrainOnce("clothes"), 1);
  ASSERT_TRUE(Unfreeze("clothes", {"layer4"}).ok());
  v1::TrainingOptions fine;
  fine.set_epochs(50);  // steps slowed down: minutes, unless cancelled
  fine.set_batch_size(32);
  auto job = Start("clothes", "fmnist", fine);
  ASSERT_TRUE(job.ok()) << job.status();
  ASSERT_TRUE(
      Within(absl::Seconds(60), [&] { return GetJob(job->id()).state() == v1::Job::RUNNING; }));
  {
    grpc::ClientContext ctx;
    v1::CancelJobRequest req;
    req.set_id(job->id());
    v1::Job j;
    const absl::Status s = FromGrpc(stub_b_->CancelJob(&ctx, req, &j));
    ASSERT_TRUE(s.ok()) << s;
    EXPECT_EQ(j.id(), job->id());
  }
  const v1::Job end = Watch(job->id()).back();
  EXPECT_EQ(end.state(), v1::Job::CANCELLED) << end.error() << " / " << end.phase();
  EXPECT_LT(end.epochs_size(), 50);
  // The request is gone once carried out; B sees the job cancelled too.
  PGconn* c = PQconnectdb(database_.c_str());
  EXPECT_TRUE(Within(absl::Seconds(1), [&] {
    PGresult* r = PQexec(c, "SELECT count(*) FROM records WHERE kind = 'cancel'");
    const bool none =
        PQresultStatus(r) == PGRES_TUPLES_OK && std::string(PQgetvalue(r, 0, 0)) == "0";
    PQclear(r);
    return none;
  }));
  PQfinish(c);
  EXPECT_TRUE(Within(absl::Seconds(1), [&] {
    return OnB([&] { return GetJob(job->id()); }).state() == v1::Job::CANCELLED;
  }));
}

// A replica whose lease was lost while it still ran the job (as when it lost
// the database, or stalled, for longer than the lease, and another replica
// claimed the job): A finds its lease gone at its next renewal or write,
// stops the job and writes nothing more of it; the job is claimed again and
// resumed from its checkpoint. It ends once, with one version.
TEST_F(ReplicasTest, AReplicaThatLostItsLeaseStopsAndAnotherFinishesTheJob) {
  std::vector<v1::Job> seen;
  std::thread watcher;
  auto job = StartFineTuneWatchedOnB(/*epochs=*/3, /*seed=*/3, &seen, &watcher);
  if (!job.ok() && watcher.joinable()) watcher.join();
  ASSERT_TRUE(job.ok()) << job.status();
  std::unique_ptr<Server> server_c = StartReplica("replica-c");
  ASSERT_NE(server_c, nullptr);
  ASSERT_EQ(GetJob(job->id()).state(), v1::Job::RUNNING);
  ASSERT_EQ(QueueOwners().size(), 1u);
  // A's lease is lost under it: claimed by a replica that died at once (as
  // when A stalled, or lost the database, for longer than the lease). A or
  // C claims it again, and resumes it from its checkpoint.
  ASSERT_TRUE(Sql("UPDATE job_queue SET owner = 'gone', lease_until = now() - interval '1 s'"));
  EXPECT_TRUE(Within(absl::Seconds(5), [&] {
    const auto now = QueueOwners();
    return now.size() == 1 && now.begin()->second != "gone";
  }));
  watcher.join();
  ASSERT_FALSE(seen.empty());
  const v1::Job& end = seen.back();
  EXPECT_EQ(end.state(), v1::Job::SUCCEEDED) << end.error() << " / " << end.phase();
  EXPECT_EQ(end.version(), 2);
  EXPECT_EQ(end.epochs().rbegin()->epoch(), 3);
  for (int i = 1; i < end.epochs_size(); ++i) {
    EXPECT_EQ(end.epochs(i).epoch(), end.epochs(i - 1).epoch() + 1) << "epochs written twice";
  }
  // One version made: A stored none after it lost the lease.
  absl::SleepFor(absl::Seconds(1));
  grpc::ClientContext ctx;
  v1::GetModelRequest req;
  req.set_name("clothes");
  v1::Model m;
  ASSERT_TRUE(FromGrpc(stub_->GetModel(&ctx, req, &m)).ok());
  EXPECT_EQ(m.versions_size(), 2);
  EXPECT_EQ(GetJob(job->id()).state(), v1::Job::SUCCEEDED);  // on A too
  EXPECT_TRUE(QueueOwners().empty());
}

// Every replica that runs jobs trains: three jobs at once, claimed from the
// one queue, run on A (one worker) and C (two workers, --max_concurrent_jobs=2).
TEST_F(ReplicasTest, ReplicasRunJobsAtOnceUpToTheirWorkers) {
  ASSERT_NO_FATAL_FAILURE(UploadTrainingSet());
  std::unique_ptr<Server> server_c = StartReplica("replica-c", /*workers=*/2);
  ASSERT_NE(server_c, nullptr);
  const std::vector<std::string> names = {"one", "two", "three"};
  for (const auto& name : names) {
    ASSERT_TRUE(CreateModel(name, "fmnist").ok());
    ASSERT_EQ(TrainOnce(name), 1);
    ASSERT_TRUE(Unfreeze(name, {"layer4"}).ok());
  }
  v1::TrainingOptions fine;
  fine.set_epochs(2);
  fine.set_batch_size(32);
  std::vector<std::string> ids;
  for (const auto& name : names) {
    auto job = Start(name, "fmnist", fine);
    ASSERT_TRUE(job.ok()) << job.status();
    ids.push_back(job->id());
  }
  // All three running at once, under two owners: one of them holds two.
  std::map<std::string, std::string> owners;
  EXPECT_TRUE(Within(absl::Seconds(30), [&] {
    owners = QueueOwners();
    if (owners.size() != 3) return false;
    for (const auto& id : ids) {
      if (GetJob(id).state() != v1::Job::RUNNING) return false;
    }
    return true;
  }));
  std::map<std::string, int> per_owner;
  for (const auto& [id, owner] : owners) ++per_owner[owner];
  EXPECT_EQ(per_owner.size(), 2u);
  // One unfinished job per model, whichever replica is asked (B knows of
  // the job only through the database).
  auto twice = OnB([&] { return Start("one", "fmnist", fine); });
  EXPECT_EQ(twice.status().code(), absl::StatusCode::kFailedPrecondition) << twice.status();
  EXPECT_TRUE(absl::StrContains(twice.status().message(), ids[0])) << twice.status();
  for (const auto& id : ids) {
    EXPECT_EQ(Watch(id).back().state(), v1::Job::SUCCEEDED) << id;
  }
}

// A client with round_robin over both replicas' addresses spreads its calls
// over both (what --lb=round_robin does with a headless Service's name).
TEST_F(ReplicasTest, RoundRobinSpreadsOneClientsCallsOverTheReplicas) {
  auto bad = Client::Connect("127.0.0.1:1", ChannelSecurity(), absl::Seconds(1), "random");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument) << bad.status();
  auto c = Client::Connect(
      absl::StrCat("ipv4:127.0.0.1:", server_->grpc_port(), ",127.0.0.1:", server_b_->grpc_port()),
      ChannelSecurity(), absl::Seconds(10), "round_robin");
  ASSERT_TRUE(c.ok()) << c.status();
  auto embeds = [](const Server& s) {
    const std::string text = testing::HttpGet(s.metrics_port(), "/metrics");
    int n = 0;
    for (absl::string_view line : absl::StrSplit(text, '\n')) {
      if (absl::StartsWith(line, "tlserve_requests_total{") &&
          absl::StrContains(line, "method=\"Embed\"") && absl::StrContains(line, "code=\"OK\"")) {
        double v = 0;
        if (absl::SimpleAtod(line.substr(line.rfind(' ') + 1), &v)) n += static_cast<int>(v);
      }
    }
    return n;
  };
  const std::string file = testing::Folder(Fixture("fmnist/train"))[0].first;
  // round_robin connects to both addresses; the first calls may find only one
  // ready. Once both have answered one, the next 10 alternate.
  int calls = 0;
  auto embed = [&] {
    v1::EmbedRequest req;
    req.add_images()->set_encoded(testing::ReadBytes(file));
    ++calls;
    return (*c)->Embed(req).ok();
  };
  while (calls < 200 && (embeds(*server_) == 0 || embeds(*server_b_) == 0)) ASSERT_TRUE(embed());
  const int a0 = embeds(*server_), b0 = embeds(*server_b_);
  ASSERT_GT(a0, 0);
  ASSERT_GT(b0, 0) << "replica B served none of " << calls << " calls";
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(embed());
  const int a = embeds(*server_) - a0, b = embeds(*server_b_) - b0;
  EXPECT_EQ(a + b, 10);
  EXPECT_GE(a, 4) << "replica A served " << a << " of 10";
  EXPECT_GE(b, 4) << "replica B served " << b << " of 10";
}

// Read-your-writes across replicas: a model made through B is known to A's
// next call at once, before B's notification may have reached A (CI once
// saw StartTraining on A get NOT_FOUND 2 ms after CreateModel on B).
TEST_F(ReplicasTest, AModelMadeOnOneReplicaIsKnownAtOnceOnTheOther) {
  ASSERT_NO_FATAL_FAILURE(UploadTrainingSet());
  for (int i = 0; i < 20; ++i) {
    const std::string name = absl::StrCat("made-on-b-", i);
    ASSERT_TRUE(OnB([&] { return CreateModel(name, "fmnist"); }).ok());
    grpc::ClientContext ctx;
    v1::GetModelRequest req;
    req.set_name(name);
    v1::Model m;
    const absl::Status s = FromGrpc(stub_->GetModel(&ctx, req, &m));
    EXPECT_TRUE(s.ok()) << s;
  }
  ASSERT_TRUE(OnB([&] { return CreateModel("train-me", "fmnist"); }).ok());
  auto job = Start("train-me", "fmnist");
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(Watch(job->id()).back().state(), v1::Job::SUCCEEDED);
  // And a name that exists nowhere is still NOT_FOUND.
  grpc::ClientContext ctx;
  v1::GetModelRequest req;
  req.set_name("nowhere");
  v1::Model m;
  EXPECT_EQ(FromGrpc(stub_->GetModel(&ctx, req, &m)).code(), absl::StatusCode::kNotFound);
}

TEST_F(ReplicasTest, TwoClientsRacingForOneNameOnTwoReplicasGetOneModel) {
  ASSERT_NO_FATAL_FAILURE(UploadTrainingSet());
  for (int round = 0; round < 10; ++round) {
    const std::string name = absl::StrCat("race", round);
    absl::Status on_a, on_b;
    std::thread a([&] { on_a = CreateModel(name, "fmnist"); });
    // B's stub, used from this thread only while A's runs on the other.
    grpc::ClientContext ctx;
    v1::CreateModelRequest req;
    req.set_name(name);
    req.set_dataset("fmnist");
    v1::Model m;
    on_b = FromGrpc(stub_b_->CreateModel(&ctx, req, &m));
    a.join();
    EXPECT_NE(on_a.ok(), on_b.ok()) << on_a << " / " << on_b;
    const absl::Status& loser = on_a.ok() ? on_b : on_a;
    EXPECT_EQ(loser.code(), absl::StatusCode::kAlreadyExists) << loser;
  }
}

TEST_F(ReplicasTest, AReplicaStartedLaterWithAnEmptyDataDirServesEverything) {
  ASSERT_NO_FATAL_FAILURE(UploadTrainingSet());
  ASSERT_TRUE(CreateModel("clothes", "fmnist").ok());
  ASSERT_EQ(TrainOnce("clothes"), 1);
  const std::vector<std::string> files = {testing::Folder(Fixture("fmnist/train"))[5].first};
  auto before = Classify("clothes", files);
  ASSERT_TRUE(before.ok()) << before.status();
  // A restarts on a new, empty data directory (the fixture's PostgreSQL mode).
  ASSERT_NO_FATAL_FAILURE(Restart());
  auto after = Classify("clothes", files);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->results(0).label(), before->results(0).label());
  EXPECT_NEAR(after->results(0).top(0).probability(), before->results(0).top(0).probability(),
              1e-6);
}

}  // namespace
}  // namespace tlserve
