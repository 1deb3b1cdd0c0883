// The store interface's own suite: every test runs against both
// implementations, SQLite (a file in a temporary directory) and PostgreSQL
// (a fresh database on a throwaway server, tests/postgres_util.h), and
// expects the same answers from both. PostgreSQL-only behaviour (schema
// migrations under a lock, several connections at once, an unreachable
// server) follows.
#include "server/store/database.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "server/store/migrate.h"
#include "server/store/postgres_database.h"
#include "tests/postgres_util.h"

namespace tlserve {
namespace {

// One PostgreSQL server for the whole binary; each test gets a database.
testing::TempPostgres* postgres = nullptr;

class PostgresEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    std::string error;
    server_ = testing::TempPostgres::Start(&error);
    ASSERT_NE(server_, nullptr) << error;
    postgres = server_.get();
  }
  void TearDown() override {
    postgres = nullptr;
    server_.reset();
  }

 private:
  std::unique_ptr<testing::TempPostgres> server_;
};

[[maybe_unused]] const auto* const kEnvironment =
    ::testing::AddGlobalTestEnvironment(new PostgresEnvironment);

StoredExample Example(const std::string& name, const std::string& label, std::string bytes,
                      uint64_t hash) {
  return {0, name, label, std::move(bytes), hash};
}

class DatabaseTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    static std::atomic<int> next{0};
    if (GetParam() == "sqlite") {
      char dir[] = "/tmp/tlserve-db-XXXXXX";
      ASSERT_NE(mkdtemp(dir), nullptr);
      dir_ = dir;
      location_ = dir_ + "/tlserve.db";
    } else {
      ASSERT_NE(postgres, nullptr);
      location_ = postgres->NewDatabase(absl::StrCat("t", ::getpid(), "_", next++));
      ASSERT_FALSE(location_.empty());
    }
    Reopen();
  }
  void TearDown() override {
    db_.reset();
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  void Reopen() {
    db_.reset();
    auto db = Database::Open(location_);
    ASSERT_TRUE(db.ok()) << db.status();
    db_ = std::move(*db);
    ASSERT_EQ(db_->kind(), GetParam());
  }
  // Stages `examples` as one upload and commits it into `dataset`.
  absl::StatusOr<int64_t> Upload(const std::string& dataset,
                                 const std::vector<StoredExample>& examples,
                                 UploadQuota quota = {}) {
    const int64_t upload = db_->BeginUpload();
    if (absl::Status s = db_->StageExamples(upload, examples); !s.ok()) return s;
    return db_->CommitUpload(upload, dataset, quota);
  }

  std::string dir_;
  std::string location_;
  std::unique_ptr<Database> db_;
};

INSTANTIATE_TEST_SUITE_P(Stores, DatabaseTest, ::testing::Values("sqlite", "postgresql"),
                         [](const auto& info) { return info.param; });

