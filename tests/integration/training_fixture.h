// The fixture of the tests that train on a live in-process server: a server
// on loopback over a temporary data directory, a client, and helpers for
// datasets (Fashion-MNIST fixtures), models, jobs and Classify.
//
// With $TLSERVE_TEST_DATABASE=postgresql (CTest's *_postgresql entries) the
// state lives in PostgreSQL instead: one throwaway server per test binary
// (tests/postgres_util.h), a fresh database per test, and a fresh, empty
// --data_dir at every (re)start, so that nothing kept in local files can
// carry state across a restart unnoticed.
#ifndef TLSERVE_TESTS_INTEGRATION_TRAINING_FIXTURE_H_
#define TLSERVE_TESTS_INTEGRATION_TRAINING_FIXTURE_H_

#include <grpcpp/client_context.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/lib/client.h"
#include "client/lib/image_files.h"
#include "server/api/server.h"
#include "tests/integration/loopback_options.h"
#include "tests/postgres_util.h"
#include "tests/test_util.h"
#include "tlserve/v1/models.grpc.pb.h"

namespace tlserve::testing {

// ImageFolder files: (path, label).
std::vector<std::pair<std::string, std::string>> Folder(const std::string& dir) {
  std::vector<std::pair<std::string, std::string>> out;
  auto files = ListImageFiles({dir});
  EXPECT_TRUE(files.ok()) << files.status();
  if (!files.ok()) return out;
  for (const auto& f : *files) {
    out.emplace_back(f, std::filesystem::path(f).parent_path().filename().string());
  }
  return out;
}

class TrainingTest : public ::testing::Test {
 protected:
  // The server's options: the small fixture backbone on loopback.
  // Per-model metric series by name (--metrics_model_labels): the training
  // tests check them; security_test checks that the default has none.
  virtual ServerOptions Options(const std::string& data_dir) {
    ServerOptions o = testing::LoopbackOptions("r18small.pt", data_dir);
    o.metrics_model_labels = true;
    return o;
  }
  void SetUp() override {
    char tmpl[] = "/tmp/tlserve-train-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    if (OnPostgres()) {
      static std::atomic<int> next{0};
      ASSERT_NE(SharedPostgres(), nullptr) << "no PostgreSQL server for the test";
      database_ = SharedPostgres()->NewDatabase(absl::StrCat("t", ::getpid(), "_", next++));
      ASSERT_FALSE(database_.empty());
    }
    Restart();
  }
  static bool OnPostgres() {
    const char* d = std::getenv("TLSERVE_TEST_DATABASE");
    return d != nullptr && std::string(d) == "postgresql";
  }
  // Started on first use, stopped when the test binary exits.
  static TempPostgres* SharedPostgres() {
    static const std::unique_ptr<TempPostgres> server = [] {
      std::string error;
      auto pg = TempPostgres::Start(&error);
      if (pg == nullptr) std::fprintf(stderr, "%s\n", error.c_str());
      return pg;
    }();
    return server.get();
  }
  // The job checkpoints the store holds now (files of the data directory,
  // or rows of PostgreSQL's blobs table).
  int StoredCheckpoints() {
    if (OnPostgres()) {
      PGconn* c = PQconnectdb(database_.c_str());
      PGresult* r = PQexec(c, "SELECT count(*) FROM blobs WHERE name LIKE 'checkpoints/%'");
      const int n = PQresultStatus(r) == PGRES_TUPLES_OK ? std::atoi(PQgetvalue(r, 0, 0)) : -1;
      PQclear(r);
      PQfinish(c);
      return n;
    }
    int n = 0;
    std::error_code ignored;
    for (const auto& e : std::filesystem::directory_iterator(dir_ + "/checkpoints", ignored)) {
      n += e.path().extension() == ".ckpt";
    }
    return n;
  }
  void Restart() {
    stub_.reset();
    client_.reset();
    server_.reset();
    ServerOptions options = Options(dir_);
    if (OnPostgres()) {
      options.data_dir = absl::StrCat(dir_, "/start-", starts_);
      options.database = database_;
    }
    ++starts_;
    auto s = Server::Start(options);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    auto c = Client::Connect(absl::StrCat("127.0.0.1:", server_->grpc_port()));
    ASSERT_TRUE(c.ok());
    client_ = std::move(*c);
    stub_ = v1::Models::NewStub(client_->channel());
  }
  void UploadTrainingSet() {
    auto files = Folder(Fixture("fmnist/train"));
    auto r = client_->UploadDataset("fmnist", false, files.size(), 16,
                                    [&](size_t i) -> absl::StatusOr<v1::Example> {
                                      v1::Example e;
                                      e.set_name(files[i].first);
                                      e.set_label(files[i].second);
                                      e.set_encoded(ReadBytes(files[i].first));
                                      return e;
                                    });
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->accepted(), 120);
  }
  absl::Status CreateModel(const std::string& name, const std::string& dataset,
                           std::vector<std::string> classes = {}) {
    grpc::ClientContext ctx;
    v1::CreateModelRequest req;
    req.set_name(name);
    req.set_dataset(dataset);
    for (const auto& c : classes) req.add_classes(c);
    v1::Model m;
    return FromGrpc(stub_->CreateModel(&ctx, req, &m));
  }
  absl::StatusOr<v1::Job> Start(const std::string& model, const std::string& dataset,
                                const v1::TrainingOptions& options = {}) {
    grpc::ClientContext ctx;
    v1::StartTrainingRequest req;
    req.set_model(model);
    req.set_dataset(dataset);
    *req.mutable_options() = options;
    v1::Job job;
    if (auto s = FromGrpc(stub_->StartTraining(&ctx, req, &job)); !s.ok()) return s;
    return job;
  }
  std::vector<v1::Job> Watch(const std::string& id) {
    grpc::ClientContext ctx;
    v1::WatchJobRequest req;
    req.set_id(id);
    auto reader = stub_->WatchJob(&ctx, req);
    std::vector<v1::Job> seen;
    v1::Job j;
    while (reader->Read(&j)) seen.push_back(j);
    EXPECT_TRUE(reader->Finish().ok());
    return seen;
  }
  absl::StatusOr<v1::ClassifyResponse> Classify(const std::string& model,
                                                const std::vector<std::string>& files) {
    grpc::ClientContext ctx;
    // Bounded: a call that cannot be served fails the test instead of hanging it.
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(2));
    v1::ClassifyRequest req;
    req.set_model(model);
    req.set_top_k(2);
    for (const auto& f : files) {
      v1::Image* img = req.add_images();
      img->set_name(f);
      img->set_encoded(ReadBytes(f));
    }
    v1::ClassifyResponse resp;
    if (auto s = FromGrpc(stub_->Classify(&ctx, req, &resp)); !s.ok()) return s;
    return resp;
  }

  absl::StatusOr<v1::Model> Unfreeze(const std::string& model, std::vector<std::string> stages,
                                     const std::string& from = "") {
    grpc::ClientContext ctx;
    v1::UnfreezeLayersRequest req;
    req.set_model(model);
    for (const auto& st : stages) req.add_stages(st);
    req.set_from(from);
    v1::Model m;
    if (auto s = FromGrpc(stub_->UnfreezeLayers(&ctx, req, &m)); !s.ok()) return s;
    return m;
  }
  v1::Job GetJob(const std::string& id) {
    grpc::ClientContext ctx;
    v1::GetJobRequest req;
    req.set_id(id);
    v1::Job j;
    EXPECT_TRUE(stub_->GetJob(&ctx, req, &j).ok());
    return j;
  }
  std::vector<float> EmbedValues(const std::string& file) {
    v1::EmbedRequest req;
    v1::Image* img = req.add_images();
    img->set_encoded(ReadBytes(file));
    auto r = client_->Embed(req);
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return {};
    return {r->embeddings(0).values().begin(), r->embeddings(0).values().end()};
  }

  std::string dir_;
  std::string database_;  // the PostgreSQL database's URI, or empty (SQLite in dir_)
  int starts_ = 0;
  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> client_;
  std::unique_ptr<v1::Models::Stub> stub_;
};

}  // namespace tlserve::testing

#endif  // TLSERVE_TESTS_INTEGRATION_TRAINING_FIXTURE_H_
