#include "server/core/fine_tuner.h"

#include <gtest/gtest.h>
#include <torch/script.h>
#include <torch/torch.h>

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

  FineTuneData data;
  data.examples = &examples;
  data.labels = labels;
  for (size_t i = 0; i < examples.size(); ++i) {
    (DatasetCatalog::IsValidation(examples[i].hash, 0.15) ? data.val : data.train).push_back(i);
  }
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
  auto tuned =
      FineTune(b, stages, MakeHead(HeadSpec{}, 512, 3), 3, data, *resolved, nullptr, nullptr);
  ASSERT_TRUE(tuned.ok()) << tuned.status();
  EXPECT_EQ(tuned->history.size(), 6u);
  EXPECT_FALSE(Same(private_before, Copy(*tuned->stages.at(*layer4))))
      << "fine-tuning did not change the private layer4";
  EXPECT_TRUE(Same(shared_before, Copy(b.stage(*layer4))))
      << "fine-tuning changed the shared layer4";
  EXPECT_TRUE(b.Embed(probe, EmbedSpec{}).equal(embed_before));
  EXPECT_GT(tuned->train.accuracy, 0.7);  // chance is 1/3
  std::printf("measured: fine-tuned train accuracy %.3f, validation %.3f\n", tuned->train.accuracy,
              tuned->validation.accuracy);
}

}  // namespace
}  // namespace tlserve
