#include "server/core/fine_tuner.h"

#include <gtest/gtest.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "server/core/datasets.h"
#include "tests/test_util.h"

namespace tlserve {
namespace {

using ::tlserve::testing::Fixture;
using ::tlserve::testing::ReadBytes;

std::vector<at::Tensor> Copy(const torch::jit::Module& m) {
  std::vector<at::Tensor> out;
  for (const auto& p : m.parameters()) out.push_back(p.detach().clone());
  for (const auto& b : m.buffers()) out.push_back(b.detach().clone());
  return out;
}

bool Same(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!a[i].equal(b[i])) return false;
  }
  return true;
}

struct Examples {
  std::vector<StoredExample> examples;
  std::vector<int64_t> labels;
};

Examples Load(const std::vector<std::string>& classes) {
  Examples out;
  int64_t id = 0;
  for (size_t c = 0; c < classes.size(); ++c) {
    for (const auto& f :
         std::filesystem::directory_iterator(Fixture("fmnist/train/" + classes[c]))) {
      StoredExample e;
      e.id = ++id;
      e.name = f.path().string();
      e.label = classes[c];
      e.bytes = ReadBytes(f.path().string());
      e.hash = DatasetCatalog::ExampleHash(e.name, e.bytes);
      out.examples.push_back(std::move(e));
      out.labels.push_back(static_cast<int64_t>(c));
    }
  }
  return out;
}

// The examples' bytes are read through `read`, as a job reads the database.
FineTuneData Data(const std::vector<StoredExample>& examples, const std::vector<int64_t>& labels,
                  double validation = 0.15) {
  FineTuneData data;
  data.read = [&examples](const std::vector<int64_t>& idx) {
    std::vector<std::string> out;
    for (int64_t i : idx) out.push_back(examples[i].bytes);
    return absl::StatusOr<std::vector<std::string>>(out);
  };
  data.labels = labels;
  for (size_t i = 0; i < examples.size(); ++i) {
    (DatasetCatalog::IsValidation(examples[i].hash, validation) ? data.val : data.train)
        .push_back(static_cast<int64_t>(i));
  }
  return data;
}

std::map<int, std::shared_ptr<torch::jit::Module>> PrivateLayer4(const Backbone& b) {
  std::map<int, std::shared_ptr<torch::jit::Module>> stages;
  const int i = *b.EmbeddableStage("layer4");
  stages[i] = std::make_shared<torch::jit::Module>(b.CloneStage(i));
  return stages;
}

std::unique_ptr<Backbone> LoadBackbone(const std::string& file) {
  BackboneOptions bo;
  bo.path = Fixture(file);
  bo.device = "cpu";
  auto b = Backbone::Load(bo);
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? std::move(*b) : nullptr;
}

// The device engine fine-tuning runs its frozen prefix in.
std::unique_ptr<Engine> EngineOf(const Backbone& b) {
  Engine::Options o;
  o.max_batch_size = 8;
  auto e = Engine::Create(&b, o, nullptr);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? std::move(*e) : nullptr;
}

// Finding 1b of the hardening issue: BatchNorm in training mode on a batch
// of one 1×1 value threw, and the exception aborted the server.
TEST(FineTunerTest, ABatchOfOneOnA32PixelBackboneTrainsInsteadOfThrowing) {
  auto b = LoadBackbone("r18tiny.pt");
  ASSERT_NE(b, nullptr);
  Examples ex = Load({"t-shirt", "trouser"});
  TrainOptions o;
  o.epochs = 1;
  o.freeze_batchnorm = false;  // the statistics train, except on a batch of one
  for (int batch_size : {1, 0}) {
    FineTuneData data = Data(ex.examples, ex.labels);
    // 0: a batch size that leaves a last batch of exactly one image.
    o.batch_size = batch_size > 0 ? batch_size : static_cast<int>(data.train.size()) - 1;
    auto resolved = ResolveTrainOptions(o, HeadSpec{}, /*fine_tune=*/true);
    ASSERT_TRUE(resolved.ok()) << resolved.status();
    auto tuned =
        FineTune(*EngineOf(*b), PrivateLayer4(*b), MakeHead(HeadSpec{}, b->embedding_dim(), 2), 2,
                 data, *resolved, nullptr, nullptr);
    ASSERT_TRUE(tuned.ok()) << "batch size " << o.batch_size << ": " << tuned.status();
    ASSERT_EQ(tuned->history.size(), 2u);
    EXPECT_TRUE(std::isfinite(tuned->history[1].train_loss));
  }
}

