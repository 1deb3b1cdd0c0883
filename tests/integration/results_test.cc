// Results users can trust, on a live server: Evaluate equals what a client
// computes from Classify's own answers; versions compared with McNemar;
// a worse version is not served and any version can be served by hand,
// durably; temperature scaling; thresholds that answer "unknown"; and
// label suggestions that are the pool's least certain images, duplicates
// removed.
#include <grpcpp/client_context.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "client/lib/client.h"
#include "client/lib/image_files.h"
#include "server/api/server.h"
#include "tests/integration/loopback_options.h"
#include "tests/integration/test_env.h"
#include "tests/integration/training_fixture.h"
#include "tests/test_util.h"
#include "tlserve/v1/models.grpc.pb.h"

namespace tlserve {
namespace {

using ::tlserve::testing::Fixture;
using ::tlserve::testing::Folder;
using ::tlserve::testing::ReadBytes;

class EvaluationTest : public testing::TrainingTest {
 protected:
  ServerOptions Options(const std::string& data_dir) override {
    ServerOptions o = TrainingTest::Options(data_dir);
    if (max_head_params_ > 0) o.models.max_head_params = max_head_params_;
    return o;
  }
  int64_t max_head_params_ = 0;  // 0: the default
  // Uploads ImageFolder files as `dataset`; `labelled` false: as a pool.
  void Upload(const std::string& dataset,
              const std::vector<std::pair<std::string, std::string>>& files, bool labelled = true) {
    auto r = client_->UploadDataset(dataset, true, files.size(), 16,
                                    [&](size_t i) -> absl::StatusOr<v1::Example> {
                                      v1::Example e;
                                      e.set_name(files[i].first);
                                      e.set_label(labelled ? files[i].second : "");
                                      e.set_encoded(ReadBytes(files[i].first));
                                      return e;
                                    });
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->accepted(), static_cast<int64_t>(files.size()));
  }
  // Trains `model` on "fmnist" and waits; returns the finished job.
  v1::Job Train(const std::string& model, const v1::TrainingOptions& options = {}) {
    auto job = Start(model, "fmnist", options);
    EXPECT_TRUE(job.ok()) << job.status();
    if (!job.ok()) return {};
    auto seen = Watch(job->id());
    EXPECT_FALSE(seen.empty());
    return seen.empty() ? v1::Job() : seen.back();
  }
  v1::Model Get(const std::string& model) {
    grpc::ClientContext ctx;
    v1::GetModelRequest req;
    req.set_name(model);
    v1::Model m;
    EXPECT_TRUE(stub_->GetModel(&ctx, req, &m).ok());
    return m;
  }
  // Full class probabilities of every file from Classify (top_k = classes),
  // 32 images a call.
  std::vector<std::vector<double>> Probabilities(const std::string& model, int version,
                                                 const std::vector<std::string>& files,
                                                 const std::vector<std::string>& classes) {
    std::vector<std::vector<double>> out;
    for (size_t first = 0; first < files.size(); first += 32) {
      grpc::ClientContext ctx;
      v1::ClassifyRequest req;
      req.set_model(model);
      req.set_version(version);
      req.set_top_k(static_cast<int>(classes.size()));
      for (size_t i = first; i < std::min(files.size(), first + 32); ++i) {
        req.add_images()->set_encoded(ReadBytes(files[i]));
      }
      v1::ClassifyResponse resp;
      const grpc::Status s = stub_->Classify(&ctx, req, &resp);
      EXPECT_TRUE(s.ok()) << s.error_message();
      AddRows(resp, classes, out);
    }
    EXPECT_EQ(out.size(), files.size());
    out.resize(files.size(), std::vector<double>(classes.size(), 0.0));
    return out;
  }
  // The first `n` images of the fixture's test folder.
  static std::vector<std::string> TestFiles(size_t n) {
    std::vector<std::string> files;
    for (const auto& [f, label] : Folder(Fixture("fmnist/test"))) {
      if (files.size() < n) files.push_back(f);
    }
    return files;
  }
  static void ExpectSameProbabilities(const std::vector<std::vector<double>>& a,
                                      const std::vector<std::vector<double>>& b) {
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      ASSERT_EQ(a[i].size(), b[i].size());
      for (size_t c = 0; c < a[i].size(); ++c)
        EXPECT_NEAR(a[i][c], b[i][c], 1e-6) << i << ", " << c;
    }
  }
  static void AddRows(const v1::ClassifyResponse& resp, const std::vector<std::string>& classes,
                      std::vector<std::vector<double>>& out) {
    for (const auto& r : resp.results()) {
      std::vector<double> p(classes.size(), 0);
      for (const auto& t : r.top()) {
        p[std::find(classes.begin(), classes.end(), t.label()) - classes.begin()] = t.probability();
      }
      out.push_back(p);
    }
  }
};

