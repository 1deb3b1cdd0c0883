// Issue 11: TLS and mutual TLS, API keys and roles, tenants that cannot see
// each other, quotas, the audit trail and fairness between tenants — against
// a real server on loopback, with certificates made by the openssl CLI.
#include "server/api/security.h"

#include <google/protobuf/descriptor.h>
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/credentials.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "client/lib/image_files.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "inference/open_inference.pb.h"
#include "server/api/server.h"
#include "server/core/sha256.h"
#include "tests/integration/http_get.h"
#include "tests/integration/loopback_options.h"
#include "tests/test_util.h"
#include "tlserve/v1/datasets.grpc.pb.h"
#include "tlserve/v1/inference.grpc.pb.h"
#include "tlserve/v1/models.grpc.pb.h"

namespace tlserve::testing {
namespace {

using Clock = std::chrono::system_clock;

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
void Write(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  std::ofstream(tmp, std::ios::binary) << text;
  std::filesystem::rename(tmp, path);  // atomic, as a Secret volume update is
}

// A key line of the --api_keys file.
std::string KeyLine(const std::string& tenant, const std::string& role, const std::string& key,
                    const std::string& label) {
  return absl::StrCat(tenant, " ", role, " ", Sha256Hex(key), " ", label, "\n");
}

// Three images of each label of the Fashion-MNIST fixture, by label.
std::map<std::string, std::vector<std::string>> Images() {
  std::map<std::string, std::vector<std::string>> out;
  auto files = ListImageFiles({Fixture("fmnist/train")});
  EXPECT_TRUE(files.ok());
  for (const auto& f : *files) {
    out[std::filesystem::path(f).parent_path().filename().string()].push_back(f);
  }
  return out;
}

// A CA, a server certificate for 127.0.0.1/localhost and a client
// certificate with CN acme-client, made with the openssl CLI.
struct Pki {
  std::string dir, ca, ca_key, cert, key, client_cert, client_key;
  explicit Pki(const std::string& d) : dir(d) {
    ca = dir + "/ca.crt";
    ca_key = dir + "/ca.key";
    cert = dir + "/server.crt";
    key = dir + "/server.key";
    client_cert = dir + "/client.crt";
    client_key = dir + "/client.key";
    const std::string q = " >/dev/null 2>&1";
    Run(absl::StrCat("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=test-ca -keyout ",
                     ca_key, " -out ", ca, q));
    Issue("server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1", cert, key);
    Issue("client", "acme-client", "extendedKeyUsage=clientAuth", client_cert, client_key);
  }
  void Issue(const std::string& name, const std::string& cn, const std::string& ext,
             const std::string& crt, const std::string& k) {
    const std::string csr = dir + "/" + name + ".csr", extfile = dir + "/" + name + ".ext";
    std::ofstream(extfile) << ext << "\n";
    Run(absl::StrCat("openssl req -newkey rsa:2048 -nodes -subj /CN=", cn, " -keyout ", k, " -out ",
                     csr, " >/dev/null 2>&1"));
    Run(absl::StrCat("openssl x509 -req -in ", csr, " -CA ", ca, " -CAkey ", ca_key,
                     " -CAcreateserial -days 2 -extfile ", extfile, " -out ", crt,
                     " >/dev/null 2>&1"));
  }
  static void Run(const std::string& cmd) { ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd; }
};

// One client of the server: a channel and the key it sends.
struct Conn {
  Conn(std::shared_ptr<grpc::Channel> c, std::string k)
      : channel(std::move(c)), key(std::move(k)) {}
  std::shared_ptr<grpc::Channel> channel;
  std::string key;

  std::unique_ptr<grpc::ClientContext> Context(int seconds = 120) const {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(Clock::now() + std::chrono::seconds(seconds));
    if (!key.empty()) ctx->AddMetadata("authorization", "Bearer " + key);
    return ctx;
  }
  v1::Models::Stub* models() {
    if (!models_) models_ = v1::Models::NewStub(channel);
    return models_.get();
  }
  v1::Datasets::Stub* datasets() {
    if (!datasets_) datasets_ = v1::Datasets::NewStub(channel);
    return datasets_.get();
  }
  v1::Inference::Stub* inference() {
    if (!inference_) inference_ = v1::Inference::NewStub(channel);
    return inference_.get();
  }

