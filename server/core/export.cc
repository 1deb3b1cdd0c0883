#include "server/core/export.h"

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/script.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "server/core/catalog/tenant_key.h"
#include "server/core/sha256.h"

namespace tlserve {
namespace {

bool IsIdentifier(const std::string& s) {
  if (s.empty() || absl::ascii_isdigit(s[0])) return false;
  for (char c : s) {
    if (!absl::ascii_isalnum(c) && c != '_') return false;
  }
  return true;
}

// A CPU float32 copy, in eval mode, that never trains.
torch::jit::Module Frozen(const torch::jit::Module& m) {
  torch::NoGradGuard no_grad;
  torch::jit::Module copy = m.clone();
  copy.to(torch::kCPU, torch::kFloat);
  for (const auto& p : copy.parameters()) p.set_requires_grad(false);
  copy.eval();
  return copy;
}

// The head (a C++ Sequential of Linear, ReLU and Dropout) as TorchScript,
// in eval mode (Dropout is the identity there).
absl::StatusOr<torch::jit::Module> ScriptHead(const torch::nn::Sequential& head) {
  torch::jit::Module m("tlserve_Head");
  m.register_attribute("training", c10::BoolType::get(), false);
  std::string body;
  int linear = 0;
  for (const auto& child : head->children()) {
    if (auto* l = child->as<torch::nn::Linear>()) {
      const std::string w = absl::StrCat("weight", linear), b = absl::StrCat("bias", linear);
      m.register_parameter(w, l->weight.detach().to(torch::kCPU, torch::kFloat).clone(), false);
      m.register_parameter(b, l->bias.detach().to(torch::kCPU, torch::kFloat).clone(), false);
      absl::StrAppend(&body, "    x = torch.addmm(self.", b, ", x, self.", w, ".t())\n");
      ++linear;
    } else if (child->as<torch::nn::ReLU>()) {
      absl::StrAppend(&body, "    x = torch.relu(x)\n");
    } else if (!child->as<torch::nn::Dropout>()) {
      return absl::InternalError(absl::StrCat("cannot export head layer ", child->name()));
    }
  }
  m.define(absl::StrCat("def forward(self, x):\n", body, "    return x\n"));
  return m;
}

}  // namespace

absl::StatusOr<ExportedModel> ExportModel(Engine& engine,
                                          const std::shared_ptr<const ServableVersion>& handle,
                                          const std::string& path) {
  const Backbone& backbone = engine.backbone();
  const ServableVersion& version = *handle;
  const std::vector<std::string>& names = backbone.stage_names();
  for (const auto& name : names) {
    if (!IsIdentifier(name)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cannot export: backbone stage \"", name,
          "\" is not a Python identifier, so TorchScript cannot name it in the exported forward"));
    }
  }
  auto head = ScriptHead(version.plan.head());
  if (!head.ok()) return head.status();

  torch::jit::Module top("tlserve_Classifier");
  top.register_attribute("training", c10::BoolType::get(), false);
  std::string forward = "def forward(self, x):\n";
  // A head on an earlier stage (a sweep's choice): the stages up to it, then
  // the average over space, as the engine pools it.
  const int feature_stage = version.plan.feature_stage();
  const int last = feature_stage >= 0 ? feature_stage : backbone.head_index() - 1;
  for (int i = 0; i <= last; ++i) {
    top.register_module(names[i], Frozen(version.plan.module(i)));
    absl::StrAppend(&forward, "    x = self.", names[i], ".forward(x)\n");
  }
  top.register_module(names.back(), *head);
  absl::StrAppend(&forward,
                  feature_stage >= 0
                      ? "    if x.dim() > 2:\n        x = torch.flatten(x, 2).mean(2)\n"
                      : "    x = torch.flatten(x, 1)\n",
                  "    return self.", names.back(), ".forward(x)\n");
  top.define(forward);
  top.eval();

  // The file must compute what Classify computes (the engine, on the
  // serving device, in the serving dtype).
  {
    const int64_t crop = backbone.preprocess().crop;
    torch::manual_seed(0);
    const at::Tensor probe = torch::randn({2, 3, crop, crop});
    std::vector<Engine::Work> work(2);
    for (int64_t i = 0; i < 2; ++i) {
      work[i].input = probe[i].clone();
      work[i].output = Engine::Output::kClassification;
      work[i].version = handle;
      work[i].priority = Engine::Priority::kTraining;  // behind serving
    }
    auto top_k = engine.Run(std::move(work));
    if (!top_k.ok()) return top_k.status();
    c10::InferenceMode guard;
    // The file keeps the raw logits; Classify divides them by the version's
    // temperature (tlserve.json has it).
    const at::Tensor mine =
        at::softmax(top.forward({probe}).toTensor() / version.calibration.temperature, 1);
    at::Tensor served = at::zeros_like(mine);
    for (int64_t i = 0; i < 2; ++i) {
      served[i].index_put_({(*top_k)[i].indices}, (*top_k)[i].values.to(at::kFloat));
    }
    const double diff = (mine - served).abs().max().item<double>();
    if (!mine.sizes().equals(served.sizes()) ||
        diff > (backbone.dtype() == "float32" ? 1e-4 : 5e-2)) {
      return absl::InternalError(absl::StrCat(
          "the exported module does not reproduce Classify (max |diff| of probabilities ", diff,
          "); this is a bug in tlserve's export"));
    }
  }

  torch::jit::ExtraFilesMap extra;
  extra["preprocess.json"] = backbone.preprocess().ToJson();
  extra["classes.json"] = nlohmann::json(version.classes).dump();
  // The model's name as its tenant knows it, and the tenant apart.
  const auto [tenant, model] = SplitTenantKey(version.model);
  extra["tlserve.json"] =
      nlohmann::json{{"name", model},
                     {"pretrained", true},
                     {"model", model},
                     {"tenant", tenant},
                     {"version", version.version},
                     {"backbone", backbone.name()},
                     {"backbone_sha256", backbone.sha256()},
                     // softmax(logits / temperature) is what Classify returns;
                     // below a class's threshold it answers "unknown", and
                     // always at a threshold of 1.
                     {"temperature", version.calibration.temperature},
                     {"thresholds", version.calibration.thresholds},
                     // The stage the head reads, pooled ("": the backbone's
                     // own embedding).
                     {"feature_layer", feature_stage >= 0 ? names[feature_stage] : ""}}
          .dump();
  top.save(path, extra);
  auto sha = FileSha256(path);
  if (!sha.ok()) return sha.status();
  std::error_code error;
  const auto size = std::filesystem::file_size(path, error);
  if (error) return absl::InternalError(absl::StrCat("cannot size ", path, ": ", error.message()));
  ExportedModel result;
  result.size = static_cast<int64_t>(size);
  result.sha256 = *sha;
  return result;
}

}  // namespace tlserve