TEST_F(EvaluationTest, EvaluateEqualsAReferenceComputedFromClassify) {
  UploadTrainingSet();
  ASSERT_TRUE(CreateModel("m", "fmnist").ok());
  ASSERT_EQ(Train("m").state(), v1::Job::SUCCEEDED);
  const auto test = Folder(Fixture("fmnist/test"));
  Upload("test", test);

  v1::EvaluateRequest req;
  req.set_model("m");
  req.set_dataset("test");
  int64_t progress_messages = 0;
  auto r = client_->Evaluate(req, [&](int64_t done, int64_t total) {
    EXPECT_LE(done, total);
    ++progress_messages;
  });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GE(progress_messages, 1);
  ASSERT_EQ(r->evaluations_size(), 1);
  const v1::VersionEvaluation& e = r->evaluations(0);
  const std::vector<std::string> classes(r->classes().begin(), r->classes().end());
  ASSERT_EQ(classes.size(), 3u);

  // The reference: Classify's own probabilities, scored here.
  std::vector<std::string> files;
  for (const auto& [f, label] : test) files.push_back(f);
  const auto p = Probabilities("m", 0, files, classes);
  const int n = static_cast<int>(test.size()), k = 3;
  std::vector<int64_t> confusion(k * k, 0);
  double log_loss = 0;
  int right = 0;
  std::vector<double> bin_conf(15, 0), bin_acc(15, 0), bin_n(15, 0);
  for (int i = 0; i < n; ++i) {
    const int y = static_cast<int>(std::find(classes.begin(), classes.end(), test[i].second) -
                                   classes.begin());
    const int pred = static_cast<int>(std::max_element(p[i].begin(), p[i].end()) - p[i].begin());
    ++confusion[y * k + pred];
    right += pred == y;
    log_loss -= std::log(std::max(p[i][y], 1e-15));
    const double conf = p[i][pred];
    const int bin = std::clamp(static_cast<int>(std::ceil(conf * 15)) - 1, 0, 14);
    bin_conf[bin] += conf;
    bin_acc[bin] += pred == y;
    bin_n[bin] += 1;
  }
  double ece = 0;
  for (int b = 0; b < 15; ++b) ece += std::abs(bin_acc[b] - bin_conf[b]) / n;
  EXPECT_EQ(e.images(), n);
  EXPECT_NEAR(e.accuracy(), static_cast<double>(right) / n, 1e-9);
  EXPECT_NEAR(e.top5_accuracy(), 1.0, 1e-9);  // 3 classes: top-3 holds every label
  EXPECT_NEAR(e.log_loss(), log_loss / n, 1e-5);
  EXPECT_NEAR(e.ece(), ece, 1e-5);
  ASSERT_EQ(e.confusion_size(), k * k);
  for (int i = 0; i < k * k; ++i) EXPECT_EQ(e.confusion(i), confusion[i]) << i;
  for (int c = 0; c < k; ++c) {
    int64_t predicted = 0, support = 0;
    for (int r2 = 0; r2 < k; ++r2) predicted += confusion[r2 * k + c];
    for (int c2 = 0; c2 < k; ++c2) support += confusion[c * k + c2];
    const double precision =
        predicted ? static_cast<double>(confusion[c * k + c]) / predicted : 0.0;
    const double recall = support ? static_cast<double>(confusion[c * k + c]) / support : 0.0;
    EXPECT_EQ(e.classes(c).label(), classes[c]);
    EXPECT_EQ(e.classes(c).support(), support);
    EXPECT_NEAR(e.classes(c).precision(), precision, 1e-9);
    EXPECT_NEAR(e.classes(c).recall(), recall, 1e-9);
    EXPECT_NEAR(e.classes(c).f1(),
                precision + recall > 0 ? 2 * precision * recall / (precision + recall) : 0, 1e-9);
  }

  // Thresholds for a target precision, chosen on the same images: per
  // class, the lowest observed top probability at which the images given
  // that class are right at least 80% of the time (1: never; 0: never
  // predicted), then what they keep.
  const double target = 0.8;
  req.set_target_precision(static_cast<float>(target));
  auto chosen = client_->Evaluate(req);
  ASSERT_TRUE(chosen.ok()) << chosen.status();
  const v1::VersionEvaluation& t = chosen->evaluations(0);
  ASSERT_EQ(t.thresholds_size(), k);
  std::vector<float> reference(k, 0);
  for (int c = 0; c < k; ++c) {
    std::vector<std::pair<float, bool>> given;  // (top probability, right) of images given c
    for (int i = 0; i < n; ++i) {
      const int pred = static_cast<int>(std::max_element(p[i].begin(), p[i].end()) - p[i].begin());
      if (pred == c) given.emplace_back(static_cast<float>(p[i][c]), test[i].second == classes[c]);
    }
    if (given.empty()) continue;
    reference[c] = 1;
    for (const auto& [candidate, unused] : given) {
      int kept = 0, right_kept = 0;
      for (const auto& [q, ok] : given) {
        if (q >= candidate) ++kept, right_kept += ok;
      }
      if (static_cast<double>(right_kept) / kept >= target) {
        // 1 means "never": certainty that qualifies keeps its label just below.
        reference[c] =
            std::min(reference[c], candidate < 1 ? candidate : std::nextafter(1.0f, 0.0f));
      }
    }
    EXPECT_FLOAT_EQ(t.thresholds().at(classes[c]), reference[c]) << classes[c];
  }
  int labelled = 0, labelled_right = 0;
  for (int i = 0; i < n; ++i) {
    const int pred = static_cast<int>(std::max_element(p[i].begin(), p[i].end()) - p[i].begin());
    if (reference[pred] < 1 && static_cast<float>(p[i][pred]) >= reference[pred]) {
      ++labelled;
      labelled_right += test[i].second == classes[pred];
    }
  }
  EXPECT_NEAR(t.coverage(), static_cast<double>(labelled) / n, 1e-9);
  EXPECT_NEAR(t.precision_at_thresholds(),
              labelled ? static_cast<double>(labelled_right) / labelled : 0.0, 1e-9);
  EXPECT_EQ(e.thresholds_size(), 0) << "none without a target";
}