  // Uploads `files` (label = their folder) in messages of `per_message`.
  grpc::Status Upload(const std::string& dataset, const std::vector<std::string>& files,
                      int per_message = 8) {
    auto ctx = Context();
    v1::UploadDatasetResponse resp;
    auto writer = datasets()->UploadDataset(ctx.get(), &resp);
    v1::UploadDatasetRequest req;
    req.set_dataset(dataset);
    for (size_t i = 0; i < files.size(); ++i) {
      v1::Example* e = req.add_examples();
      e->set_name(files[i]);
      e->set_label(std::filesystem::path(files[i]).parent_path().filename().string());
      e->set_encoded(ReadBytes(files[i]));
      if (req.examples_size() == per_message || i + 1 == files.size()) {
        req.set_commit(i + 1 == files.size());
        if (!writer->Write(req)) break;
        req.Clear();
        req.set_dataset(dataset);
      }
    }
    writer->WritesDone();
    return writer->Finish();
  }
  grpc::Status CreateModel(const std::string& name, const std::string& dataset) {
    auto ctx = Context();
    v1::CreateModelRequest req;
    req.set_name(name);
    req.set_dataset(dataset);
    v1::Model m;
    return models()->CreateModel(ctx.get(), req, &m);
  }
  grpc::Status Unfreeze(const std::string& model, const std::string& stage) {
    auto ctx = Context();
    v1::UnfreezeLayersRequest req;
    req.set_model(model);
    req.add_stages(stage);
    v1::Model m;
    return models()->UnfreezeLayers(ctx.get(), req, &m);
  }
  grpc::Status StartTraining(const std::string& model, const std::string& dataset, v1::Job* job) {
    auto ctx = Context();
    v1::StartTrainingRequest req;
    req.set_model(model);
    req.set_dataset(dataset);
    req.mutable_options()->set_epochs(1);
    return models()->StartTraining(ctx.get(), req, job);
  }
  v1::Job GetJob(const std::string& id) {
    auto ctx = Context();
    v1::GetJobRequest req;
    req.set_id(id);
    v1::Job j;
    EXPECT_TRUE(models()->GetJob(ctx.get(), req, &j).ok());
    return j;
  }
  grpc::Status GetModel(const std::string& name, v1::Model* m = nullptr) {
    auto ctx = Context();
    v1::GetModelRequest req;
    req.set_name(name);
    v1::Model local;
    return models()->GetModel(ctx.get(), req, m ? m : &local);
  }
  std::vector<v1::Model> ListModels() {
    auto ctx = Context();
    v1::ListModelsResponse resp;
    EXPECT_TRUE(models()->ListModels(ctx.get(), {}, &resp).ok());
    return {resp.models().begin(), resp.models().end()};
  }
  // Trains a head and waits for its version (WatchJob to the end).
  grpc::Status Train(const std::string& model, const std::string& dataset, v1::Job* job) {
    auto ctx = Context();
    v1::StartTrainingRequest req;
    req.set_model(model);
    req.set_dataset(dataset);
    req.mutable_options()->set_epochs(3);
    grpc::Status s = models()->StartTraining(ctx.get(), req, job);
    if (!s.ok()) return s;
    auto wctx = Context(300);
    v1::WatchJobRequest w;
    w.set_id(job->id());
    auto reader = models()->WatchJob(wctx.get(), w);
    while (reader->Read(job)) {
    }
    return reader->Finish();
  }
  grpc::Status Classify(const std::string& model, const std::vector<std::string>& files,
                        v1::ClassifyResponse* resp, int seconds = 120) {
    auto ctx = Context(seconds);
    v1::ClassifyRequest req;
    req.set_model(model);
    for (const auto& f : files) req.add_images()->set_encoded(ReadBytes(f));
    return models()->Classify(ctx.get(), req, resp);
  }
  grpc::Status Embed(const std::vector<std::string>& files, int seconds = 120) {
    auto ctx = Context(seconds);
    v1::EmbedRequest req;
    for (const auto& f : files) req.add_images()->set_encoded(ReadBytes(f));
    v1::EmbedResponse resp;
    return inference()->Embed(ctx.get(), req, &resp);
  }

 private:
  std::unique_ptr<v1::Models::Stub> models_;
  std::unique_ptr<v1::Datasets::Stub> datasets_;
  std::unique_ptr<v1::Inference::Stub> inference_;
};

class SecurityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/tlserve-security-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    keys_file_ = dir_ + "/api_keys";
    Write(keys_file_, "# tenants of the test\n" +
                          KeyLine("acme", "write", "acme-write-key", "acme-ci") +
                          KeyLine("acme", "read", "acme-read-key", "acme-dashboard") +
                          KeyLine("beta", "write", "beta-write-key", "beta-ci") +
                          KeyLine("ops", "admin", "ops-admin-key", "ops") +
                          "acme write cn:acme-client acme-cert\n");
  }
  void TearDown() override {
    server_.reset();
    std::filesystem::remove_all(dir_);
  }
  ServerOptions Options() {
    ServerOptions o = LoopbackOptions("r18tiny.pt", dir_ + "/data");
    o.security.api_keys_file = keys_file_;
    o.security.audit_log_file = dir_ + "/audit.jsonl";
    return o;
  }
  void Start(const ServerOptions& o) {
    auto s = Server::Start(o);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    target_ = absl::StrCat("127.0.0.1:", server_->grpc_port());
  }
  Conn Plain(const std::string& key) {
    return Conn{grpc::CreateChannel(target_, grpc::InsecureChannelCredentials()), key};
  }

  std::string dir_, keys_file_, target_;
  std::unique_ptr<Server> server_;
};

TEST(SecurityRules, EveryMethodOfEveryServiceHasARule) {
  const auto* pool = google::protobuf::DescriptorPool::generated_pool();
  ASSERT_NE(inference::ModelInferRequest::descriptor(), nullptr);  // linked in
  int methods = 0;
  for (const char* service : {"tlserve.v1.Inference", "tlserve.v1.Datasets", "tlserve.v1.Models",
                              "inference.GRPCInferenceService"}) {
    const auto* s = pool->FindServiceByName(service);
    ASSERT_NE(s, nullptr) << service;
    for (int i = 0; i < s->method_count(); ++i, ++methods) {
      EXPECT_TRUE(RuleOf(s->method(i)->name()).ok()) << service << "/" << s->method(i)->name();
    }
  }
  EXPECT_GE(methods, 27);
  EXPECT_FALSE(RuleOf("NoSuchMethod").ok());
}

