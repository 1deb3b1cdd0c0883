// tlserve migrate: a single-node data directory (SQLite and weight files)
// with datasets (one an unlabelled pool), a model with a private stage and
// two versions, and a job's history, copied by the real binary into an
// empty PostgreSQL database; a replica on that database serves every
// version with the same Classify outputs, and lists the same datasets and
// jobs. The binary refuses a data directory in use, a destination that is
// not empty, and a source that is not a data directory.
#include <gtest/gtest.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "tests/integration/training_fixture.h"
#include "tlserve/v1/datasets.grpc.pb.h"

namespace tlserve {
namespace {

using ::tlserve::testing::Fixture;

// Runs a command; (exit status, stdout and stderr together).
std::pair<int, std::string> RunCommand(const std::string& command) {
  std::string out;
  FILE* p = ::popen((command + " 2>&1").c_str(), "r");
  if (p == nullptr) return {-1, "popen failed"};
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  const int status = ::pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

std::string Migrate(const std::string& from, const std::string& to) {
  const char* bin = std::getenv("TLSERVE_BIN");
  return absl::StrCat(bin ? bin : ".", "/tlserve migrate --from=", from, " --to=", to);
}

class MigrateTest : public testing::TrainingTest {
 protected:
  absl::StatusOr<v1::ClassifyResponse> ClassifyVersion(const std::vector<std::string>& files,
                                                       int version) {
    grpc::ClientContext ctx;
    v1::ClassifyRequest req;
    req.set_model("clothes");
    req.set_version(version);
    req.set_top_k(5);
    for (const auto& f : files) {
      v1::Image* img = req.add_images();
      img->set_name(f);
      img->set_encoded(testing::ReadBytes(f));
    }
    v1::ClassifyResponse resp;
    if (auto s = FromGrpc(stub_->Classify(&ctx, req, &resp)); !s.ok()) return s;
    return resp;
  }
};

TEST_F(MigrateTest, ASingleNodeMovesIntoPostgreSQLAndServesTheSame) {
  ASSERT_FALSE(OnPostgres()) << "the source is SQLite: run without TLSERVE_TEST_DATABASE";
  ASSERT_NO_FATAL_FAILURE(UploadTrainingSet());
  // An unlabelled pool beside it.
  const auto pool = testing::Folder(Fixture("fmnist/train"));
  auto uploaded =
      client_->UploadDataset("pool", false, 10, 5, [&](size_t i) -> absl::StatusOr<v1::Example> {
        v1::Example e;
        e.set_name(absl::StrCat("p", i, ".png"));
        e.set_encoded(testing::ReadBytes(pool[i * 7].first));
        return e;
      });
  ASSERT_TRUE(uploaded.ok()) << uploaded.status();
  ASSERT_TRUE(CreateModel("clothes", "fmnist").ok());
  auto first = Start("clothes", "fmnist");
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(Watch(first->id()).back().state(), v1::Job::SUCCEEDED);
  ASSERT_TRUE(Unfreeze("clothes", {"layer4"}).ok());
  v1::TrainingOptions fine;
  fine.set_epochs(1);
  fine.set_batch_size(32);
  fine.set_seed(3);
  auto second = Start("clothes", "fmnist", fine);
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_EQ(Watch(second->id()).back().state(), v1::Job::SUCCEEDED);
  const std::vector<std::string> files = {pool[0].first, pool[40].first, pool[80].first,
                                          pool[119].first};
  std::vector<v1::ClassifyResponse> before;
  for (int v : {1, 2}) {
    auto r = ClassifyVersion(files, v);
    ASSERT_TRUE(r.ok()) << r.status();
    before.push_back(*r);
  }
  ASSERT_NE(SharedPostgres(), nullptr);
  const std::string to = SharedPostgres()->NewDatabase(absl::StrCat("migrate", ::getpid()));
  ASSERT_FALSE(to.empty());

  // Not while a server holds the data directory; nothing copied.
  auto [busy, busy_out] = RunCommand(Migrate(dir_, to));
  EXPECT_EQ(busy, 1) << busy_out;
  EXPECT_TRUE(absl::StrContains(busy_out, "stop the server")) << busy_out;
  stub_.reset();
  client_.reset();
  server_.reset();
  auto [usage, usage_out] = RunCommand(Migrate(dir_, dir_ + "/elsewhere"));
  EXPECT_EQ(usage, 2) << usage_out;
  auto [not_dir, not_dir_out] = RunCommand(Migrate(dir_ + "/nothing", to));
  EXPECT_EQ(not_dir, 1) << not_dir_out;
  EXPECT_TRUE(absl::StrContains(not_dir_out, "not a tlserve data directory")) << not_dir_out;

  auto [rc, out] = RunCommand(Migrate(dir_, to));
  ASSERT_EQ(rc, 0) << out;
  EXPECT_TRUE(absl::StrContains(out, "2 datasets (130 images")) << out;
  EXPECT_TRUE(absl::StrContains(out, "verified")) << out;
  // Once only: the destination is no longer empty.
  auto [again, again_out] = RunCommand(Migrate(dir_, to));
  EXPECT_EQ(again, 1) << again_out;
  EXPECT_TRUE(absl::StrContains(again_out, "not empty")) << again_out;

  // A replica on the copy, with an empty data directory of its own.
  ServerOptions o = Options(dir_ + "/replica");
  o.data_dir = dir_ + "/replica";
  o.database = to;
  auto s = Server::Start(o);
  ASSERT_TRUE(s.ok()) << s.status();
  server_ = std::move(*s);
  auto c = Client::Connect(absl::StrCat("127.0.0.1:", server_->grpc_port()));
  ASSERT_TRUE(c.ok());
  client_ = std::move(*c);
  stub_ = v1::Models::NewStub(client_->channel());
  // Not into a database a replica already runs on (it holds the replica lock).
  auto [in_use, in_use_out] = RunCommand(Migrate(dir_, to));
  EXPECT_EQ(in_use, 1) << in_use_out;
  EXPECT_TRUE(absl::StrContains(in_use_out, "replica is running on the destination")) << in_use_out;
  for (int v : {1, 2}) {
    auto after = ClassifyVersion(files, v);
    ASSERT_TRUE(after.ok()) << after.status();
    const v1::ClassifyResponse& was = before[v - 1];
    ASSERT_EQ(after->results_size(), was.results_size());
    for (int i = 0; i < was.results_size(); ++i) {
      ASSERT_EQ(after->results(i).top_size(), was.results(i).top_size());
      for (int k = 0; k < was.results(i).top_size(); ++k) {
        EXPECT_EQ(after->results(i).top(k).label(), was.results(i).top(k).label());
        // The same weights through the same code: identical (to 4 ulps).
        EXPECT_FLOAT_EQ(after->results(i).top(k).probability(), was.results(i).top(k).probability())
            << "version " << v << ", image " << i << ", rank " << k;
      }
    }
  }
  auto datasets = client_->ListDatasets();
  ASSERT_TRUE(datasets.ok()) << datasets.status();
  ASSERT_EQ(datasets->datasets_size(), 2);
  EXPECT_EQ(datasets->datasets(0).name(), "fmnist");
  EXPECT_EQ(datasets->datasets(0).images(), 120);
  EXPECT_EQ(datasets->datasets(1).name(), "pool");
  EXPECT_EQ(datasets->datasets(1).images(), 10);
  const v1::Job job = GetJob(second->id());
  EXPECT_EQ(job.state(), v1::Job::SUCCEEDED);
  EXPECT_EQ(job.version(), 2);
  // And it trains on the copied data: the unfrozen stage is there to tune.
  auto third = Start("clothes", "fmnist", fine);
  ASSERT_TRUE(third.ok()) << third.status();
  const v1::Job end = Watch(third->id()).back();
  EXPECT_EQ(end.state(), v1::Job::SUCCEEDED) << end.error();
  EXPECT_EQ(end.version(), 3);
}

}  // namespace
}  // namespace tlserve