TEST_P(DatabaseTest, AnUploadIsInvisibleUntilCommittedAndThenSurvivesAReopen) {
  // Bytes of every value, NUL and 0xff included; a hash with its top bit set.
  std::string all_bytes;
  for (int i = 0; i < 256; ++i) all_bytes.push_back(static_cast<char>(i));
  const int64_t upload = db_->BeginUpload();
  ASSERT_TRUE(db_->StageExamples(upload, {Example("a.png", "cat", all_bytes, 0xfedcba9876543210ull),
                                          Example("b.png", "dog", "bb", 2)})
                  .ok());
  ASSERT_TRUE(db_->StageExamples(upload, {Example("c.png", "", "ccc", 3)}).ok());
  EXPECT_EQ(db_->GetDataset("pets").status().code(), absl::StatusCode::kNotFound);
  auto listed = db_->ListDatasets();
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_TRUE(listed->empty());

  auto added = db_->CommitUpload(upload, "pets", {});
  ASSERT_TRUE(added.ok()) << added.status();
  EXPECT_EQ(*added, 3);
  ASSERT_NO_FATAL_FAILURE(Reopen());
  auto info = db_->GetDataset("pets");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->images, 3);
  EXPECT_EQ(info->bytes, 256 + 2 + 3);
  EXPECT_EQ(info->unlabelled, 1);
  EXPECT_EQ(info->class_counts, (std::map<std::string, int64_t>{{"cat", 1}, {"dog", 1}}));
  EXPECT_GT(info->created_unix, 1'700'000'000);

  auto examples = db_->LoadExamples("pets");
  ASSERT_TRUE(examples.ok()) << examples.status();
  ASSERT_EQ(examples->size(), 3u);
  EXPECT_EQ((*examples)[0].name, "a.png");
  EXPECT_EQ((*examples)[0].bytes, all_bytes);
  EXPECT_EQ((*examples)[0].hash, 0xfedcba9876543210ull);
  EXPECT_EQ((*examples)[1].label, "dog");
  EXPECT_EQ((*examples)[2].label, "");
  EXPECT_LT((*examples)[0].id, (*examples)[1].id);
  EXPECT_LT((*examples)[1].id, (*examples)[2].id);

  auto plan = db_->ListExamples("pets");
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ((*plan)[i].id, (*examples)[i].id);
    EXPECT_EQ((*plan)[i].hash, (*examples)[i].hash);
    EXPECT_TRUE((*plan)[i].bytes.empty());
  }
  // Bytes by id, in the order asked (repeats too).
  auto bytes = db_->ReadExampleBytes({(*plan)[2].id, (*plan)[0].id, (*plan)[2].id});
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(*bytes, (std::vector<std::string>{"ccc", all_bytes, "ccc"}));
  EXPECT_EQ(db_->ReadExampleBytes({(*plan)[0].id, 987654321}).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_P(DatabaseTest, AppendsKeepInsertionOrderAndAnAbortedUploadStoresNothing) {
  ASSERT_TRUE(Upload("d", {Example("1", "x", "1", 1), Example("2", "y", "2", 2)}).ok());
  const int64_t aborted = db_->BeginUpload();
  ASSERT_TRUE(db_->StageExamples(aborted, {Example("lost", "z", "lost", 9)}).ok());
  db_->AbortUpload(aborted);
  ASSERT_TRUE(Upload("d", {Example("3", "x", "3", 3)}).ok());
  // A commit of an aborted upload adds nothing (and creates no dataset).
  auto none = db_->CommitUpload(aborted, "other", {});
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(*none, 0);
  EXPECT_EQ(db_->GetDataset("other").status().code(), absl::StatusCode::kNotFound);
  auto examples = db_->ListExamples("d");
  ASSERT_TRUE(examples.ok());
  std::vector<std::string> names;
  for (const auto& e : *examples) names.push_back(e.name);
  EXPECT_EQ(names, (std::vector<std::string>{"1", "2", "3"}));
}

TEST_P(DatabaseTest, QuotasAreCheckedAtCommitAndAnUploadOverThemStoresNothing) {
  ASSERT_TRUE(Upload("d", {Example("1", "a", "1", 1), Example("2", "b", "2", 2)}).ok());
  UploadQuota quota;
  quota.max_images = 3;
  auto over = Upload("d", {Example("3", "a", "3", 3), Example("4", "a", "4", 4)}, quota);
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted) << over.status();
  EXPECT_TRUE(absl::StrContains(over.status().message(), "--max_dataset_images"));
  quota = {};
  quota.max_classes = 2;
  auto classes = Upload("d", {Example("5", "c", "5", 5)}, quota);
  EXPECT_EQ(classes.status().code(), absl::StatusCode::kResourceExhausted) << classes.status();
  EXPECT_TRUE(absl::StrContains(classes.status().message(), "--max_dataset_classes"));
  auto fits = Upload("d", {Example("6", "a", "6", 6)}, quota);
  ASSERT_TRUE(fits.ok()) << fits.status();
  auto info = db_->GetDataset("d");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->images, 3);
}