TEST_F(SecurityTest, KeysAndRolesOnEveryRpcFamily) {
  Start(Options());
  auto images = Images();
  Conn none = Plain(""), wrong = Plain("not-a-key"), reader = Plain("acme-read-key"),
       writer = Plain("acme-write-key");
  const std::vector<std::string> one = {images["sandal"][0]};

  // Missing or unknown key: UNAUTHENTICATED, on every family.
  for (Conn* c : {&none, &wrong}) {
    EXPECT_EQ(c->Embed(one).error_code(), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_EQ(c->GetModel("x").error_code(), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_EQ(c->CreateModel("x", "d").error_code(), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_EQ(c->Upload("d", one).error_code(), grpc::StatusCode::UNAUTHENTICATED);
    v1::ClassifyResponse r;
    EXPECT_EQ(c->Classify("x", one, &r).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  // A read key reads (describe, embed, list, get) but cannot write.
  {
    auto ctx = reader.Context();
    v1::DescribeBackboneResponse d;
    EXPECT_TRUE(reader.inference()->DescribeBackbone(ctx.get(), {}, &d).ok());
  }
  EXPECT_TRUE(reader.Embed(one).ok());
  EXPECT_TRUE(reader.ListModels().empty());
  EXPECT_EQ(reader.GetModel("x").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(reader.Upload("d", one).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(reader.CreateModel("x", "d").error_code(), grpc::StatusCode::PERMISSION_DENIED);
  {
    auto ctx = reader.Context();
    v1::DeleteDatasetRequest req;
    req.set_name("d");
    v1::DeleteDatasetResponse resp;
    EXPECT_EQ(reader.datasets()->DeleteDataset(ctx.get(), req, &resp).error_code(),
              grpc::StatusCode::PERMISSION_DENIED);
  }
  {
    auto ctx = reader.Context();
    v1::StartTrainingRequest req;
    req.set_model("x");
    req.set_dataset("d");
    v1::Job job;
    EXPECT_EQ(reader.models()->StartTraining(ctx.get(), req, &job).error_code(),
              grpc::StatusCode::PERMISSION_DENIED);
  }
  {
    auto ctx = reader.Context();
    v1::ExportModelRequest req;
    req.set_model("x");
    auto stream = reader.models()->ExportModel(ctx.get(), req);
    v1::ExportModelResponse chunk;
    while (stream->Read(&chunk)) {
    }
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::PERMISSION_DENIED);
  }
  EXPECT_EQ(reader.Unfreeze("x", "layer4").error_code(), grpc::StatusCode::PERMISSION_DENIED);
  {
    auto ctx = reader.Context();
    v1::CancelJobRequest req;
    req.set_id("no-such-job");
    v1::Job job;
    EXPECT_EQ(reader.models()->CancelJob(ctx.get(), req, &job).error_code(),
              grpc::StatusCode::PERMISSION_DENIED);
  }
  {
    auto ctx = reader.Context();
    v1::DeleteModelRequest req;
    req.set_name("x");
    v1::DeleteModelResponse resp;
    EXPECT_EQ(reader.models()->DeleteModel(ctx.get(), req, &resp).error_code(),
              grpc::StatusCode::PERMISSION_DENIED);
  }
  // Reads of the jobs family: allowed (an unknown job is NOT_FOUND).
  {
    auto ctx = reader.Context();
    v1::ListJobsResponse jobs;
    EXPECT_TRUE(reader.models()->ListJobs(ctx.get(), {}, &jobs).ok());
  }
  // Streams: a read key may embed; no key may not.
  for (Conn* c : {&reader, &none}) {
    auto ctx = c->Context();
    auto stream = c->inference()->StreamEmbed(ctx.get());
    v1::StreamEmbedRequest req;
    req.add_images()->set_encoded(ReadBytes(one[0]));
    stream->Write(req);
    stream->WritesDone();
    v1::StreamEmbedResponse resp;
    int results = 0;
    while (stream->Read(&resp)) results += resp.results_size();
    const grpc::Status s = stream->Finish();
    if (c == &reader) {
      EXPECT_TRUE(s.ok()) << s.error_message();
      EXPECT_EQ(results, 1);
    } else {
      EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
      EXPECT_EQ(results, 0);
    }
  }
  // The write key does all of it.
  ASSERT_TRUE(writer.Upload("d", {images["sandal"][0], images["t-shirt"][0]}).ok());
  EXPECT_TRUE(writer.CreateModel("x", "d").ok());
  EXPECT_TRUE(reader.GetModel("x").ok());  // the same tenant's read key sees it
  // Health stays open without a key.
  auto health = grpc::health::v1::Health::NewStub(none.channel);
  grpc::ClientContext hctx;
  grpc::health::v1::HealthCheckResponse h;
  EXPECT_TRUE(health->Check(&hctx, {}, &h).ok());
  EXPECT_EQ(h.status(), grpc::health::v1::HealthCheckResponse::SERVING);

  // The audit trail: allowed writes and denied calls, with tenant and key
  // label, never the key.
  server_.reset();
  const std::string audit = Slurp(dir_ + "/audit.jsonl");
  EXPECT_FALSE(absl::StrContains(audit, "acme-write-key")) << audit;
  EXPECT_FALSE(absl::StrContains(audit, "acme-read-key"));
  bool created = false, denied = false, unauthenticated = false;
  for (absl::string_view line : absl::StrSplit(audit, '\n', absl::SkipEmpty())) {
    created |= absl::StrContains(line, R"("method":"CreateModel")") &&
               absl::StrContains(line, R"("outcome":"OK")") &&
               absl::StrContains(line, R"("tenant":"acme")") &&
               absl::StrContains(line, R"("key":"acme-ci")") &&
               absl::StrContains(line, R"("object":"x")") && absl::StrContains(line, "\"peer\"");
    denied |= absl::StrContains(line, R"("outcome":"PERMISSION_DENIED")") &&
              absl::StrContains(line, R"("key":"acme-dashboard")");
    unauthenticated |= absl::StrContains(line, R"("outcome":"UNAUTHENTICATED")");
  }
  EXPECT_TRUE(created) << audit;
  EXPECT_TRUE(denied) << audit;
  EXPECT_TRUE(unauthenticated) << audit;
}

TEST_F(SecurityTest, TenantsAreIsolatedAndShareNames) {
  Start(Options());
  auto images = Images();
  Conn acme = Plain("acme-write-key"), beta = Plain("beta-write-key"),
       admin = Plain("ops-admin-key");
  // Both tenants: a dataset `d` and a model `shirts`, with different classes.
  std::vector<std::string> a_files, b_files;
  for (int i = 0; i < 12; ++i) {
    a_files.push_back(images["sandal"][i]);
    a_files.push_back(images["t-shirt"][i]);
    b_files.push_back(images["trouser"][i]);
    b_files.push_back(images["t-shirt"][i]);
  }
  ASSERT_TRUE(acme.Upload("d", a_files).ok());
  ASSERT_TRUE(beta.Upload("d", b_files).ok());
  ASSERT_TRUE(acme.CreateModel("shirts", "d").ok());
  ASSERT_TRUE(beta.CreateModel("shirts", "d").ok());
  v1::Job a_job, b_job;
  ASSERT_TRUE(acme.Train("shirts", "d", &a_job).ok());
  ASSERT_TRUE(beta.Train("shirts", "d", &b_job).ok());
  ASSERT_EQ(a_job.state(), v1::Job::SUCCEEDED) << a_job.error();
  ASSERT_EQ(b_job.state(), v1::Job::SUCCEEDED) << b_job.error();
  // Each classifies with its own model.
  v1::ClassifyResponse a_resp, b_resp;
  ASSERT_TRUE(acme.Classify("shirts", {images["trouser"][20]}, &a_resp).ok());
  ASSERT_TRUE(beta.Classify("shirts", {images["trouser"][20]}, &b_resp).ok());
  for (const auto& p : a_resp.results(0).top()) EXPECT_NE(p.label(), "trouser");
  for (const auto& p : b_resp.results(0).top()) EXPECT_NE(p.label(), "sandal");
  EXPECT_EQ(b_resp.results(0).top(0).label(), "trouser");

  // acme's own objects: beta gets NOT_FOUND for every one, in every RPC.
  ASSERT_TRUE(acme.Upload("acme-only", a_files).ok());
  ASSERT_TRUE(acme.CreateModel("acme-model", "acme-only").ok());
  EXPECT_EQ(beta.GetModel("acme-model").error_code(), grpc::StatusCode::NOT_FOUND);
  v1::ClassifyResponse r;
  EXPECT_EQ(beta.Classify("acme-model", {a_files[0]}, &r).error_code(),
            grpc::StatusCode::NOT_FOUND);
  for (const auto& m : beta.ListModels()) EXPECT_NE(m.name(), "acme-model");
  {
    auto ctx = beta.Context();
    v1::GetDatasetRequest req;
    req.set_name("acme-only");
    v1::Dataset d;
    EXPECT_EQ(beta.datasets()->GetDataset(ctx.get(), req, &d).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  {
    auto ctx = beta.Context();
    v1::ListDatasetsResponse list;
    ASSERT_TRUE(beta.datasets()->ListDatasets(ctx.get(), {}, &list).ok());
    ASSERT_EQ(list.datasets_size(), 1);
    EXPECT_EQ(list.datasets(0).name(), "d");
    EXPECT_EQ(list.datasets(0).tenant(), "beta");
    EXPECT_EQ(list.datasets(0).images(), 24);
  }
  {
    auto ctx = beta.Context();
    v1::DeleteDatasetRequest req;
    req.set_name("acme-only");
    v1::DeleteDatasetResponse resp;
    EXPECT_EQ(beta.datasets()->DeleteDataset(ctx.get(), req, &resp).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  {
    auto ctx = beta.Context();
    v1::DeleteModelRequest req;
    req.set_name("acme-model");
    v1::DeleteModelResponse resp;
    EXPECT_EQ(beta.models()->DeleteModel(ctx.get(), req, &resp).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  {
    auto ctx = beta.Context();
    v1::ExportModelRequest req;
    req.set_model("acme-model");
    auto stream = beta.models()->ExportModel(ctx.get(), req);
    v1::ExportModelResponse chunk;
    while (stream->Read(&chunk)) {
    }
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
  }
  // acme's job: not beta's to get, watch, cancel or list.
  {
    auto ctx = beta.Context();
    v1::GetJobRequest req;
    req.set_id(a_job.id());
    v1::Job j;
    EXPECT_EQ(beta.models()->GetJob(ctx.get(), req, &j).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {
    auto ctx = beta.Context();
    v1::WatchJobRequest req;
    req.set_id(a_job.id());
    auto reader = beta.models()->WatchJob(ctx.get(), req);
    v1::Job j;
    EXPECT_FALSE(reader->Read(&j));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {
    auto ctx = beta.Context();
    v1::CancelJobRequest req;
    req.set_id(a_job.id());
    v1::Job j;
    EXPECT_EQ(beta.models()->CancelJob(ctx.get(), req, &j).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  {
    auto ctx = beta.Context();
    v1::ListJobsResponse jobs;
    ASSERT_TRUE(beta.models()->ListJobs(ctx.get(), {}, &jobs).ok());
    ASSERT_EQ(jobs.jobs_size(), 1);
    EXPECT_EQ(jobs.jobs(0).id(), b_job.id());
    EXPECT_EQ(jobs.jobs(0).model(), "shirts");
  }
  // A stream to acme's model from beta: NOT_FOUND.
  {
    auto ctx = beta.Context();
    auto stream = beta.models()->StreamClassify(ctx.get());
    v1::StreamClassifyRequest req;
    req.set_model("acme-model");
    req.add_images()->set_encoded(ReadBytes(a_files[0]));
    stream->Write(req);
    stream->WritesDone();
    v1::StreamClassifyResponse resp;
    while (stream->Read(&resp)) {
    }
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
  }
  // Names with a tenant prefix are not a way in for a non-admin.
  EXPECT_EQ(beta.GetModel("acme/acme-model").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(beta.GetModel("acme:acme-model").error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  // The admin sees every tenant's, with the tenant shown, and can name them.
  std::map<std::string, std::string> seen;
  for (const auto& m : admin.ListModels()) seen[m.name()] = m.tenant();
  EXPECT_EQ(seen["acme/shirts"], "acme");
  EXPECT_EQ(seen["beta/shirts"], "beta");
  EXPECT_EQ(seen["acme/acme-model"], "acme");
  v1::Model m;
  ASSERT_TRUE(admin.GetModel("acme/shirts", &m).ok());
  EXPECT_EQ(m.tenant(), "acme");
  EXPECT_EQ(admin.GetModel("shirts").error_code(), grpc::StatusCode::NOT_FOUND);  // ops has none
  // TENANT/NAME with a key for NAME is not a way into a third tenant.
  EXPECT_EQ(admin.CreateModel("default/acme:evil", "acme/d").error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(acme.GetModel("evil").error_code(), grpc::StatusCode::NOT_FOUND);

  // Metrics: no model names unless --metrics_model_labels; tenant usage.
  const std::string metrics = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_FALSE(absl::StrContains(metrics, "acme-model")) << metrics;
  EXPECT_FALSE(absl::StrContains(metrics, "shirts"));
  EXPECT_TRUE(absl::StrContains(metrics, R"(tlserve_tenant_usage{tenant="acme",quota="models"} 2)"))
      << metrics;
  EXPECT_TRUE(absl::StrContains(metrics, R"(tlserve_security_info{auth="true")")) << metrics;
}

TEST_F(SecurityTest, QuotasRefuseAndStoreNothingPartial) {
  Write(dir_ + "/quotas", "acme images 10\nacme models 1\nbeta storage_mb 0\n");
  ServerOptions o = Options();
  o.security.quotas_file = dir_ + "/quotas";
  Start(o);
  auto images = Images();
  Conn acme = Plain("acme-write-key");
  std::vector<std::string> files(images["sandal"].begin(), images["sandal"].begin() + 8);
  files.insert(files.end(), images["t-shirt"].begin(), images["t-shirt"].begin() + 8);
  // 16 images over a quota of 10, in messages of 4: refused mid-upload.
  grpc::Status s = acme.Upload("big", files, 4);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_TRUE(absl::StrContains(s.error_message(), "quota images of tenant acme is full"))
      << s.error_message();
  {
    auto ctx = acme.Context();
    v1::GetDatasetRequest req;
    req.set_name("big");
    v1::Dataset d;
    EXPECT_EQ(acme.datasets()->GetDataset(ctx.get(), req, &d).error_code(),
              grpc::StatusCode::NOT_FOUND);  // nothing of it stored
  }
  // Within the quota: fine; then one model, not two.
  ASSERT_TRUE(acme.Upload("small", {files[0], files[8]}).ok());
  ASSERT_TRUE(acme.CreateModel("m1", "small").ok());
  s = acme.CreateModel("m2", "small");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_TRUE(absl::StrContains(s.error_message(), "quota models of tenant acme is full: 1 in use"))
      << s.error_message();
  // Another tenant is not limited by acme's quotas.
  Conn beta = Plain("beta-write-key");
  EXPECT_TRUE(beta.Upload("big", files, 4).ok());

  // The quotas file changes: the new limit holds without a restart.
  Write(dir_ + "/quotas", "acme images 10\nacme models 2\n");
  const auto deadline = Clock::now() + std::chrono::seconds(15);
  while (!acme.CreateModel("m2", "small").ok() && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  EXPECT_TRUE(acme.GetModel("m2").ok());
}

TEST_F(SecurityTest, KeyFileChangesTakeEffectWithoutRestart) {
  Start(Options());
  Conn old_key = Plain("acme-write-key"), new_key = Plain("acme-new-key");
  EXPECT_TRUE(old_key.ListModels().empty());
  EXPECT_EQ(new_key.GetModel("x").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  Write(keys_file_, KeyLine("acme", "write", "acme-new-key", "acme-rotated"));
  const auto deadline = Clock::now() + std::chrono::seconds(15);
  while (new_key.GetModel("x").error_code() != grpc::StatusCode::NOT_FOUND &&
         Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  EXPECT_EQ(new_key.GetModel("x").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(old_key.GetModel("x").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  // A broken file keeps the keys read before.
  Write(keys_file_, "acme writer nothex\n");
  server_->Reload();
  EXPECT_EQ(new_key.GetModel("x").error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(SecurityTest, TlsMutualTlsAndThePlaintextHealthPort) {
  Pki pki(dir_);
  ServerOptions o = Options();
  o.tls_cert = pki.cert;
  o.tls_key = pki.key;
  o.health_address = absl::StrCat("127.0.0.1:", FreePort());
  Start(o);
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = Slurp(pki.ca);
  Conn tls{grpc::CreateChannel(target_, grpc::SslCredentials(ssl)), "acme-read-key"};
  EXPECT_TRUE(tls.GetModel("x").error_code() == grpc::StatusCode::NOT_FOUND);
  // A plaintext client gets no answer from a TLS port.
  Conn plain = Plain("acme-read-key");
  EXPECT_EQ(plain.GetModel("x", nullptr).error_code(), grpc::StatusCode::UNAVAILABLE);
  // The health port answers in plaintext, and serves nothing else.
  auto health_channel = grpc::CreateChannel(o.health_address, grpc::InsecureChannelCredentials());
  auto health = grpc::health::v1::Health::NewStub(health_channel);
  grpc::ClientContext hctx;
  hctx.set_deadline(Clock::now() + std::chrono::seconds(10));
  grpc::health::v1::HealthCheckResponse h;
  EXPECT_TRUE(health->Check(&hctx, {}, &h).ok());
  EXPECT_EQ(h.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  Conn on_health{health_channel, "acme-read-key"};
  EXPECT_EQ(on_health.GetModel("x").error_code(), grpc::StatusCode::UNIMPLEMENTED);
  server_.reset();

  // Mutual TLS: no client certificate, no connection; with one, its CN
  // (acme-client, `cn:` in the keys file) is the tenant's identity.
  o.tls_client_ca = pki.ca;
  o.health_address.clear();
  o.metrics_address = absl::StrCat("127.0.0.1:", FreePort());
  Start(o);
  Conn no_cert{grpc::CreateChannel(target_, grpc::SslCredentials(ssl)), "acme-read-key"};
  EXPECT_EQ(no_cert.GetModel("x").error_code(), grpc::StatusCode::UNAVAILABLE);
  grpc::SslCredentialsOptions mtls = ssl;
  mtls.pem_cert_chain = Slurp(pki.client_cert);
  mtls.pem_private_key = Slurp(pki.client_key);
  Conn cert{grpc::CreateChannel(target_, grpc::SslCredentials(mtls)), ""};
  EXPECT_TRUE(cert.CreateModel("by-cert", "none").error_code() == grpc::StatusCode::NOT_FOUND);
  Conn acme{grpc::CreateChannel(target_, grpc::SslCredentials(mtls)), "acme-write-key"};
  EXPECT_TRUE(acme.GetModel("x").error_code() == grpc::StatusCode::NOT_FOUND);
}

// cert-manager renews a certificate in place: new connections get the new
// one without a restart.
TEST_F(SecurityTest, ARenewedCertificateServesWithoutARestart) {
  Pki first(dir_);
  const std::string cert = dir_ + "/live.crt", key = dir_ + "/live.key";
  Write(cert, Slurp(first.cert));
  Write(key, Slurp(first.key));
  ServerOptions o = Options();
  o.tls_cert = cert;
  o.tls_key = key;
  o.tls_refresh_seconds = 1;
  Start(o);
  auto channel = [&](const std::string& ca) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = Slurp(ca);
    grpc::ChannelArguments args;
    args.SetInt("grpc.use_local_subchannel_pool", 1);  // a new connection each time
    return grpc::CreateCustomChannel(target_, grpc::SslCredentials(ssl), args);
  };
  Conn old_ca(channel(first.ca), "acme-read-key");
  ASSERT_EQ(old_ca.GetModel("x").error_code(), grpc::StatusCode::NOT_FOUND);
  // A new CA and certificate, written over the files the server watches.
  std::filesystem::create_directories(dir_ + "/renewed");
  Pki renewed(dir_ + "/renewed");
  Write(key, Slurp(renewed.key));
  Write(cert, Slurp(renewed.cert));
  const auto deadline = Clock::now() + std::chrono::seconds(20);
  grpc::StatusCode code = grpc::StatusCode::UNKNOWN;
  while (Clock::now() < deadline) {
    Conn fresh(channel(renewed.ca), "acme-read-key");
    code = fresh.GetModel("x", nullptr).error_code();
    if (code == grpc::StatusCode::NOT_FOUND) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  }
  EXPECT_EQ(code, grpc::StatusCode::NOT_FOUND) << "the renewed certificate was never served";
  // ... and the old CA no longer verifies new connections.
  Conn stale(channel(first.ca), "acme-read-key");
  EXPECT_EQ(stale.GetModel("x").error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST_F(SecurityTest, BadTlsFilesStopTheStartWithTheirName) {
  Pki pki(dir_);
  ServerOptions o = Options();
  o.tls_cert = pki.cert;
  o.tls_key = pki.client_key;  // not the certificate's key
  auto s = Server::Start(o);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(absl::StrContains(s.status().message(), "does not belong")) << s.status();
  o.tls_key = dir_ + "/missing.key";
  s = Server::Start(o);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(absl::StrContains(s.status().message(), "missing.key")) << s.status();
}

// A data directory made before tenants (no --api_keys) keeps its objects,
// as the `default` tenant's, once keys are on.
TEST_F(SecurityTest, ObjectsMadeWithoutKeysBelongToTheDefaultTenant) {
  ServerOptions o = Options();
  o.security.api_keys_file.clear();
  Start(o);
  auto images = Images();
  Conn anyone = Plain("");
  ASSERT_TRUE(anyone.Upload("old", {images["sandal"][0], images["t-shirt"][0]}).ok());
  ASSERT_TRUE(anyone.CreateModel("old-model", "old").ok());
  server_.reset();
  Write(keys_file_, KeyLine("default", "read", "default-key", "legacy") +
                        KeyLine("acme", "write", "acme-write-key", "acme-ci") +
                        KeyLine("ops", "admin", "ops-admin-key", "ops"));
  o.security.api_keys_file = keys_file_;
  o.metrics_address = absl::StrCat("127.0.0.1:", FreePort());
  Start(o);
  Conn legacy = Plain("default-key"), acme = Plain("acme-write-key"),
       admin = Plain("ops-admin-key");
  v1::Model m;
  ASSERT_TRUE(legacy.GetModel("old-model", &m).ok());
  EXPECT_EQ(m.tenant(), "default");
  EXPECT_EQ(acme.GetModel("old-model").error_code(), grpc::StatusCode::NOT_FOUND);
  ASSERT_TRUE(admin.GetModel("default/old-model", &m).ok());
  EXPECT_EQ(m.name(), "default/old-model");
  // The same name in another tenant is another model.
  ASSERT_TRUE(acme.Upload("old", {images["trouser"][0], images["t-shirt"][0]}).ok());
  ASSERT_TRUE(acme.CreateModel("old-model", "old").ok());
  ASSERT_TRUE(legacy.GetModel("old-model", &m).ok());
  EXPECT_EQ(m.classes(0), "sandal");
}

// --metrics_token_file and --metrics_tls reach the exposer (its own test,
// metrics_exposer_test, covers TLS and tokens in depth).
TEST_F(SecurityTest, MetricsNeedTheTokenAndTlsWhenAsked) {
  Write(dir_ + "/metrics-token", "scrape-secret\n");
  ServerOptions o = Options();
  o.metrics_token_file = dir_ + "/metrics-token";
  Start(o);
  EXPECT_FALSE(
      absl::StrContains(HttpGet(server_->metrics_port(), "/metrics"), "tlserve_requests_total"));
  EXPECT_TRUE(absl::StrContains(
      HttpGet(server_->metrics_port(), "/metrics", "Authorization: Bearer scrape-secret\r\n"),
      "tlserve_security_info"));
  server_.reset();
  Pki pki(dir_);
  o.tls_cert = pki.cert;
  o.tls_key = pki.key;
  o.metrics_tls = true;
  o.metrics_address = absl::StrCat("127.0.0.1:", FreePort());
  Start(o);
  // Plain HTTP to the HTTPS endpoint: no metrics, with or without the token.
  EXPECT_FALSE(absl::StrContains(
      HttpGet(server_->metrics_port(), "/metrics", "Authorization: Bearer scrape-secret\r\n"),
      "tlserve_"));
}

// A tenant holds at most half the server's upload slots: idle streams of
// one tenant do not lock the others out.
TEST_F(SecurityTest, ATenantHoldsAtMostHalfTheUploadSlots) {
  ServerOptions o = Options();
  o.max_concurrent_uploads = 2;
  Start(o);
  auto images = Images();
  Conn acme = Plain("acme-write-key"), beta = Plain("beta-write-key");
  auto idle_ctx = acme.Context();
  v1::UploadDatasetResponse idle_resp;
  auto idle = acme.datasets()->UploadDataset(idle_ctx.get(), &idle_resp);  // sends nothing
  // The server sends initial metadata once the stream holds its slots.
  idle->WaitForInitialMetadata();
  const grpc::Status s = acme.Upload("second", {images["sandal"][0]});
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_TRUE(absl::StrContains(s.error_message(), "tenant acme has 1 uploads"))
      << s.error_message();
  // Another tenant gets the free slot (once the refused upload's call is
  // over on the server too: it held a server-wide slot for a moment).
  grpc::Status b;
  for (int i = 0; i < 300; ++i) {
    b = beta.Upload("d", {images["sandal"][0]});
    if (b.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(b.ok()) << b.error_message();
  idle_ctx->TryCancel();
  idle->Finish();
}

// Queued jobs are taken by tenant in turns: a tenant with many jobs queued
// does not make another tenant's job wait for all of them.
TEST_F(SecurityTest, QueuedJobsTakeTurnsByTenant) {
  absl::Mutex mu;
  bool open = false;
  std::vector<std::string> first_steps;  // model keys, in the order their jobs began
  ServerOptions o = Options();
  o.before_training_step = [&](const std::string& model) {
    absl::MutexLock lock(&mu);
    if (std::find(first_steps.begin(), first_steps.end(), model) == first_steps.end()) {
      first_steps.push_back(model);
    }
    mu.AwaitWithTimeout(absl::Condition(&open), absl::Seconds(120));
  };
  Start(o);
  auto images = Images();
  std::vector<std::string> files;
  for (int i = 0; i < 4; ++i) {
    files.push_back(images["sandal"][i]);
    files.push_back(images["t-shirt"][i]);
  }
  Conn acme = Plain("acme-write-key"), beta = Plain("beta-write-key");
  for (Conn* c : {&acme, &beta}) ASSERT_TRUE(c->Upload("d", files).ok());
  for (const char* m : {"a1", "a2"}) {
    ASSERT_TRUE(acme.CreateModel(m, "d").ok());
    ASSERT_TRUE(acme.Unfreeze(m, "layer4").ok());  // fine-tuning: the hook runs
  }
  ASSERT_TRUE(beta.CreateModel("b1", "d").ok());
  ASSERT_TRUE(beta.Unfreeze("b1", "layer4").ok());
  v1::Job a1, a2, b1;
  ASSERT_TRUE(acme.StartTraining("a1", "d", &a1).ok());
  // a1 is running (held in its first step) before the others are queued.
  for (int i = 0; i < 600; ++i) {
    {
      absl::MutexLock lock(&mu);
      if (!first_steps.empty()) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(acme.StartTraining("a2", "d", &a2).ok());
  ASSERT_TRUE(beta.StartTraining("b1", "d", &b1).ok());
  {
    absl::MutexLock lock(&mu);
    open = true;
  }
  for (auto [conn, id] :
       {std::pair<Conn*, std::string>{&acme, a1.id()}, {&acme, a2.id()}, {&beta, b1.id()}}) {
    v1::Job j;
    for (int i = 0; i < 1200; ++i) {
      j = conn->GetJob(id);
      if (j.state() >= v1::Job::SUCCEEDED) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    EXPECT_EQ(j.state(), v1::Job::SUCCEEDED) << j.error();
  }
  absl::MutexLock lock(&mu);
  EXPECT_EQ(first_steps, (std::vector<std::string>{"acme:a1", "beta:b1", "acme:a2"}));
}

// A flood of denied calls with huge names: each audit line is bounded, and
// at most Security::kDeniedLinesPerSecond of them are written per second.
TEST_F(SecurityTest, DeniedFloodsDoNotFloodTheAuditTrail) {
  Start(Options());
  const std::string huge(100 << 10, 'x');
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      Conn anonymous = Plain("");
      for (int i = 0; i < 150; ++i) anonymous.GetModel(huge);
    });
  }
  for (auto& t : threads) t.join();
  // The count of the rest comes with the next audit line after the second.
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  Plain("acme-write-key").CreateModel("m", "no-such-dataset");
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  server_.reset();
  int denied = 0;
  size_t longest = 0;
  bool counted = false;
  for (absl::string_view line :
       absl::StrSplit(Slurp(dir_ + "/audit.jsonl"), '\n', absl::SkipEmpty())) {
    longest = std::max(longest, line.size());
    denied += absl::StrContains(line, "UNAUTHENTICATED") ? 1 : 0;
    counted |= absl::StrContains(line, "suppressed_denied_calls");
  }
  EXPECT_LT(longest, 1024u);
  EXPECT_LE(denied, Security::kDeniedLinesPerSecond * (static_cast<int>(seconds) + 2));
  if (denied < 600) {
    EXPECT_TRUE(counted) << "suppressed lines were not counted";
  }
}

// A tenant flooding Embed from many threads cannot stop another tenant's
// Classify (training included): it is served (bounded by a generous deadline, not timed), while
// the flood runs into its in-flight quota.
TEST_F(SecurityTest, AFloodingTenantDoesNotStarveAnother) {
  Write(dir_ + "/quotas", "beta inflight_images 16\n");
  ServerOptions o = Options();
  o.security.quotas_file = dir_ + "/quotas";
  Start(o);
  auto images = Images();
  std::vector<std::string> batch(images["sandal"].begin(), images["sandal"].begin() + 8);
  std::atomic<bool> stop{false};
  std::atomic<int> refused{0}, served{0};
  std::vector<std::thread> flood;
  for (int t = 0; t < 8; ++t) {
    flood.emplace_back([&] {
      Conn beta = Plain("beta-write-key");
      while (!stop) {
        const grpc::Status s = beta.Embed(batch, 60);
        if (s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
          ++refused;
        } else if (s.ok()) {
          ++served;
        }
      }
    });
  }
  Conn acme = Plain("acme-write-key");
  std::vector<std::string> files;
  for (int i = 0; i < 6; ++i) {
    files.push_back(images["sandal"][i]);
    files.push_back(images["t-shirt"][i]);
  }
  ASSERT_TRUE(acme.Upload("d", files).ok());
  ASSERT_TRUE(acme.CreateModel("m", "d").ok());
  v1::Job job;
  ASSERT_TRUE(acme.Train("m", "d", &job).ok());
  ASSERT_EQ(job.state(), v1::Job::SUCCEEDED) << job.error();
  int ok = 0;
  for (int i = 0; i < 5; ++i) {
    v1::ClassifyResponse r;
    ok += acme.Classify("m", {images["t-shirt"][10 + i]}, &r, 60).ok() ? 1 : 0;
  }
  stop = true;
  for (auto& t : flood) t.join();
  EXPECT_EQ(ok, 5);
  EXPECT_GT(refused.load(), 0) << "the flood never reached its in-flight quota";
  EXPECT_GT(served.load(), 0);
}

}  // namespace
}  // namespace tlserve::testing
