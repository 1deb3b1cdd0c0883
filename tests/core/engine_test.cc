// The device engine: mixed batches of many models' images equal each
// model's lone answers, the shared prefix runs once per batch, lanes take
// turns, serving goes before training, a damaged model fails alone, and the
// residency budget evicts and brings back private stages.
#include "server/core/engine/engine.h"

#include <gtest/gtest.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <algorithm>
#include <vector>

#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "server/core/head.h"
#include "server/core/preprocess.h"
#include "tests/test_util.h"

namespace tlserve {
namespace {

using testing::Fixture;

std::unique_ptr<Backbone> LoadBackbone() {
  BackboneOptions bo;
  bo.path = Fixture("r18small.pt");
  bo.device = std::getenv("TLSERVE_TEST_DEVICE") ? std::getenv("TLSERVE_TEST_DEVICE") : "cpu";
  bo.threads = 2;
  auto b = Backbone::Load(bo);
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? std::move(*b) : nullptr;
}

std::unique_ptr<Engine> MakeEngine(const Backbone& b, int max_batch, int64_t budget = 0,
                                   absl::Duration delay = absl::Milliseconds(200)) {
  Engine::Options o;
  o.max_batch_size = max_batch;
  o.max_queue_delay = delay;
  o.device_memory_budget_bytes = budget;
  auto e = Engine::Create(&b, o, nullptr);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? std::move(*e) : nullptr;
}

// A version with a random head (seeded) and, with `private_layer4`, its own
// layer4 with perturbed weights: as a trained fine-tune would be.
std::shared_ptr<const ServableVersion> MakeVersion(const Backbone& b, const std::string& name,
                                                   int seed, bool private_layer4,
                                                   int64_t classes = 5) {
  torch::manual_seed(seed);
  torch::nn::Sequential head = MakeHead(HeadSpec{}, b.embedding_dim(), classes);
  head->eval();
  StagePlan::Stages own;
  if (private_layer4) {
    const int i = *b.EmbeddableStage("layer4");
    auto m = std::make_shared<torch::jit::Module>(b.CloneStage(i));
    torch::NoGradGuard no_grad;
    for (const auto& p : m->parameters()) {
      p.add_(torch::randn(p.sizes()) * 0.05);
      p.set_requires_grad(false);
    }
    m->eval();
    own[i] = m;
  }
  std::vector<std::string> names;
  for (int64_t c = 0; c < classes; ++c) names.push_back("c" + std::to_string(c));
  return std::make_shared<const ServableVersion>(name, 1, names,
                                                 StagePlan(b, std::move(own), head));
}

at::Tensor Image(int seed, int64_t crop) {
  torch::manual_seed(1000 + seed);
  return torch::randint(0, 256, {3, crop, crop}, torch::kByte);
}

Engine::Work Classify(const at::Tensor& image, std::shared_ptr<const ServableVersion> v) {
  Engine::Work w;
  w.input = image;
  w.output = Engine::Output::kClassification;
  w.version = std::move(v);
  return w;
}

// The reference: the version's own plan on the calling thread, in one
// batch, no engine (softmax of StagePlan::LogitsOf).
at::Tensor Reference(const ServableVersion& v, const Backbone& b, const at::Tensor& image) {
  // The host copy's modules, on the backbone's device (a GPU, under
  // TLSERVE_TEST_DEVICE=cuda) when it is not the CPU.
  StagePlan::Stages own;
  for (const auto& [i, m] : v.plan.own()) {
    own[i] = std::make_shared<torch::jit::Module>(b.OnDevice(*m, false));
  }
  auto head =
      std::dynamic_pointer_cast<torch::nn::SequentialImpl>(v.plan.head()->clone(b.torch_device()));
  const StagePlan plan(b, std::move(own), torch::nn::Sequential(head));
  c10::InferenceMode guard;
  const at::Tensor x = Normalize(image, b.preprocess()).unsqueeze(0);
  return at::softmax(plan.LogitsOf(x), 1)[0].to(torch::kCPU, torch::kFloat);
}

// Probabilities in class order from a top-k (all classes) result.
at::Tensor InClassOrder(const EngineResult& r) {
  at::Tensor p = torch::zeros({r.values.size(0)});
  p.index_put_({r.indices}, r.values.to(torch::kFloat));
  return p;
}

TEST(EngineTest, AMixedBatchEqualsEachModelAloneAndRunsTheSharedPrefixOnce) {
  auto b = LoadBackbone();
  ASSERT_NE(b, nullptr);
  const int64_t crop = b->preprocess().crop;
  std::vector<std::shared_ptr<const ServableVersion>> models = {
      MakeVersion(*b, "head-a", 1, false), MakeVersion(*b, "head-b", 2, false),
      MakeVersion(*b, "own-c", 3, true), MakeVersion(*b, "own-d", 4, true)};
  constexpr int kImages = 3;
  auto engine = MakeEngine(*b, 64, int64_t{1} << 30);
  ASSERT_NE(engine, nullptr);

  // Alone: each model's images in a batch of their own.
  std::vector<std::vector<at::Tensor>> alone(models.size());
  for (size_t m = 0; m < models.size(); ++m) {
    std::vector<Engine::Work> work;
    for (int i = 0; i < kImages; ++i) work.push_back(Classify(Image(i, crop), models[m]));
    auto r = engine->Run(std::move(work));
    ASSERT_TRUE(r.ok()) << r.status();
    for (const auto& x : *r) alone[m].push_back(InClassOrder(x));
  }
  // Embeddings alone: the default and a pooled layer2.
  EmbedSpec layer2;
  layer2.stage = *b->EmbeddableStage("layer2");
  layer2.pool = Pool::kMax;
  std::vector<at::Tensor> embed_alone;
  for (const EmbedSpec& spec : {EmbedSpec{}, layer2}) {
    Engine::Work w;
    w.input = Image(0, crop);
    w.spec = spec;
    auto r = engine->Run({w});
    ASSERT_TRUE(r.ok()) << r.status();
    embed_alone.push_back((*r)[0].values);
  }

  // Mixed: every model's images and both embeddings, submitted together.
  const Engine::Counters before = engine->counters();
  std::vector<Engine::Work> work;
  for (int i = 0; i < kImages; ++i) {
    for (const auto& m : models) work.push_back(Classify(Image(i, crop), m));
  }
  for (const EmbedSpec& spec : {EmbedSpec{}, layer2}) {
    Engine::Work w;
    w.input = Image(0, crop);
    w.spec = spec;
    work.push_back(w);
  }
  auto mixed = engine->Run(std::move(work));
  ASSERT_TRUE(mixed.ok()) << mixed.status();
  const Engine::Counters after = engine->counters();

  for (int i = 0; i < kImages; ++i) {
    for (size_t m = 0; m < models.size(); ++m) {
      const at::Tensor p = InClassOrder((*mixed)[i * models.size() + m]);
      EXPECT_LE((p - alone[m][i]).abs().max().item<double>(), 1e-5)
          << models[m]->model << " image " << i;
      // And both are what the model computes on its own, outside the engine
      // (its private layer4, not the shared one; its head).
      EXPECT_LE((p - Reference(*models[m], *b, Image(i, crop))).abs().max().item<double>(), 1e-5)
          << models[m]->model << " image " << i << " vs the plan's own forward";
    }
  }
  for (size_t s = 0; s < 2; ++s) {
    const at::Tensor v = (*mixed)[kImages * models.size() + s].values;
    EXPECT_LE((v - embed_alone[s]).abs().max().item<double>(), 1e-5) << "embedding " << s;
  }
  // One batch: the shared stages ran once for all 14 images; each model's
  // private layer4 and head once on its slice.
  EXPECT_EQ(after.batches - before.batches, 1);
  EXPECT_EQ(after.prefix_forwards - before.prefix_forwards, 1);
  EXPECT_EQ(after.prefix_images - before.prefix_images, kImages * 4 + 2);
  // Each image went through exactly the shared stages it needs, once: the
  // head-only models' and the embedding's all of them, the private-layer4
  // models' those before layer4, layer2's embedding those up to layer2.
  const int head = b->head_index();
  const int own = models[2]->plan.first_private();
  ASSERT_EQ(own, *b->EmbeddableStage("layer4"));
  const int64_t needed = kImages * 2 * head + kImages * 2 * own + head + (layer2.stage + 1);
  EXPECT_EQ(after.prefix_stage_images - before.prefix_stage_images, needed);
  EXPECT_EQ(after.private_forwards - before.private_forwards, 2);
  EXPECT_EQ(after.private_images - before.private_images, kImages * 2);
  EXPECT_EQ(after.head_forwards - before.head_forwards, 4);
}

TEST(EngineTest, CallersOfOneModelWithDifferentTopKGetTheirOwnK) {
  auto b = LoadBackbone();
  ASSERT_NE(b, nullptr);
  auto engine = MakeEngine(*b, 16);
  const int64_t crop = b->preprocess().crop;
  auto v = MakeVersion(*b, "m", 1, false);
  std::vector<Engine::Work> work;
  for (int k : {1, 5, 3, 0, 2}) {
    work.push_back(Classify(Image(0, crop), v));
    work.back().top_k = k;
  }
  const Engine::Counters before = engine->counters();
  auto r = engine->Run(std::move(work));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(engine->counters().batches - before.batches, 1);
  const std::vector<int64_t> want = {1, 5, 3, 5, 2};
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ((*r)[i].values.size(0), want[i]) << i;
    EXPECT_EQ((*r)[i].indices.size(0), want[i]) << i;
    // The same image and model: every k is a prefix of the full ranking.
    EXPECT_TRUE((*r)[i].indices.equal((*r)[3].indices.narrow(0, 0, want[i]))) << i;
  }
}

TEST(EngineTest, EmbeddingsEqualTheBackbonesOwn) {
  auto b = LoadBackbone();
  ASSERT_NE(b, nullptr);
  auto engine = MakeEngine(*b, 8, 0, absl::Milliseconds(1));
  const int64_t crop = b->preprocess().crop;
  std::vector<Engine::Work> work;
  std::vector<at::Tensor> inputs;
  for (int i = 0; i < 5; ++i) {
    Engine::Work w;
    w.input = Image(i, crop);
    inputs.push_back(Normalize(w.input, b->preprocess()));
    work.push_back(w);
  }
  auto r = engine->Run(std::move(work));
  ASSERT_TRUE(r.ok()) << r.status();
  const at::Tensor reference = b->Embed(torch::stack(inputs), EmbedSpec{});
  for (int i = 0; i < 5; ++i) {
    EXPECT_LE(((*r)[i].values - reference[i]).abs().max().item<double>(), 1e-5);
  }
}

TEST(EngineTest, LanesTakeTurnsAndServingGoesBeforeTraining) {
  auto b = LoadBackbone();
  ASSERT_NE(b, nullptr);
  auto engine = MakeEngine(*b, 4, 0, absl::Milliseconds(50));
  const int64_t crop = b->preprocess().crop;
  absl::Mutex mu;
  std::vector<std::string> order;
  absl::Notification all;
  int remaining = 0;
  auto make = [&](const std::string& who, uint64_t lane, Engine::Priority p) {
    Engine::Work w;
    w.input = Image(0, crop);
    w.lane = lane;
    w.priority = p;
    w.done = [&, who](absl::StatusOr<EngineResult> r) {
      EXPECT_TRUE(r.ok()) << r.status();
      absl::MutexLock lock(&mu);
      order.push_back(who);
      if (--remaining == 0) all.Notify();
    };
    absl::MutexLock lock(&mu);
    ++remaining;
    return w;
  };
  // The launch thread is held inside a first batch (its cancelled() blocks)
  // while the rest is queued: training first, so that it is the oldest and
  // full; then a flood from one caller; then another caller's single image.
  absl::Notification queued, holding;
  Engine::Work blocker = make("blocker", 7, Engine::Priority::kServing);
  blocker.cancelled = [&] {
    holding.Notify();
    queued.WaitForNotification();
    return false;
  };
  ASSERT_TRUE(engine->Submit({blocker}).ok());
  holding.WaitForNotification();
  std::vector<Engine::Work> training;
  for (int i = 0; i < 4; ++i) training.push_back(make("train", 9, Engine::Priority::kTraining));
  ASSERT_TRUE(engine->Submit(std::move(training)).ok());
  absl::SleepFor(absl::Milliseconds(5));  // strictly older than what follows
  std::vector<Engine::Work> serving;
  for (int i = 0; i < 40; ++i) serving.push_back(make("flood", 1, Engine::Priority::kServing));
  serving.push_back(make("single", 2, Engine::Priority::kServing));
  ASSERT_TRUE(engine->Submit(std::move(serving)).ok());
  queued.Notify();
  all.WaitForNotification();
  absl::MutexLock lock(&mu);
  ASSERT_EQ(order.size(), 46u);
  ASSERT_EQ(order[0], "blocker");
  // The single image rides in the first batch after the blocker (of 4),
  // beside the flood, although 40 of the flood's were queued before it.
  const auto single = std::find(order.begin(), order.end(), "single") - order.begin();
  EXPECT_LE(single, 4) << "the lone caller waited behind the flood";
  // Serving goes first although training is older and its batch is full...
  for (int i = 1; i <= 4; ++i) EXPECT_NE(order[i], "train") << i;
  // ...but training is not starved: it gets a batch within kTrainingShare,
  // long before the flood's 10 batches are done.
  const auto first_train = std::find(order.begin(), order.end(), "train") - order.begin();
  EXPECT_LE(first_train, 1 + 4 * (Engine::kTrainingShare - 1));
}

TEST(EngineTest, ADamagedModelFailsAloneInAMixedBatch) {
  auto b = LoadBackbone();
  ASSERT_NE(b, nullptr);
  auto engine = MakeEngine(*b, 16);
  const int64_t crop = b->preprocess().crop;
  auto good = MakeVersion(*b, "good", 1, false);
  // A head whose input does not match the embedding: its forward throws.
  torch::nn::Sequential bad_head = MakeHead(HeadSpec{}, b->embedding_dim() + 1, 3);
  auto bad = std::make_shared<const ServableVersion>(
      "bad", 1, std::vector<std::string>{"a", "b", "c"}, StagePlan(*b, {}, bad_head));
  std::vector<absl::StatusOr<EngineResult>> results(2, absl::UnknownError("not run"));
  absl::BlockingCounter done(2);
  std::vector<Engine::Work> work = {Classify(Image(0, crop), good), Classify(Image(0, crop), bad)};
  for (int i = 0; i < 2; ++i) {
    work[i].done = [&, i](absl::StatusOr<EngineResult> r) {
      results[i] = std::move(r);
      done.DecrementCount();
    };
  }
  ASSERT_TRUE(engine->Submit(std::move(work)).ok());
  done.Wait();
  EXPECT_TRUE(results[0].ok()) << results[0].status();
  EXPECT_EQ(results[1].status().code(), absl::StatusCode::kInternal) << results[1].status();
  // And the engine goes on.
  auto again = engine->Run({Classify(Image(1, crop), good)});
  EXPECT_TRUE(again.ok()) << again.status();
}

TEST(EngineTest, RejectsBadWorkAFullQueueAndDropsCancelledOrLateImages) {
  auto b = LoadBackbone();
  ASSERT_NE(b, nullptr);
  const int64_t crop = b->preprocess().crop;
  {
    auto engine = MakeEngine(*b, 4);
    Engine::Work bad;
    bad.input = torch::zeros({crop, crop});  // not C×H×W
    EXPECT_EQ(engine->Submit({bad}).code(), absl::StatusCode::kInvalidArgument);
    Engine::Work no_version;
    no_version.input = Image(0, crop);
    no_version.output = Engine::Output::kClassification;
    EXPECT_EQ(engine->Submit({no_version}).code(), absl::StatusCode::kInvalidArgument);
  }
  {
    Engine::Options o;
    o.max_batch_size = 1;
    o.max_queue_size = 2;
    auto engine = Engine::Create(b.get(), o, nullptr);
    ASSERT_TRUE(engine.ok());
    std::vector<Engine::Work> three(3);
    for (auto& w : three) w.input = Image(0, crop);
    EXPECT_EQ((*engine)->Submit(std::move(three)).code(), absl::StatusCode::kResourceExhausted);
  }
  {
    auto engine = MakeEngine(*b, 4);
    Engine::Work cancelled;
    cancelled.input = Image(0, crop);
    cancelled.cancelled = [] { return true; };
    EXPECT_EQ(engine->Run({cancelled}).status().code(), absl::StatusCode::kCancelled);
    Engine::Work late;
    late.input = Image(0, crop);
    late.deadline = absl::Now() - absl::Seconds(1);
    EXPECT_EQ(engine->Run({late}).status().code(), absl::StatusCode::kDeadlineExceeded);
  }
}

TEST(EngineTest, ABudgetForTwoPrivateStagesServesFourModelsWithEvictions) {
  auto b = LoadBackbone();
  ASSERT_NE(b, nullptr);
  const int64_t crop = b->preprocess().crop;
  std::vector<std::shared_ptr<const ServableVersion>> models;
  for (int m = 0; m < 4; ++m) models.push_back(MakeVersion(*b, "m" + std::to_string(m), m, true));
  const int64_t each = models[0]->plan.bytes();
  // Answers with room for all, then with room for two and a half.
  std::vector<at::Tensor> reference;
  {
    auto roomy = MakeEngine(*b, 8, 10 * each, absl::Milliseconds(1));
    for (const auto& m : models) {
      auto r = roomy->Run({Classify(Image(7, crop), m)});
      ASSERT_TRUE(r.ok()) << r.status();
      reference.push_back(InClassOrder((*r)[0]));
      EXPECT_LE((reference.back() - Reference(*m, *b, Image(7, crop))).abs().max().item<double>(),
                1e-5);
    }
    EXPECT_EQ(roomy->counters().evictions, 0);
    EXPECT_EQ(roomy->counters().resident, 4);
  }
  auto tight = MakeEngine(*b, 8, each * 5 / 2, absl::Milliseconds(1));
  for (int round = 0; round < 2; ++round) {
    for (size_t m = 0; m < models.size(); ++m) {
      auto r = tight->Run({Classify(Image(7, crop), models[m])});
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_LE((InClassOrder((*r)[0]) - reference[m]).abs().max().item<double>(), 1e-6)
          << "model " << m << " round " << round;
    }
  }
  const Engine::Counters c = tight->counters();
  EXPECT_LE(c.resident, 2);
  EXPECT_EQ(c.resident + c.host, 4);
  EXPECT_GE(c.evictions, 6);  // every use after the second brought one back
}

}  // namespace
}  // namespace tlserve
