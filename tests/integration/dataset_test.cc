// The Datasets service on a live server: uploads with rejects, strict mode,
// listing and deleting, durability across a restart on the same data dir.
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "client/lib/client.h"
#include "server/api/server.h"
#include "tests/integration/loopback_options.h"
#include "tests/test_util.h"

namespace tlserve {
namespace {

using ::tlserve::testing::Fixture;
using ::tlserve::testing::ReadBytes;

ServerOptions Options(const std::string& data_dir) {
  return testing::LoopbackOptions("r18small.pt", data_dir);
}

struct Live {
  std::unique_ptr<Server> server;
  std::unique_ptr<Client> client;
};

Live Start(const std::string& dir) {
  Live l;
  auto s = Server::Start(Options(dir));
  EXPECT_TRUE(s.ok()) << s.status();
  if (!s.ok()) return l;
  l.server = std::move(*s);
  auto c = Client::Connect(absl::StrCat("127.0.0.1:", l.server->grpc_port()));
  EXPECT_TRUE(c.ok()) << c.status();
  if (c.ok()) l.client = std::move(*c);
  return l;
}

absl::StatusOr<v1::UploadDatasetResponse> Upload(
    Client& c, const std::string& name,
    const std::vector<std::pair<std::string, std::string>>& files, bool strict = false) {
  return c.UploadDataset(name, strict, files.size(), 2,
                         [&](size_t i) -> absl::StatusOr<v1::Example> {
                           v1::Example e;
                           e.set_name(files[i].first);
                           e.set_label(files[i].second);
                           e.set_encoded(ReadBytes(Fixture(files[i].first)));
                           return e;
                         });
}

std::string TempDir() {
  char tmpl[] = "/tmp/tlserve-ds-XXXXXX";
  return ::mkdtemp(tmpl);
}

TEST(DatasetServiceTest, UploadReportsRejectsAndKeepsTheRest) {
  Live l = Start(TempDir());
  ASSERT_NE(l.client, nullptr);
  auto r = Upload(*l.client, "clothes",
                  {{"rgb_png.png", "shirt"},
                   {"bad_crc.png", "shirt"},
                   {"gray_jpg.jpg", "coat"},
                   {"palette_png.png", "coat"},
                   {"bad_format.gif", "coat"}});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->accepted(), 3);
  ASSERT_EQ(r->rejected_size(), 2);
  EXPECT_EQ(r->rejected(0).index(), 1);
  EXPECT_EQ(r->rejected(0).name(), "bad_crc.png");
  EXPECT_EQ(r->rejected(1).index(), 4);
  EXPECT_NE(r->rejected(1).reason().find("unsupported"), std::string::npos);
  EXPECT_EQ(r->dataset().images(), 3);
  ASSERT_EQ(r->dataset().classes_size(), 2);
  EXPECT_EQ(r->dataset().classes(0).label(), "coat");
  EXPECT_EQ(r->dataset().classes(0).count(), 2);
}

TEST(DatasetServiceTest, StrictUploadStoresNothing) {
  Live l = Start(TempDir());
  ASSERT_NE(l.client, nullptr);
  auto r = Upload(*l.client, "strict", {{"rgb_png.png", "a"}, {"bad_empty.png", "a"}}, true);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("bad_empty.png"), absl::string_view::npos) << r.status();
  EXPECT_EQ(l.client->GetDataset("strict").status().code(), absl::StatusCode::kNotFound);
}

TEST(DatasetServiceTest, BadNamesAndUnknownDatasetsGetCanonicalCodes) {
  Live l = Start(TempDir());
  ASSERT_NE(l.client, nullptr);
  auto bad = Upload(*l.client, "no spaces", {{"rgb_png.png", "a"}});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("dataset"), absl::string_view::npos);
  auto empty = Upload(*l.client, "empty", {});
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(l.client->GetDataset("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(l.client->DeleteDataset("nope").code(), absl::StatusCode::kNotFound);
}

TEST(DatasetServiceTest, DatasetsSurviveARestartAndCanBeDeleted) {
  const std::string dir = TempDir();
  {
    Live l = Start(dir);
    ASSERT_NE(l.client, nullptr);
    ASSERT_TRUE(Upload(*l.client, "keep", {{"rgb_png.png", "a"}, {"gray_png.png", "b"}}).ok());
    ASSERT_TRUE(Upload(*l.client, "keep", {{"rgb_jpg.jpg", "b"}}).ok());  // append
  }
  Live l = Start(dir);
  ASSERT_NE(l.client, nullptr);
  auto d = l.client->GetDataset("keep");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->images(), 3);
  auto list = l.client->ListDatasets();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->datasets_size(), 1);
  ASSERT_TRUE(l.client->DeleteDataset("keep").ok());
  EXPECT_EQ(l.client->ListDatasets()->datasets_size(), 0);
}

TEST(DatasetServiceTest, ACancelledUploadStoresNothing) {
  Live l = Start(TempDir());
  ASSERT_NE(l.client, nullptr);
  // The third example cannot be read: the client cancels mid-upload.
  auto r =
      l.client->UploadDataset("half", false, 5, 1, [](size_t i) -> absl::StatusOr<v1::Example> {
        if (i == 2) return absl::NotFoundError("disk gone");
        v1::Example e;
        e.set_label("a");
        e.set_encoded(ReadBytes(Fixture("rgb_png.png")));
        return e;
      });
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(l.client->GetDataset("half").status().code(), absl::StatusCode::kNotFound);
}

TEST(ServerStartTest, ReportsABusyDataDirectory) {
  ServerOptions o = Options(TempDir());
  auto first = Server::Start(o);
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = Server::Start(o);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace tlserve