// Finding 10: fine-tuning published a model at chance. The starting point is
// epoch 0 and the result is never worse on validation than it.
TEST(FineTunerTest, NeverComesOutWorseOnValidationThanItsStartingPoint) {
  auto b = LoadBackbone("r18small.pt");
  ASSERT_NE(b, nullptr);
  Examples ex = Load({"t-shirt", "trouser", "sandal"});
  FineTuneData data = Data(ex.examples, ex.labels, 0.3);
  TrainOptions o;
  o.epochs = 2;
  o.optimizer = TrainOptions::Optimizer::kAdamw;
  o.learning_rate = 0.5f;  // far too high: the epochs wreck the model
  o.stage_learning_rate = 0.5f;
  o.freeze_batchnorm = false;
  auto resolved = ResolveTrainOptions(o, HeadSpec{}, /*fine_tune=*/true);
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  auto tuned =
      FineTune(*EngineOf(*b), PrivateLayer4(*b), MakeHead(HeadSpec{}, b->embedding_dim(), 3), 3,
               data, *resolved, nullptr, nullptr);
  if (!tuned.ok()) {  // diverged to a non-finite loss: also a refusal to publish
    EXPECT_EQ(tuned.status().code(), absl::StatusCode::kFailedPrecondition) << tuned.status();
    return;
  }
  ASSERT_GE(tuned->history.size(), 1u);
  EXPECT_GE(tuned->validation.accuracy, tuned->history[0].validation_accuracy);
  for (const auto& e : tuned->history) {
    std::printf("epoch %d: validation accuracy %.3f\n", e.epoch, e.validation_accuracy);
  }
}

TEST(FineTunerTest, ANonFiniteLossFailsTheRunWithAMessage) {
  auto b = LoadBackbone("r18small.pt");
  ASSERT_NE(b, nullptr);
  Examples ex = Load({"t-shirt", "trouser"});
  FineTuneData data = Data(ex.examples, ex.labels);
  TrainOptions o;
  o.epochs = 5;
  o.optimizer = TrainOptions::Optimizer::kSgd;
  o.learning_rate = 100;
  o.stage_learning_rate = 100;
  auto resolved = ResolveTrainOptions(o, HeadSpec{}, /*fine_tune=*/true);
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  auto tuned =
      FineTune(*EngineOf(*b), PrivateLayer4(*b), MakeHead(HeadSpec{}, b->embedding_dim(), 2), 2,
               data, *resolved, nullptr, nullptr);
  ASSERT_FALSE(tuned.ok());
  EXPECT_EQ(tuned.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(tuned.status().message().find("diverged"), std::string::npos) << tuned.status();
}

TEST(FineTunerTest, TrainsAPrivateLayer4AndLeavesTheSharedOneBitIdentical) {
  BackboneOptions bo;
  bo.path = Fixture("r18small.pt");
  bo.device = "cpu";
  auto backbone = Backbone::Load(bo);
  ASSERT_TRUE(backbone.ok()) << backbone.status();
  const Backbone& b = **backbone;
  auto layer4 = b.EmbeddableStage("layer4");
  ASSERT_TRUE(layer4.ok());
  const auto shared_before = Copy(b.stage(*layer4));

  std::vector<StoredExample> examples;
  std::vector<int64_t> labels;
  int64_t id = 0;
  for (const auto& [label, cls] :
       std::vector<std::pair<std::string, int>>{{"t-shirt", 0}, {"trouser", 1}, {"sandal", 2}}) {
    for (const auto& f : std::filesystem::directory_iterator(Fixture("fmnist/train/" + label))) {
      StoredExample e;
      e.id = ++id;
      e.name = f.path().string();
      e.label = label;
      e.bytes = ReadBytes(f.path().string());
      e.hash = DatasetCatalog::ExampleHash(e.name, e.bytes);
      examples.push_back(std::move(e));
      labels.push_back(cls);
    }
  }
  at::Tensor probe = at::randn({2, 3, 64, 64});
  const at::Tensor embed_before = b.Embed(probe, EmbedSpec{});

  std::map<int, std::shared_ptr<torch::jit::Module>> stages;
  stages[*layer4] = std::make_shared<torch::jit::Module>(b.CloneStage(*layer4));
  int64_t params = 0;
  for (const auto& p : stages[*layer4]->parameters()) {
    EXPECT_TRUE(p.is_leaf());
    EXPECT_TRUE(p.requires_grad());
    params += p.numel();
  }
  EXPECT_EQ(params, 8'393'728);
  const auto private_before = Copy(*stages[*layer4]);

  FineTuneData data = Data(examples, labels);
  TrainOptions o;
  o.epochs = 6;
  o.learning_rate = 3e-3f;
  // This backbone's random weights never saw data, so its BatchNorm running
  // statistics are the initial ones: training them on batches would make
  // train-mode and eval-mode features disagree. Keep them fixed here.
  o.freeze_batchnorm = true;
  auto resolved = ResolveTrainOptions(o, HeadSpec{}, /*fine_tune=*/true);
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_FLOAT_EQ(resolved->stage_learning_rate, resolved->learning_rate / 10);
  auto tuned = FineTune(*EngineOf(b), stages, MakeHead(HeadSpec{}, 512, 3), 3, data, *resolved,
                        nullptr, nullptr);
  ASSERT_TRUE(tuned.ok()) << tuned.status();
  ASSERT_EQ(tuned->history.size(), 7u);  // the starting point, then 6 epochs
  EXPECT_EQ(tuned->history[0].epoch, 0);
  EXPECT_FALSE(Same(private_before, Copy(*tuned->stages.at(*layer4))))
      << "fine-tuning did not change the private layer4";
  EXPECT_TRUE(Same(shared_before, Copy(b.stage(*layer4))))
      << "fine-tuning changed the shared layer4";
  EXPECT_TRUE(b.Embed(probe, EmbedSpec{}).equal(embed_before));
  // Chance is 1/3. Measured 0.900 here (CI's build); a build against other
  // library copies (the GPU check's dry run on a CPU) measured 0.680 on the
  // random-weight fixture, so the bound says "learned", not "how well".
  EXPECT_GT(tuned->train.accuracy, 0.6);
  std::printf("measured: fine-tuned train accuracy %.3f, validation %.3f\n", tuned->train.accuracy,
              tuned->validation.accuracy);
}

}  // namespace
}  // namespace tlserve