TEST_P(DatabaseTest, DatasetsListInByteOrderAndDeleteWithTheirExamples) {
  for (const char* name : {"b", "B", "a", "a.b", "a-b"}) {
    ASSERT_TRUE(Upload(name, {Example("x", "l", "x", 1)}).ok()) << name;
  }
  auto listed = db_->ListDatasets();
  ASSERT_TRUE(listed.ok());
  std::vector<std::string> names;
  for (const auto& d : *listed) names.push_back(d.name);
  EXPECT_EQ(names, (std::vector<std::string>{"B", "a", "a-b", "a.b", "b"}));
  auto ids = db_->ListExamples("a");
  ASSERT_TRUE(ids.ok());
  ASSERT_TRUE(db_->DeleteDataset("a").ok());
  EXPECT_EQ(db_->GetDataset("a").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(db_->DeleteDataset("a").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(db_->ListExamples("a").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(db_->ReadExampleBytes({(*ids)[0].id}).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(db_->GetDataset("a.b").ok());
}

TEST_P(DatabaseTest, RecordsReplaceListByKeyAndDeleteByPrefix) {
  for (const char* key : {"m", "m/v2", "m/v10", "mm", "M", "n/v1"}) {
    ASSERT_TRUE(db_->PutRecord("version", key, absl::StrCat("{\"k\":\"", key, "\"}")).ok());
  }
  ASSERT_TRUE(db_->PutRecord("version", "m/v2", "{\"replaced\":true}").ok());
  ASSERT_TRUE(db_->PutRecord("job", "m", "{}").ok());
  ASSERT_NO_FATAL_FAILURE(Reopen());
  auto all = db_->ListRecords("version");
  ASSERT_TRUE(all.ok()) << all.status();
  std::vector<std::string> keys;
  for (const auto& [k, json] : *all) keys.push_back(k);
  EXPECT_EQ(keys, (std::vector<std::string>{"M", "m", "m/v10", "m/v2", "mm", "n/v1"}));
  EXPECT_EQ((*all)[3].second, "{\"replaced\":true}");

  ASSERT_TRUE(db_->DeleteRecords("version", "m").ok());
  all = db_->ListRecords("version");
  ASSERT_TRUE(all.ok());
  keys.clear();
  for (const auto& [k, json] : *all) keys.push_back(k);
  EXPECT_EQ(keys, (std::vector<std::string>{"M", "mm", "n/v1"}));
  auto jobs = db_->ListRecords("job");
  ASSERT_TRUE(jobs.ok());
  EXPECT_EQ(jobs->size(), 1u);  // another kind is untouched
  // Unicode and JSON escapes round-trip as they were written.
  const std::string json = "{\"label\":\"\\u0000 ñ 猫 \\\"q\\\"\"}";
  ASSERT_TRUE(db_->PutRecord("model", "ünï", json).ok());
  auto models = db_->ListRecords("model");
  ASSERT_TRUE(models.ok());
  ASSERT_EQ(models->size(), 1u);
  EXPECT_EQ((*models)[0].first, "ünï");
  EXPECT_EQ((*models)[0].second, json);
}

TEST_P(DatabaseTest, ARecordIsCreatedOnceAndReadByKey) {
  ASSERT_TRUE(db_->CreateRecord("model", "m", "{\"n\":1}").ok());
  const absl::Status again = db_->CreateRecord("model", "m", "{\"n\":2}");
  EXPECT_EQ(again.code(), absl::StatusCode::kAlreadyExists) << again;
  auto json = db_->GetRecord("model", "m");
  ASSERT_TRUE(json.ok()) << json.status();
  EXPECT_EQ(*json, "{\"n\":1}");  // the first one stays
  EXPECT_EQ(db_->GetRecord("model", "other").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(db_->GetRecord("job", "m").status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(db_->DeleteRecords("model", "m").ok());
  EXPECT_TRUE(db_->CreateRecord("model", "m", "{}").ok());  // free again once deleted
}

TEST_P(DatabaseTest, BlobsAreWrittenWholeReadBackAndDeleted) {
  std::string big(3 << 20, '\0');  // 3 MiB, every byte value
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 7919 % 256);
  ASSERT_TRUE(db_->PutBlob("models/t:m/v1.head.pt", big).ok());
  ASSERT_TRUE(db_->PutBlob("checkpoints/7.ckpt", "first").ok());
  ASSERT_TRUE(db_->PutBlob("checkpoints/7.ckpt", "second").ok());  // replaced whole
  ASSERT_TRUE(db_->PutBlob("empty", "").ok());
  ASSERT_NO_FATAL_FAILURE(Reopen());
  auto read = db_->GetBlob("models/t:m/v1.head.pt");
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_TRUE(*read == big);
  EXPECT_EQ(*db_->GetBlob("checkpoints/7.ckpt"), "second");
  EXPECT_EQ(*db_->GetBlob("empty"), "");
  if (GetParam() == "sqlite") {  // today's layout of the data directory
    EXPECT_TRUE(std::filesystem::exists(dir_ + "/models/t:m/v1.head.pt"));
    EXPECT_TRUE(std::filesystem::exists(dir_ + "/checkpoints/7.ckpt"));
  }
  ASSERT_TRUE(db_->DeleteBlob("checkpoints/7.ckpt").ok());
  EXPECT_EQ(db_->GetBlob("checkpoints/7.ckpt").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(db_->DeleteBlob("checkpoints/7.ckpt").ok());  // already gone: fine
  EXPECT_EQ(db_->GetBlob("never/written").status().code(), absl::StatusCode::kNotFound);
  for (const char* bad : {"", "/etc/passwd", "../up", "a/../b", "a//b", "a/", "sp ace", "a/./b"}) {
    EXPECT_EQ(db_->PutBlob(bad, "x").code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_EQ(db_->GetBlob(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_EQ(db_->DeleteBlob(bad).code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST_P(DatabaseTest, BlobsAndRecordKindsAreListedForACopy) {
  for (const char* name : {"models/b/v1.head.pt", "models/a:x/v2.layer4.pt", "models/a:x/v10.pt",
                           "checkpoints/3.ckpt", "modelsX/not-under-models", "other/x"}) {
    ASSERT_TRUE(db_->PutBlob(name, name).ok()) << name;
  }
  if (GetParam() == "sqlite") {  // what a crash in WriteFileAtomically leaves is not a blob
    std::ofstream(dir_ + "/models/b/v2.head.pt.tmp") << "half";
  }
  auto models = db_->ListBlobs("models");
  ASSERT_TRUE(models.ok()) << models.status();
  EXPECT_EQ(*models, (std::vector<std::string>{"models/a:x/v10.pt", "models/a:x/v2.layer4.pt",
                                               "models/b/v1.head.pt"}));
  auto sub = db_->ListBlobs("models/b");
  ASSERT_TRUE(sub.ok());
  EXPECT_EQ(*sub, (std::vector<std::string>{"models/b/v1.head.pt"}));
  auto none = db_->ListBlobs("never");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE(none->empty());
  for (const char* bad : {"", "../x", "/models"}) {
    EXPECT_EQ(db_->ListBlobs(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  auto kinds = db_->ListRecordKinds();
  ASSERT_TRUE(kinds.ok());
  EXPECT_TRUE(kinds->empty());
  ASSERT_TRUE(db_->PutRecord("model", "m", "{}").ok());
  ASSERT_TRUE(db_->PutRecord("job", "1", "{}").ok());
  ASSERT_TRUE(db_->PutRecord("job", "2", "{}").ok());
  kinds = db_->ListRecordKinds();
  ASSERT_TRUE(kinds.ok());
  EXPECT_EQ(*kinds, (std::vector<std::string>{"job", "model"}));
}

// CopyStore from this store into one of the other kind: everything
// arrives, verified; a destination that is not empty is refused.
TEST_P(DatabaseTest, AStoreIsCopiedWholeIntoAnEmptyOne) {
  std::vector<StoredExample> examples;
  for (int i = 0; i < 300; ++i) {  // more than one chunk of the copy
    StoredExample e;
    e.name = absl::StrCat("img", i, ".png");
    e.label = i % 7 == 0 ? "" : absl::StrCat("c", i % 3);
    e.bytes = std::string(100 + i, static_cast<char>(i));
    e.hash = 0x9e3779b97f4a7c15ull * static_cast<uint64_t>(i + 1);
    examples.push_back(e);
  }
  ASSERT_TRUE(Upload("t:photos", examples).ok());
  ASSERT_TRUE(Upload("empty-labels", {examples[0]}).ok());
  ASSERT_TRUE(db_->PutRecord("model", "t:m", "{\"versions\":[1]}").ok());
  ASSERT_TRUE(db_->PutRecord("job", "00000001", "{\"state\":\"RUNNING\"}").ok());
  // An unfinished job (as server/core/jobs.cc writes it: state 1 is running)
  // with no row in the queue: queued in the copy, as interrupted.
  const std::string running = R"({"id":"j2","model":"t:m","state":1})";
  ASSERT_TRUE(db_->PutRecord("job", "j2", running).ok());
  ASSERT_TRUE(db_->PutBlob("models/t:m/v1.head.pt", std::string(1 << 20, 'w')).ok());
  ASSERT_TRUE(db_->PutBlob("checkpoints/00000001.ckpt", "ck").ok());

  // The other kind of store, empty.
  std::string other_dir, other;
  if (GetParam() == "postgresql") {
    char dir[] = "/tmp/tlserve-db-XXXXXX";
    ASSERT_NE(mkdtemp(dir), nullptr);
    other_dir = dir;
    other = other_dir + "/tlserve.db";
  } else {
    ASSERT_NE(postgres, nullptr);
    other = postgres->NewDatabase(absl::StrCat("copy", ::getpid()));
    ASSERT_FALSE(other.empty());
  }
  auto to = Database::Open(other);
  ASSERT_TRUE(to.ok()) << to.status();
  std::vector<std::string> lines;
  auto report = CopyStore(*db_, **to, [&](const std::string& l) { lines.push_back(l); });
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->datasets, 2);
  EXPECT_EQ(report->examples, 301);
  EXPECT_EQ(report->records, 3);
  EXPECT_EQ(report->queued_jobs, 1);
  auto queue = (*to)->ListQueuedJobs();
  ASSERT_TRUE(queue.ok()) << queue.status();
  ASSERT_EQ(queue->size(), 1u);
  EXPECT_EQ((*queue)[0].id, "j2");
  EXPECT_EQ((*queue)[0].model, "t:m");
  EXPECT_EQ((*queue)[0].tenant, "t");
  EXPECT_EQ((*queue)[0].claims, 1);
  EXPECT_EQ(*(*to)->GetRecord("job", "j2"), running);
  EXPECT_EQ(report->blobs, 2);
  EXPECT_EQ(report->blob_bytes, (1 << 20) + 2);
  EXPECT_FALSE(lines.empty());
  auto info = (*to)->GetDataset("t:photos");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->images, 300);
  EXPECT_EQ(info->unlabelled, 43);
  auto copied = (*to)->ListExamples("t:photos");
  ASSERT_TRUE(copied.ok());
  ASSERT_EQ(copied->size(), 300u);
  EXPECT_EQ((*copied)[299].hash, examples[299].hash);
  auto bytes = (*to)->ReadExampleBytes({(*copied)[299].id});
  ASSERT_TRUE(bytes.ok());
  EXPECT_EQ((*bytes)[0], examples[299].bytes);
  EXPECT_EQ(*(*to)->GetRecord("job", "00000001"), "{\"state\":\"RUNNING\"}");
  EXPECT_EQ(*(*to)->GetBlob("checkpoints/00000001.ckpt"), "ck");

  // Twice: refused, and nothing changes in the source or the copy.
  auto twice = CopyStore(*db_, **to, [](const std::string&) {});
  EXPECT_EQ(twice.status().code(), absl::StatusCode::kFailedPrecondition) << twice.status();
  EXPECT_TRUE(absl::StrContains(twice.status().message(), "not empty")) << twice.status();
  to->reset();
  if (!other_dir.empty()) std::filesystem::remove_all(other_dir);
}

TEST_P(DatabaseTest, TheJobQueueHandsEachJobToOneClaimerUnderALease) {
  const auto first = [](const std::vector<Database::QueuedJob>&) { return size_t{0}; };
  Database::QueuedJob a{"ja", "t:m1", "t", "", 0}, b{"jb", "t:m2", "t", "", 0};
  ASSERT_TRUE(db_->QueueJob(a, R"({"n":1})").ok());
  ASSERT_TRUE(db_->QueueJob(b, R"({"n":2})").ok());
  EXPECT_EQ(*db_->GetRecord("job", "ja"), R"({"n":1})");
  // One unfinished job per model: refused whole, naming the job.
  absl::Status again = db_->QueueJob({"jc", "t:m1", "t", "", 0}, "{}");
  EXPECT_EQ(again.code(), absl::StatusCode::kAlreadyExists) << again;
  EXPECT_TRUE(absl::StrContains(again.message(), "ja")) << again;
  EXPECT_EQ(db_->GetRecord("job", "jc").status().code(), absl::StatusCode::kNotFound);

  // Oldest first; `pick` chooses among the free ones.
  auto got = db_->ClaimJob("X", absl::Seconds(60), [](const std::vector<Database::QueuedJob>& f) {
    EXPECT_EQ(f.size(), 2u);
    return size_t{1};
  });
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->id, "jb");
  EXPECT_EQ((*got)->claims, 0);
  got = db_->ClaimJob("X", absl::Seconds(60), first);
  ASSERT_TRUE(got.ok() && got->has_value());
  EXPECT_EQ((*got)->id, "ja");
  got = db_->ClaimJob("X", absl::Seconds(60), first);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_FALSE(got->has_value());
  auto held = db_->RenewJobLeases("X", absl::Seconds(60), {"ja", "jb", "nope"});
  ASSERT_TRUE(held.ok()) << held.status();
  EXPECT_EQ(std::set<std::string>(held->begin(), held->end()), (std::set<std::string>{"ja", "jb"}));

  // Writes are fenced by the lease.
  EXPECT_EQ(db_->PutClaimedJob("ja", "Y", "{}", Database::JobEnd::kKeep).code(),
            absl::StatusCode::kAborted);
  EXPECT_EQ(*db_->GetRecord("job", "ja"), R"({"n":1})");
  ASSERT_TRUE(db_->PutClaimedJob("ja", "X", R"({"n":3})", Database::JobEnd::kKeep).ok());
  EXPECT_EQ(*db_->GetRecord("job", "ja"), R"({"n":3})");

  // Released (a stop that pauses it): claimed again at once, as claimed before.
  // (SQLite offers X's other job to Z too: one process owns the file, so
  // another owner's claim is a dead process's.)
  ASSERT_TRUE(db_->PutClaimedJob("jb", "X", R"({"n":4})", Database::JobEnd::kRelease).ok());
  got = db_->ClaimJob("Z", absl::Seconds(60), [](const std::vector<Database::QueuedJob>& f) {
    EXPECT_EQ(f.back().id, "jb");
    return f.size() - 1;
  });
  ASSERT_TRUE(got.ok() && got->has_value());
  EXPECT_EQ((*got)->id, "jb");
  EXPECT_EQ((*got)->claims, 1);
  held = db_->RenewJobLeases("X", absl::Seconds(60), {"ja", "jb"});
  ASSERT_TRUE(held.ok());
  EXPECT_EQ(*held, std::vector<std::string>{"ja"});

  // Finished: out of the queue, and the model may queue its next job.
  ASSERT_TRUE(db_->PutClaimedJob("ja", "X", R"({"n":5})", Database::JobEnd::kFinish).ok());
  EXPECT_EQ(*db_->GetRecord("job", "ja"), R"({"n":5})");
  EXPECT_EQ(db_->PutClaimedJob("ja", "X", "{}", Database::JobEnd::kKeep).code(),
            absl::StatusCode::kAborted);
  ASSERT_TRUE(db_->QueueJob({"jd", "t:m1", "t", "", 0}, "{}").ok());

  // A job nobody holds ends at once; one a live replica holds does not.
  auto ended = db_->EndUnclaimedJob("jd", "X", R"({"cancelled":1})");
  ASSERT_TRUE(ended.ok()) << ended.status();
  EXPECT_TRUE(*ended);
  EXPECT_EQ(*db_->GetRecord("job", "jd"), R"({"cancelled":1})");
  ended = db_->EndUnclaimedJob("jb", "Z", "{}");
  ASSERT_TRUE(ended.ok());
  EXPECT_FALSE(*ended);  // Z itself holds it
  ended = db_->EndUnclaimedJob("jb", "X", R"({"cancelled":2})");
  ASSERT_TRUE(ended.ok());
  // PostgreSQL: Z's lease runs for a minute. SQLite: Z counts as dead.
  EXPECT_EQ(*ended, GetParam() == "sqlite");
  auto queue = db_->ListQueuedJobs();
  ASSERT_TRUE(queue.ok());
  EXPECT_EQ(queue->size(), GetParam() == "sqlite" ? 0u : 1u);
}

TEST_P(DatabaseTest, AJobWhoseLeaseRanOutIsClaimedAgain) {
  ASSERT_TRUE(db_->QueueJob({"j", "t:m", "t", "", 0}, "{}").ok());
  const auto first = [](const std::vector<Database::QueuedJob>&) { return size_t{0}; };
  auto got = db_->ClaimJob("dead", absl::Seconds(2), first);
  ASSERT_TRUE(got.ok() && got->has_value());
  if (GetParam() == "postgresql") {
    got = db_->ClaimJob("other", absl::Seconds(60), first);
    ASSERT_TRUE(got.ok());
    EXPECT_FALSE(got->has_value());  // still leased
    absl::SleepFor(absl::Milliseconds(2300));
  }
  got = db_->ClaimJob("other", absl::Seconds(60), first);
  ASSERT_TRUE(got.ok() && got->has_value()) << got.status();
  EXPECT_EQ((*got)->id, "j");
  EXPECT_EQ((*got)->claims, 1);
  // The dead owner's writes and renewals fail from now on.
  EXPECT_EQ(db_->PutClaimedJob("j", "dead", "{}", Database::JobEnd::kFinish).code(),
            absl::StatusCode::kAborted);
  auto held = db_->RenewJobLeases("dead", absl::Seconds(60), {"j"});
  ASSERT_TRUE(held.ok());
  EXPECT_TRUE(held->empty());
}

// --- PostgreSQL only --------------------------------------------------------

TEST(PostgresDatabaseTest, ReplicasStartingAtOnceOnAnEmptyDatabaseAgreeOnOneSchema) {
  ASSERT_NE(postgres, nullptr);
  const std::string uri = postgres->NewDatabase("racing_starts");
  ASSERT_FALSE(uri.empty());
  constexpr int kReplicas = 6;
  std::vector<absl::Status> results(kReplicas);
  std::vector<std::unique_ptr<Database>> dbs(kReplicas);
  std::vector<std::thread> threads;
  for (int i = 0; i < kReplicas; ++i) {
    threads.emplace_back([&, i] {
      auto db = Database::Open(uri);
      results[i] = db.status();
      if (db.ok()) dbs[i] = std::move(*db);
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kReplicas; ++i) ASSERT_TRUE(results[i].ok()) << i << ": " << results[i];
  auto* pg = dynamic_cast<PostgresDatabase*>(dbs[0].get());
  ASSERT_NE(pg, nullptr);
  auto version = pg->StoredSchemaVersion();
  ASSERT_TRUE(version.ok()) << version.status();
  EXPECT_EQ(*version, PostgresDatabase::SchemaVersion());
  // What one replica commits, another reads.
  const int64_t upload = dbs[1]->BeginUpload();
  ASSERT_TRUE(dbs[1]->StageExamples(upload, {Example("x", "l", "bytes", 7)}).ok());
  ASSERT_TRUE(dbs[1]->CommitUpload(upload, "shared", {}).ok());
  auto seen = dbs[2]->LoadExamples("shared");
  ASSERT_TRUE(seen.ok()) << seen.status();
  ASSERT_EQ(seen->size(), 1u);
  EXPECT_EQ((*seen)[0].bytes, "bytes");
}

TEST(PostgresDatabaseTest, CommitsToOneDatasetFromTwoReplicasTakeTurnsUnderTheQuota) {
  ASSERT_NE(postgres, nullptr);
  const std::string uri = postgres->NewDatabase("racing_commits");
  auto a = Database::Open(uri);
  auto b = Database::Open(uri);
  ASSERT_TRUE(a.ok() && b.ok());
  UploadQuota quota;
  quota.max_images = 5;
  // Each stages 3; both commit at once: exactly one fits.
  for (int round = 0; round < 5; ++round) {
    const std::string dataset = absl::StrCat("d", round);
    const int64_t ua = (*a)->BeginUpload(), ub = (*b)->BeginUpload();
    ASSERT_NE(ua, ub);
    std::vector<StoredExample> three = {Example("1", "l", "1", 1), Example("2", "l", "2", 2),
                                        Example("3", "l", "3", 3)};
    ASSERT_TRUE((*a)->StageExamples(ua, three).ok());
    ASSERT_TRUE((*b)->StageExamples(ub, three).ok());
    absl::StatusOr<int64_t> ra, rb;
    std::thread ta([&] { ra = (*a)->CommitUpload(ua, dataset, quota); });
    std::thread tb([&] { rb = (*b)->CommitUpload(ub, dataset, quota); });
    ta.join();
    tb.join();
    EXPECT_NE(ra.ok(), rb.ok()) << ra.status() << " / " << rb.status();
    auto info = (*a)->GetDataset(dataset);
    ASSERT_TRUE(info.ok());
    EXPECT_EQ(info->images, 3);
  }
}

TEST(PostgresDatabaseTest, EveryReplicaHearsOfEachCommittedRecordChange) {
  ASSERT_NE(postgres, nullptr);
  const std::string uri = postgres->NewDatabase("notifications");
  auto writer = Database::Open(uri);
  auto reader = Database::Open(uri);
  ASSERT_TRUE(writer.ok() && reader.ok());
  absl::Mutex mu;
  std::vector<std::string> heard;
  const int token = (*reader)->Subscribe([&](const std::string& kind, const std::string& key) {
    absl::MutexLock lock(&mu);
    heard.push_back(kind + "|" + key);
  });
  // Each subscription starts with a "reread everything" ("|").
  auto wait_for = [&](size_t n) {
    for (absl::Time end = absl::Now() + absl::Seconds(10); absl::Now() < end;) {
      {
        absl::MutexLock lock(&mu);
        if (heard.size() >= n) return true;
      }
      absl::SleepFor(absl::Milliseconds(10));
    }
    return false;
  };
  ASSERT_TRUE(wait_for(1));
  ASSERT_TRUE((*writer)->CreateRecord("model", "t:m", "{}").ok());
  ASSERT_TRUE((*writer)->PutRecord("model", "t:m", "{\"v\":2}").ok());
  ASSERT_TRUE((*writer)->PutRecord("job", "j1", "{}").ok());
  ASSERT_TRUE((*writer)->DeleteRecords("model", "t:m").ok());
  ASSERT_TRUE(wait_for(5));
  // A connection lost and back: "reread everything" again.
  ASSERT_TRUE(postgres->Exec(
      "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'notifications' "
      "AND query LIKE 'LISTEN%'"));
  ASSERT_TRUE(wait_for(6));
  (*reader)->Unsubscribe(token);
  absl::MutexLock lock(&mu);
  EXPECT_EQ(std::vector<std::string>(heard.begin(), heard.begin() + 6),
            (std::vector<std::string>{"|", "model|t:m", "model|t:m", "job|j1", "model|t:m", "|"}));
}

TEST(PostgresDatabaseTest, ClaimersAtOnceNeverShareAJob) {
  ASSERT_NE(postgres, nullptr);
  const std::string uri = postgres->NewDatabase("claimers");
  auto setup = Database::Open(uri);
  ASSERT_TRUE(setup.ok()) << setup.status();
  constexpr int kJobs = 40;
  for (int i = 0; i < kJobs; ++i) {
    const std::string id = absl::StrCat("j", i);
    ASSERT_TRUE((*setup)->QueueJob({id, absl::StrCat("t:m", i), "t", "", 0}, "{}").ok());
  }
  // Four replicas, each on its own connections (opened first), claim at once
  // until none is left.
  std::vector<std::unique_ptr<Database>> dbs;
  for (int r = 0; r < 4; ++r) {
    auto db = Database::Open(uri);
    ASSERT_TRUE(db.ok()) << db.status();
    dbs.push_back(std::move(*db));
  }
  absl::Mutex mu;
  std::map<std::string, int> claimed;
  std::atomic<int> ready{0};
  std::vector<std::thread> replicas;
  for (int r = 0; r < 4; ++r) {
    replicas.emplace_back([&, r] {
      Database* db = dbs[r].get();
      for (++ready; ready < 4;) std::this_thread::yield();
      for (;;) {
        auto got = db->ClaimJob(absl::StrCat("replica", r), absl::Seconds(60),
                                [](const std::vector<Database::QueuedJob>&) { return 0; });
        ASSERT_TRUE(got.ok()) << got.status();
        if (!got->has_value()) return;
        absl::MutexLock lock(&mu);
        ++claimed[(*got)->id];
      }
    });
  }
  for (auto& t : replicas) t.join();
  EXPECT_EQ(claimed.size(), static_cast<size_t>(kJobs));
  for (const auto& [id, n] : claimed) EXPECT_EQ(n, 1) << id;
}

TEST(PostgresDatabaseTest, ReplicasShareTheDatabaseAndACopyHasItAlone) {
  ASSERT_NE(postgres, nullptr);
  const std::string uri = postgres->NewDatabase("attached");
  auto a = Database::Open(uri);
  auto b = Database::Open(uri);
  auto copy = Database::Open(uri);
  ASSERT_TRUE(a.ok() && b.ok() && copy.ok());
  ASSERT_TRUE((*a)->AttachReplica().ok());
  ASSERT_TRUE((*b)->AttachReplica().ok());  // shared
  auto locked = (*copy)->LockForCopy();
  ASSERT_TRUE(locked.ok()) << locked.status();
  EXPECT_FALSE(*locked);
  a->reset();  // the replicas go (one as kill -9 would: its session ended)
  ASSERT_TRUE(postgres->Exec(
      "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"));
  b->reset();
  bool alone = false;
  for (int i = 0; i < 100 && !alone; ++i) {
    auto r = (*copy)->LockForCopy();
    ASSERT_TRUE(r.ok()) << r.status();
    alone = *r;
    if (!alone) absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_TRUE(alone);
  // A replica that starts during the copy is refused (after a few seconds' grace).
  auto late = Database::Open(uri);
  ASSERT_TRUE(late.ok());
  absl::Status s = (*late)->AttachReplica();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "migrate")) << s;
  char dir[] = "/tmp/tlserve-lead-XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  auto lite = Database::Open(std::string(dir) + "/tlserve.db");
  ASSERT_TRUE(lite.ok());
  EXPECT_TRUE((*lite)->AttachReplica().ok());  // the data directory's lock does this
  EXPECT_TRUE(*(*lite)->LockForCopy());
  lite->reset();
  std::filesystem::remove_all(dir);
}

TEST(PostgresDatabaseTest, AnUnreachableServerIsUnavailableAndThePasswordStaysSecret) {
  // A port nothing listens on (the server's own, plus one, is as good as any:
  // pg-temp picks free ports).
  auto db = Database::Open("postgresql://tlserve:s3cret@127.0.0.1:1/tlserve?connect_timeout=2");
  ASSERT_FALSE(db.ok());
  EXPECT_EQ(db.status().code(), absl::StatusCode::kUnavailable) << db.status();
  EXPECT_FALSE(absl::StrContains(db.status().message(), "s3cret")) << db.status();
  EXPECT_TRUE(absl::StrContains(db.status().message(), "127.0.0.1")) << db.status();
  EXPECT_EQ(PostgresDatabase::Redacted("postgresql://u:pw@h:5432/db?sslmode=require"),
            "postgresql://u:***@h:5432/db?sslmode=require");
  EXPECT_EQ(PostgresDatabase::Redacted("postgres://h/db?user=u&password=pw&x=1"),
            "postgres://h/db?user=u&password=***&x=1");
  EXPECT_EQ(PostgresDatabase::Redacted("postgresql://u@h/db"), "postgresql://u@h/db");
}

TEST(PostgresDatabaseTest, ANewerSchemaThanThisBuildIsRefused) {
  ASSERT_NE(postgres, nullptr);
  const std::string uri = postgres->NewDatabase("from_the_future");
  {
    auto db = Database::Open(uri);
    ASSERT_TRUE(db.ok()) << db.status();
  }
  {
    // Record a version this build does not know, through a second connection.
    PGconn* c = PQconnectdb(uri.c_str());
    ASSERT_EQ(PQstatus(c), CONNECTION_OK);
    PGresult* r = PQexec(c, "INSERT INTO schema_migrations(version) VALUES (1000)");
    EXPECT_EQ(PQresultStatus(r), PGRES_COMMAND_OK);
    PQclear(r);
    PQfinish(c);
  }
  auto db = Database::Open(uri);
  ASSERT_FALSE(db.ok());
  EXPECT_EQ(db.status().code(), absl::StatusCode::kFailedPrecondition) << db.status();
  EXPECT_TRUE(absl::StrContains(db.status().message(), "1000")) << db.status();
}

// A database written before the job queue (schema 3, one replica ran every
// job): its unfinished jobs are queued by the migration that adds the queue.
TEST(PostgresDatabaseTest, JobsLeftUnfinishedBeforeTheQueueAreQueuedByItsMigration) {
  ASSERT_NE(postgres, nullptr);
  const std::string uri = postgres->NewDatabase("before_the_queue");
  {
    auto db = Database::Open(uri);
    ASSERT_TRUE(db.ok()) << db.status();
    // As server/core/jobs.cc writes them: state 0 queued, 1 running, 2 succeeded.
    ASSERT_TRUE(
        (*db)->PutRecord("job", "j-run", R"({"model":"t:a","state":1,"created_unix":2})").ok());
    ASSERT_TRUE(
        (*db)->PutRecord("job", "j-wait", R"({"model":"b","state":0,"created_unix":3})").ok());
    ASSERT_TRUE(
        (*db)->PutRecord("job", "j-done", R"({"model":"c","state":2,"created_unix":1})").ok());
  }
  // Back to schema 3, through a second connection.
  PGconn* c = PQconnectdb(uri.c_str());
  ASSERT_EQ(PQstatus(c), CONNECTION_OK);
  PGresult* r = PQexec(c, "DROP TABLE job_queue; DELETE FROM schema_migrations WHERE version = 4");
  EXPECT_EQ(PQresultStatus(r), PGRES_COMMAND_OK) << PQresultErrorMessage(r);
  PQclear(r);
  PQfinish(c);
  auto db = Database::Open(uri);
  ASSERT_TRUE(db.ok()) << db.status();
  auto queue = (*db)->ListQueuedJobs();
  ASSERT_TRUE(queue.ok()) << queue.status();
  ASSERT_EQ(queue->size(), 2u);
  EXPECT_EQ((*queue)[0].id, "j-run");
  EXPECT_EQ((*queue)[0].model, "t:a");
  EXPECT_EQ((*queue)[0].tenant, "t");
  EXPECT_EQ((*queue)[0].claims, 1);  // it was running: interrupted
  EXPECT_EQ((*queue)[1].id, "j-wait");
  EXPECT_EQ((*queue)[1].tenant, "default");
  EXPECT_EQ((*queue)[1].claims, 0);
}

TEST(PostgresDatabaseTest, ALostConnectionIsReestablishedByTheNextCall) {
  ASSERT_NE(postgres, nullptr);
  const std::string uri = postgres->NewDatabase("reconnects");
  auto db = Database::Open(uri);
  ASSERT_TRUE(db.ok()) << db.status();
  ASSERT_TRUE((*db)->PutRecord("model", "m", "{}").ok());
  // The server ends every session of that database (as a restart or a
  // failover would).
  ASSERT_TRUE(postgres->Exec(
      "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'reconnects'"));
  auto records = (*db)->ListRecords("model");
  ASSERT_TRUE(records.ok()) << records.status();
  EXPECT_EQ(records->size(), 1u);
}

}  // namespace
}  // namespace tlserve