TEST_F(EvaluationTest, AWorseVersionIsNotServedUntilChosenAndTheChoiceSurvivesARestart) {
  UploadTrainingSet();
  ASSERT_TRUE(CreateModel("m", "fmnist").ok());
  const v1::Job first = Train("m");
  ASSERT_EQ(first.state(), v1::Job::SUCCEEDED);
  EXPECT_NE(first.outcome().find("v1 is served"), std::string::npos) << first.outcome();
  // A head that barely moved from its random start: worse on validation.
  v1::TrainingOptions weak;
  weak.set_optimizer(v1::TrainingOptions::ADAMW);
  weak.set_epochs(1);
  weak.set_learning_rate(1e-7f);
  weak.set_seed(3);
  const v1::Job second = Train("m", weak);
  ASSERT_EQ(second.state(), v1::Job::SUCCEEDED);
  EXPECT_EQ(second.version(), 2);
  EXPECT_NE(second.outcome().find("v2 is not served"), std::string::npos) << second.outcome();
  EXPECT_EQ(Get("m").served_version(), 1);

  // The two on the same images: McNemar says v1 is better.
  v1::EvaluateRequest req;
  req.set_model("m");
  req.set_dataset("fmnist");
  req.add_versions(1);
  req.add_versions(2);
  auto r = client_->Evaluate(req);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->evaluations_size(), 2);
  ASSERT_EQ(r->comparisons_size(), 1);
  const v1::VersionComparison& cmp = r->comparisons(0);
  EXPECT_GT(cmp.only_a_correct(), cmp.only_b_correct());
  EXPECT_LT(cmp.p_value(), 0.05);
  EXPECT_NE(cmp.verdict().find("v1 is better"), std::string::npos) << cmp.verdict();
  // Its counts are the disagreements of the two versions' own answers.
  const auto files = Folder(Fixture("fmnist/train"));
  std::vector<std::string> paths;
  for (const auto& [f, label] : files) paths.push_back(f);
  const std::vector<std::string> classes(r->classes().begin(), r->classes().end());
  const auto p1 = Probabilities("m", 1, paths, classes), p2 = Probabilities("m", 2, paths, classes);
  int64_t only1 = 0, only2 = 0;
  for (size_t i = 0; i < files.size(); ++i) {
    const int y = static_cast<int>(std::find(classes.begin(), classes.end(), files[i].second) -
                                   classes.begin());
    const bool ok1 = std::max_element(p1[i].begin(), p1[i].end()) - p1[i].begin() == y;
    const bool ok2 = std::max_element(p2[i].begin(), p2[i].end()) - p2[i].begin() == y;
    only1 += ok1 && !ok2;
    only2 += ok2 && !ok1;
  }
  EXPECT_EQ(cmp.only_a_correct(), only1);
  EXPECT_EQ(cmp.only_b_correct(), only2);

  // Serving v2 by hand (a roll-forward), durably.
  grpc::ClientContext ctx;
  v1::SetServedVersionRequest serve;
  serve.set_model("m");
  serve.set_version(2);
  v1::Model m;
  ASSERT_TRUE(stub_->SetServedVersion(&ctx, serve, &m).ok());
  EXPECT_EQ(m.served_version(), 2);
  auto classified = Classify("m", {paths[0]});
  ASSERT_TRUE(classified.ok()) << classified.status();
  EXPECT_EQ(classified->version(), 2);
  Restart();
  EXPECT_EQ(Get("m").served_version(), 2);
  classified = Classify("m", {paths[0]});
  ASSERT_TRUE(classified.ok()) << classified.status();
  EXPECT_EQ(classified->version(), 2);

  for (const auto& [version, code] : std::vector<std::pair<int, grpc::StatusCode>>{
           {7, grpc::StatusCode::NOT_FOUND}, {0, grpc::StatusCode::INVALID_ARGUMENT}}) {
    grpc::ClientContext c2;
    serve.set_version(version);
    EXPECT_EQ(stub_->SetServedVersion(&c2, serve, &m).error_code(), code) << version;
  }
}