namespace tlserve {
namespace {

// The recipe's gradual unfreezing: with layer3 and layer4 private, layer4
// trains from the first step, layer3 only from the epoch where it joins
// (1 + 1 * 4 / (2 * 2) = 2 of 4), then both; without it, both from the start.
TEST(FineTunerTest, GradualUnfreezingTrainsTheDeepestStageFirstThenBoth) {
  auto b = LoadBackbone("r18tiny.pt");
  ASSERT_NE(b, nullptr);
  Examples ex = Load({"t-shirt", "trouser"});
  const int l3 = *b->EmbeddableStage("layer3"), l4 = *b->EmbeddableStage("layer4");
  for (bool gradual : {true, false}) {
    std::map<int, std::shared_ptr<torch::jit::Module>> stages;
    for (int i : {l3, l4}) {
      torch::NoGradGuard no_grad;
      stages[i] = std::make_shared<torch::jit::Module>(b->CloneStage(i));
    }
    for (auto& [i, m] : stages) {
      for (const auto& p : m->parameters()) p.set_requires_grad(true);
    }
    const auto layer3 = stages[l3], layer4 = stages[l4];
    const std::vector<at::Tensor> layer3_before = Copy(*layer3);
    FineTuneData data = Data(ex.examples, ex.labels);
    TrainOptions o;
    o.epochs = 4;
    o.batch_size = 16;
    o.gradual_unfreezing = gradual;
    auto resolved = ResolveTrainOptions(o, HeadSpec{}, /*fine_tune=*/true);
    ASSERT_TRUE(resolved.ok()) << resolved.status();
    const int64_t n = static_cast<int64_t>(data.train.size());
    const int64_t per_epoch = (n + 15) / 16 - (n % 16 == 1 ? 1 : 0);
    int64_t step = 0;
    std::vector<bool> layer3_trains, layer4_trains;
    bool layer3_moved = false;  // by the last step (the best epoch is restored after)
    data.before_step = [&] {
      ++step;
      if (step == 4 * per_epoch) layer3_moved = !Same(Copy(*layer3), layer3_before);
      // The flags are set per epoch, before its first step.
      layer3_trains.push_back(layer3->parameters().begin().operator*().requires_grad());
      layer4_trains.push_back(layer4->parameters().begin().operator*().requires_grad());
    };
    auto tuned = FineTune(*EngineOf(*b), stages, MakeHead(HeadSpec{}, b->embedding_dim(), 2), 2,
                          data, *resolved, nullptr, nullptr);
    ASSERT_TRUE(tuned.ok()) << tuned.status();
    ASSERT_EQ(step, 4 * per_epoch);
    for (int64_t s = 0; s < step; ++s) {
      EXPECT_TRUE(layer4_trains[s]) << "step " << s;
      EXPECT_EQ(layer3_trains[s], !gradual || s >= per_epoch)
          << "gradual " << gradual << " step " << s;
    }
    EXPECT_TRUE(layer3_moved) << "layer3 trained in the end";
  }
}

}  // namespace
}  // namespace tlserve