TEST_F(EvaluationTest, VersionsAreCalibratedAndThresholdsAnswerUnknown) {
  UploadTrainingSet();
  ASSERT_TRUE(CreateModel("m", "fmnist").ok());
  v1::TrainingOptions o;
  o.set_target_precision(0.9f);
  ASSERT_EQ(Train("m", o).state(), v1::Job::SUCCEEDED);
  v1::Model m = Get("m");
  ASSERT_EQ(m.versions_size(), 1);
  const v1::ModelVersion& v = m.versions(0);
  EXPECT_GT(v.temperature(), 0);
  if (v.validation_accuracy() < 1.0) {
    EXPECT_NE(v.temperature(), 1.0) << "a temperature is fitted on the validation split";
  } else {
    EXPECT_EQ(v.temperature(), 1.0) << "all right on validation: nothing to fit, none fitted";
  }
  // Temperature scaling minimises the validation log loss, not the binned
  // ECE, which may move a little either way on a small split (seen: 0.0418
  // before, 0.0420 after). What must hold: the ECE recorded with the version
  // is what Evaluate measures, through the engine and its temperature, on the
  // same validation images.
  {
    v1::EvaluateRequest req;
    req.set_model("m");
    req.set_dataset("fmnist");
    req.set_split(v1::SPLIT_VALIDATION);
    auto val = client_->Evaluate(req);
    ASSERT_TRUE(val.ok()) << val.status();
    EXPECT_NEAR(val->evaluations(0).ece(), v.validation_ece(), 1e-3);
    EXPECT_NEAR(val->evaluations(0).accuracy(), v.validation_accuracy(), 1e-6);
  }
  EXPECT_EQ(v.thresholds_size(), 3);  // chosen for the target precision

  const auto test = Folder(Fixture("fmnist/test"));
  // A global threshold just above the least confident image's best
  // probability: that image (and any as unsure) is "unknown", the others
  // keep their label. (Some may be certain to float precision: 1.0.)
  std::vector<std::string> files;
  for (const auto& [f, label] : test) {
    if (files.size() < 30) files.push_back(f);
  }
  auto c = Classify("m", files);
  ASSERT_TRUE(c.ok()) << c.status();
  float lowest = 1;
  for (const auto& r : c->results()) lowest = std::min(lowest, r.top(0).probability());
  ASSERT_LT(lowest, 1.0f) << "an image below certainty to test against";
  const float threshold = std::nextafter(lowest, 1.0f);
  grpc::ClientContext ctx;
  v1::SetThresholdsRequest set;
  set.set_model("m");
  set.set_global(threshold);
  ASSERT_TRUE(stub_->SetThresholds(&ctx, set, &m).ok());
  auto check_unknown = [&] {
    auto all = Classify("m", files);
    ASSERT_TRUE(all.ok()) << all.status();
    ASSERT_EQ(all->results_size(), static_cast<int>(files.size()));
    int unknown = 0;
    for (const auto& r : all->results()) {
      const bool below = r.top(0).probability() < threshold || threshold >= 1;
      EXPECT_EQ(r.unknown(), below) << r.top(0).probability() << " vs " << threshold;
      EXPECT_EQ(r.label(), below ? "unknown" : r.top(0).label());
      EXPECT_EQ(r.top_size(), 2);  // the top-k list is still there
      unknown += below;
    }
    EXPECT_GE(unknown, 1);
  };
  check_unknown();
  // Survives a restart (the version read again from its record).
  Restart();
  EXPECT_EQ(Get("m").versions(0).thresholds_size(), 3);
  EXPECT_FLOAT_EQ(Get("m").versions(0).thresholds(0), threshold);
  check_unknown();
  // A threshold of 1 answers "unknown" always, also where the probability is
  // 1 in float32 (fixtures' heads are often that sure).
  {
    grpc::ClientContext one_ctx;
    v1::SetThresholdsRequest one;
    one.set_model("m");
    one.set_global(1.0f);
    ASSERT_TRUE(stub_->SetThresholds(&one_ctx, one, &m).ok());
    auto all = Classify("m", files);
    ASSERT_TRUE(all.ok()) << all.status();
    for (const auto& r : all->results()) {
      EXPECT_TRUE(r.unknown()) << r.top(0).probability();
      EXPECT_EQ(r.label(), "unknown");
    }
  }
  grpc::ClientContext clear_ctx;
  v1::SetThresholdsRequest clear;
  clear.set_model("m");
  ASSERT_TRUE(stub_->SetThresholds(&clear_ctx, clear, &m).ok());
  EXPECT_EQ(m.versions(0).thresholds_size(), 0);
  c = Classify("m", {test[0].first});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->results(0).unknown());
  EXPECT_EQ(c->results(0).label(), c->results(0).top(0).label());

  // Per class: only the named class can be "unknown"; bad requests name the field.
  for (const auto& [label, value, code] :
       std::vector<std::tuple<std::string, float, grpc::StatusCode>>{
           {"sandal", 0.5f, grpc::StatusCode::OK},
           {"no-such-class", 0.5f, grpc::StatusCode::INVALID_ARGUMENT},
           {"sandal", 1.5f, grpc::StatusCode::INVALID_ARGUMENT}}) {
    grpc::ClientContext c2;
    v1::SetThresholdsRequest per;
    per.set_model("m");
    (*per.mutable_per_class())[label] = value;
    EXPECT_EQ(stub_->SetThresholds(&c2, per, &m).error_code(), code) << label << " " << value;
  }
}

TEST_F(EvaluationTest, SuggestionsAreThePoolsLowestMarginImagesWithDuplicatesRemoved) {
  UploadTrainingSet();
  ASSERT_TRUE(CreateModel("m", "fmnist").ok());
  ASSERT_EQ(Train("m").state(), v1::Job::SUCCEEDED);
  // The pool: the test images without labels, the first five twice (under
  // another name: the same image).
  auto pool = Folder(Fixture("fmnist/test"));
  std::vector<std::pair<std::string, std::string>> twice;
  for (size_t i = 0; i < 5; ++i) twice.push_back(pool[i]);
  Upload("pool", pool, /*labelled=*/false);
  // A second upload of the same files under the same names would be the same
  // examples; the copies go into the pool under their own names.
  auto r = client_->UploadDataset("pool", true, twice.size(), 16,
                                  [&](size_t i) -> absl::StatusOr<v1::Example> {
                                    v1::Example e;
                                    e.set_name(absl::StrCat("copy-of-", twice[i].first));
                                    e.set_encoded(ReadBytes(twice[i].first));
                                    return e;
                                  });
  ASSERT_TRUE(r.ok()) << r.status();
  auto ds = client_->GetDataset("pool");
  ASSERT_TRUE(ds.ok());
  EXPECT_EQ(ds->unlabelled(), static_cast<int64_t>(pool.size() + twice.size()));
  EXPECT_EQ(ds->classes_size(), 0);

  // The reference: margins from Classify, embeddings from Embed.
  std::vector<std::string> names, paths;
  for (const auto& [f, label] : pool) names.push_back(f), paths.push_back(f);
  for (const auto& [f, label] : twice) names.push_back("copy-of-" + f), paths.push_back(f);
  const v1::Model model = Get("m");
  const std::vector<std::string> classes(model.classes().begin(), model.classes().end());
  const auto p = Probabilities("m", 0, paths, classes);
  std::vector<double> margin;
  std::vector<std::vector<float>> embedding;
  for (size_t i = 0; i < paths.size(); ++i) {
    std::vector<double> s = p[i];
    std::sort(s.rbegin(), s.rend());
    margin.push_back(s[0] - s[1]);
    embedding.push_back(EmbedValues(paths[i]));
  }
  std::vector<size_t> order(paths.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return margin[a] < margin[b]; });
  auto cosine = [&](size_t a, size_t b) {
    double ab = 0, aa = 0, bb = 0;
    for (size_t d = 0; d < embedding[a].size(); ++d) {
      ab += embedding[a][d] * embedding[b][d];
      aa += embedding[a][d] * embedding[a][d];
      bb += embedding[b][d] * embedding[b][d];
    }
    return ab / std::sqrt(aa * bb);
  };
  // The fixture backbone's random weights make every embedding alike: the
  // threshold goes between the most similar distinct images and the copies.
  double most_alike = 0;
  for (size_t i = 0; i < pool.size(); ++i) {
    for (size_t j = i + 1; j < pool.size(); ++j) most_alike = std::max(most_alike, cosine(i, j));
  }
  for (size_t i = 0; i < twice.size(); ++i) {
    ASSERT_GT(cosine(i, pool.size() + i), most_alike) << "a copy is its image";
  }
  const double threshold = (most_alike + std::min(1.0, cosine(0, pool.size()))) / 2;
  const int count = 8;
  std::vector<size_t> expected;
  for (size_t i : order) {
    bool duplicate = false;
    for (size_t j : expected) duplicate = duplicate || cosine(i, j) > threshold;
    if (!duplicate) expected.push_back(i);
    if (expected.size() == count) break;
  }

  v1::SuggestLabelsRequest req;
  req.set_model("m");
  req.set_dataset("pool");
  req.set_count(count);
  req.set_duplicate_cosine(static_cast<float>(threshold));
  auto s = client_->SuggestLabels(req);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->suggestions_size(), count);
  for (int i = 0; i < count; ++i) {
    const auto& g = s->suggestions(i);
    EXPECT_EQ(g.name(), names[expected[i]]) << i;
    // Margins agree with Classify's (float32 on the wire) and rise.
    EXPECT_NEAR(g.margin(), margin[expected[i]], 1e-4) << i;
    if (i > 0) {
      EXPECT_GE(g.margin(), s->suggestions(i - 1).margin() - 1e-6);
    }
    ASSERT_GE(g.top_size(), 2);
    EXPECT_GE(g.top(0).probability(), g.top(1).probability());
  }
  // No image is suggested together with its copy.
  for (int i = 0; i < count; ++i) {
    for (int j = i + 1; j < count; ++j) {
      const std::string a = s->suggestions(i).name(), b = s->suggestions(j).name();
      EXPECT_NE(a, "copy-of-" + b);
      EXPECT_NE(b, "copy-of-" + a);
    }
  }

  // The entropy strategy: the largest entropies of Classify's probabilities
  // first (no duplicate removal at a cosine of 1).
  std::vector<double> entropy;
  for (const auto& row : p) {
    double h = 0;
    for (double q : row) h -= q > 0 ? q * std::log(q) : 0;
    entropy.push_back(h);
  }
  std::vector<size_t> by_entropy = order;
  std::stable_sort(by_entropy.begin(), by_entropy.end(),
                   [&](size_t a, size_t b) { return entropy[a] > entropy[b]; });
  req.set_strategy(v1::UNCERTAINTY_ENTROPY);
  req.set_duplicate_cosine(1);
  req.set_count(5);
  auto e = client_->SuggestLabels(req);
  ASSERT_TRUE(e.ok()) << e.status();
  ASSERT_EQ(e->suggestions_size(), 5);
  for (int i = 0; i < 5; ++i) {
    EXPECT_NEAR(e->suggestions(i).entropy(), entropy[by_entropy[i]], 1e-4) << i;
    if (i > 0) {
      EXPECT_LE(e->suggestions(i).entropy(), e->suggestions(i - 1).entropy() + 1e-6);
    }
  }
  // The image with the largest entropy leads (ties aside: a copy has its
  // image's entropy, so either may come first).
  EXPECT_TRUE(e->suggestions(0).name() == names[by_entropy[0]] ||
              e->suggestions(0).name() == names[by_entropy[1]])
      << e->suggestions(0).name();
  req.set_strategy(v1::UNCERTAINTY_MARGIN);

  // Bad requests.
  req.set_count(0);
  EXPECT_EQ(client_->SuggestLabels(req).status().code(), absl::StatusCode::kInvalidArgument);
  req.set_count(3);
  req.set_dataset("fmnist");  // every image labelled: no pool
  EXPECT_EQ(client_->SuggestLabels(req).status().code(), absl::StatusCode::kFailedPrecondition);
  req.set_dataset("nope");
  EXPECT_EQ(client_->SuggestLabels(req).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(EvaluationTest, EvaluateRefusesWhatItCannotScore) {
  UploadTrainingSet();
  ASSERT_TRUE(CreateModel("m", "fmnist").ok());
  ASSERT_EQ(Train("m").state(), v1::Job::SUCCEEDED);
  ASSERT_TRUE(CreateModel("other", "", {"cat", "dog"}).ok());
  v1::EvaluateRequest req;
  req.set_model("m");
  req.set_dataset("nope");
  EXPECT_EQ(client_->Evaluate(req).status().code(), absl::StatusCode::kNotFound);
  req.set_dataset("fmnist");
  req.add_versions(9);
  EXPECT_EQ(client_->Evaluate(req).status().code(), absl::StatusCode::kNotFound);
  req.clear_versions();
  req.add_versions(-1);
  EXPECT_EQ(client_->Evaluate(req).status().code(), absl::StatusCode::kInvalidArgument);
  req.clear_versions();
  req.add_versions(1);
  req.add_versions(1);
  EXPECT_EQ(client_->Evaluate(req).status().code(), absl::StatusCode::kInvalidArgument);
  req.clear_versions();
  req.set_model("other");  // untrained
  EXPECT_EQ(client_->Evaluate(req).status().code(), absl::StatusCode::kFailedPrecondition);
  req.set_model("m");
  for (float target : {1.0f, -0.1f, 2.0f, std::nanf("")}) {
    req.set_target_precision(target);
    EXPECT_EQ(client_->Evaluate(req).status().code(), absl::StatusCode::kInvalidArgument) << target;
  }
  req.set_target_precision(0);
  req.set_split(v1::SPLIT_VALIDATION);
  auto val = client_->Evaluate(req);
  ASSERT_TRUE(val.ok()) << val.status();
  req.set_split(v1::SPLIT_TRAIN);
  auto train = client_->Evaluate(req);
  ASSERT_TRUE(train.ok()) << train.status();
  EXPECT_EQ(val->evaluations(0).images() + train->evaluations(0).images(), 120);
  // The version's own validation accuracy is what Evaluate finds there.
  EXPECT_NEAR(val->evaluations(0).accuracy(), Get("m").versions(0).validation_accuracy(), 1e-6);
}

TEST_F(EvaluationTest, ASweepPublishesItsCrossValidatedWinnerWithALeaderboard) {
  UploadTrainingSet();
  ASSERT_TRUE(CreateModel("m", "fmnist").ok());
  v1::TrainingOptions o;
  for (float l2 : {1e-2f, 1.0f, 1e2f, 1e7f}) o.mutable_sweep()->add_l2(l2);
  o.mutable_sweep()->set_folds(3);
  const v1::Job job = Train("m", o);
  ASSERT_EQ(job.state(), v1::Job::SUCCEEDED) << job.error();
  ASSERT_EQ(job.leaderboard_size(), 4);
  for (const auto& c : job.leaderboard()) {
    EXPECT_LE(c.accuracy(), job.leaderboard(0).accuracy()) << c.l2();
    EXPECT_GE(c.accuracy(), 0);
    EXPECT_TRUE(c.hidden().empty());
  }
  // An L2 of 1e7 leaves the weights at nearly 0: the worst of the four.
  EXPECT_NEAR(job.leaderboard(3).l2(), 1e7, 1);
  EXPECT_LT(job.leaderboard(3).accuracy(), job.leaderboard(0).accuracy());
  EXPECT_EQ(job.version(), 1);
  ASSERT_EQ(job.epochs_size(), 1);  // the winner, scored
  EXPECT_GT(job.epochs(0).validation_accuracy(), 0.8);
  EXPECT_TRUE(job.options().has_sweep());
  const v1::Model m = Get("m");
  EXPECT_EQ(m.served_version(), 1);
  EXPECT_NEAR(m.versions(0).validation_accuracy(), job.epochs(0).validation_accuracy(), 1e-9);

  // What a sweep cannot do is refused before it is queued.
  v1::TrainingOptions bad = o;
  bad.mutable_sweep()->set_folds(30);
  EXPECT_EQ(Start("m", "fmnist", bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.mutable_sweep()->add_l2(-1);
  EXPECT_EQ(Start("m", "fmnist", bad).status().code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(Unfreeze("m", {"layer4"}).ok());
  EXPECT_EQ(Start("m", "fmnist", o).status().code(), absl::StatusCode::kInvalidArgument);
}

// A sweep over feature layers: a head on layer3's pooled output. What the
// job measured on its features is what Classify computes through the engine
// (Evaluate on the validation split), after a restart too, and the export
// (checked by the server against Classify) carries the layer.
TEST_F(EvaluationTest, ASweepMayChooseAnEarlierLayerAndClassifyRunsUpToIt) {
  UploadTrainingSet();
  ASSERT_TRUE(CreateModel("m", "fmnist").ok());
  v1::TrainingOptions o;
  for (float l2 : {1e-2f, 1.0f}) o.mutable_sweep()->add_l2(l2);
  o.mutable_sweep()->set_folds(2);
  o.mutable_sweep()->add_layers("layer3");  // only this layer: the winner reads it
  const v1::Job job = Train("m", o);
  ASSERT_EQ(job.state(), v1::Job::SUCCEEDED) << job.error();
  ASSERT_EQ(job.leaderboard_size(), 2);
  for (const auto& c : job.leaderboard()) EXPECT_EQ(c.layer(), "layer3");
  v1::Model m = Get("m");
  EXPECT_EQ(m.versions(0).feature_layer(), "layer3");
  EXPECT_GT(m.versions(0).head_params(), 0);
  EXPECT_NE(m.versions(0).head_params(), m.head_params())
      << "layer3 is narrower than the embedding";

  v1::EvaluateRequest req;
  req.set_model("m");
  req.set_dataset("fmnist");
  req.set_split(v1::SPLIT_VALIDATION);
  auto val = client_->Evaluate(req);
  ASSERT_TRUE(val.ok()) << val.status();
  EXPECT_NEAR(val->evaluations(0).accuracy(), m.versions(0).validation_accuracy(), 1e-6);

  const std::vector<std::string> files = TestFiles(8);
  const std::vector<std::string> classes(m.classes().begin(), m.classes().end());
  const auto before = Probabilities("m", 1, files, classes);
  Restart();
  EXPECT_EQ(Get("m").versions(0).feature_layer(), "layer3");
  const auto after = Probabilities("m", 1, files, classes);
  ExpectSameProbabilities(after, before);
  auto exported = client_->ExportModel("m", 1, dir_ + "/m.pt");
  EXPECT_TRUE(exported.ok()) << exported.status();

  // A layer the backbone does not have is refused before the job is queued.
  v1::TrainingOptions bad = o;
  bad.mutable_sweep()->add_layers("layer9");
  EXPECT_EQ(Start("m", "fmnist", bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.mutable_sweep()->add_layers("layer3");
  EXPECT_EQ(Start("m", "fmnist", bad).status().code(), absl::StatusCode::kInvalidArgument);

  // A fine-tune after it starts cold (the layer3 head cannot read the
  // embedding) and makes an embedding version.
  ASSERT_TRUE(Unfreeze("m", {"layer4"}).ok());
  v1::TrainingOptions tune;
  tune.set_epochs(1);
  tune.set_serve(v1::TrainingOptions::SERVE_ALWAYS);
  const v1::Job tuned = Train("m", tune);
  ASSERT_EQ(tuned.state(), v1::Job::SUCCEEDED) << tuned.error();
  EXPECT_EQ(Get("m").versions(1).feature_layer(), "");
}

// A sweep over head shapes: a winner with a hidden layer on a model whose
// head is linear keeps its shape with its version — served, reloaded after a
// restart, and the warm start of a later fine-tune.
TEST_F(EvaluationTest, ASweepMayChooseAHiddenLayerAndItsVersionKeepsIt) {
  UploadTrainingSet();
  ASSERT_TRUE(CreateModel("m", "fmnist").ok());
  v1::TrainingOptions o;
  for (float l2 : {1e-2f, 1.0f}) o.mutable_sweep()->add_l2(l2);
  o.mutable_sweep()->set_folds(2);
  o.mutable_sweep()->add_hidden(16);  // only this shape: the winner has it
  const v1::Job job = Train("m", o);
  ASSERT_EQ(job.state(), v1::Job::SUCCEEDED) << job.error();
  ASSERT_EQ(job.leaderboard_size(), 2);
  for (const auto& c : job.leaderboard()) {
    ASSERT_EQ(c.hidden_size(), 1);
    EXPECT_EQ(c.hidden(0), 16);
  }
  v1::Model m = Get("m");
  EXPECT_TRUE(m.head().hidden().empty()) << "the model's own head is unchanged";
  ASSERT_EQ(m.versions(0).head().hidden_size(), 1);
  EXPECT_EQ(m.versions(0).head().hidden(0), 16);

  const std::vector<std::string> files = TestFiles(8);
  const std::vector<std::string> classes(m.classes().begin(), m.classes().end());
  const auto before = Probabilities("m", 1, files, classes);
  Restart();
  EXPECT_EQ(Get("m").versions(0).head().hidden_size(), 1);
  const auto after = Probabilities("m", 1, files, classes);
  ExpectSameProbabilities(after, before);

  // A fine-tune starts from the served version: its head, of its shape.
  ASSERT_TRUE(Unfreeze("m", {"layer4"}).ok());
  v1::TrainingOptions tune;
  tune.set_epochs(1);
  tune.set_serve(v1::TrainingOptions::SERVE_ALWAYS);
  const v1::Job tuned = Train("m", tune);
  ASSERT_EQ(tuned.state(), v1::Job::SUCCEEDED) << tuned.error();
  m = Get("m");
  ASSERT_EQ(m.versions_size(), 2);
  ASSERT_EQ(m.versions(1).head().hidden_size(), 1);
  EXPECT_EQ(m.versions(1).head().hidden(0), 16);
  EXPECT_EQ(Probabilities("m", 2, files, classes).size(), files.size());

  // A model whose head has the winner's width but dropout: the version's
  // head has no dropout layer, and is recorded as such (it reloads).
  {
    grpc::ClientContext ctx;
    v1::CreateModelRequest req;
    req.set_name("d");
    req.set_dataset("fmnist");
    req.mutable_head()->add_hidden(16);
    req.mutable_head()->set_dropout(0.5f);
    v1::Model created;
    ASSERT_TRUE(stub_->CreateModel(&ctx, req, &created).ok());
  }
  ASSERT_EQ(Train("d", o).state(), v1::Job::SUCCEEDED);
  const auto dropped = Probabilities("d", 1, files, classes);
  Restart();
  const v1::Model d = Get("d");
  EXPECT_TRUE(d.problem().empty()) << d.problem();
  EXPECT_EQ(d.versions(0).head().dropout(), 0.0f);
  const auto reloaded = Probabilities("d", 1, files, classes);
  ExpectSameProbabilities(reloaded, dropped);

  // Shapes out of range, or twice, or over --max_head_params, are refused
  // before the job is queued.
  ASSERT_TRUE(CreateModel("h", "fmnist").ok());
  for (int width : {-1, 20000}) {
    v1::TrainingOptions bad = o;
    bad.mutable_sweep()->add_hidden(width);
    EXPECT_EQ(Start("h", "fmnist", bad).status().code(), absl::StatusCode::kInvalidArgument)
        << width;
  }
  v1::TrainingOptions twice = o;
  twice.mutable_sweep()->add_hidden(16);
  EXPECT_EQ(Start("h", "fmnist", twice).status().code(), absl::StatusCode::kInvalidArgument);
  max_head_params_ = 100'000;
  Restart();
  v1::TrainingOptions wide = o;
  wide.mutable_sweep()->add_hidden(256);  // 512 * 256 + 256 + 256 * 3 + 3 = 132,099 parameters
  const auto refused = Start("h", "fmnist", wide);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("--max_head_params"), std::string::npos);
}

}  // namespace
}  // namespace tlserve
