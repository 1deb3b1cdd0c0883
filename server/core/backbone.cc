#include "server/core/backbone.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "server/core/contain.h"
#include "server/core/log.h"
#include "server/core/sha256.h"

namespace tlserve {

struct Backbone::Impl {
  torch::jit::Module module;
  std::vector<torch::jit::Module> stages;
  torch::Device device{torch::kCPU};
  torch::ScalarType dtype = torch::kFloat;
  bool channels_last = false;
};

namespace {

absl::StatusOr<torch::Device> ParseDevice(const std::string& device) {
  if (device == "auto") {
    return torch::cuda::is_available() ? torch::Device(torch::kCUDA, 0)
                                       : torch::Device(torch::kCPU);
  }
  if (device != "cpu" && device.rfind("cuda", 0) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--device=", device, " is not one of auto, cpu, cuda, cuda:N"));
  }
  try {
    torch::Device parsed(device);
    if (parsed.is_cuda()) {
      const int count = static_cast<int>(torch::cuda::device_count());
      const int index = parsed.has_index() ? parsed.index() : 0;
      if (index >= count) {
        return absl::InvalidArgumentError(
            absl::StrCat("--device=", device, ": this machine has ", count, " CUDA device(s)"));
      }
      return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
    }
    return parsed;
  } catch (const c10::Error&) {
    return absl::InvalidArgumentError(absl::StrCat("--device=", device, " cannot be parsed"));
  }
}

absl::StatusOr<torch::ScalarType> ParsePrecision(const std::string& precision,
                                                 const torch::Device& device) {
  torch::ScalarType type;
  if (precision == "fp32") {
    type = torch::kFloat;
  } else if (precision == "bf16") {
    type = torch::kBFloat16;
  } else if (precision == "fp16") {
    type = torch::kHalf;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--precision=", precision, " is not one of fp32, bf16, fp16"));
  }
  if (type != torch::kFloat && !device.is_cuda()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--precision=", precision, " needs a CUDA device; on the CPU use --precision=fp32"));
  }
  return type;
}

std::string TypeName(const torch::jit::Module& m) {
  auto name = m.type()->name();
  return name ? name->name() : "Module";
}

int64_t CountParams(const torch::jit::Module& m, bool trainable_only) {
  int64_t n = 0;
  for (const auto& p : m.parameters(/*recurse=*/true)) {
    if (!trainable_only || p.requires_grad()) n += p.numel();
  }
  return n;
}

std::string DtypeName(torch::ScalarType t) {
  switch (t) {
    case torch::kBFloat16:
      return "bfloat16";
    case torch::kHalf:
      return "float16";
    default:
      return "float32";
  }
}

}  // namespace

Backbone::Backbone(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Backbone::~Backbone() = default;

absl::StatusOr<std::unique_ptr<Backbone>> Backbone::Load(const BackboneOptions& options) {
  const absl::Time start = absl::Now();
  if (options.threads > 0) {
    // Thread pools are sized once, here: LibTorch's (this thread's; the
    // engine, preprocessing workers and jobs set their own) and OpenBLAS's,
    // which LibTorch's CPU matrix products use and which is process-wide.
    at::set_num_threads(options.threads);
    using SetThreads = void (*)(int);
    if (auto set = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) {
      set(options.threads);
    }
  }
  auto device = ParseDevice(options.device);
  if (!device.ok()) return device.status();
  auto dtype = ParsePrecision(options.precision, *device);
  if (!dtype.ok()) return dtype.status();
  auto sha = FileSha256(options.path);
  if (!sha.ok()) return sha.status();

  auto impl = std::make_unique<Impl>();
  impl->device = *device;
  impl->dtype = *dtype;
  torch::jit::ExtraFilesMap extra{{"preprocess.json", ""}, {"tlserve.json", ""}};
  try {
    impl->module = torch::jit::load(options.path, impl->device, extra);
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(absl::StrCat("cannot load backbone ", options.path,
                                                   " as TorchScript (save it with "
                                                   "torch.jit.script(model).save(path)): ",
                                                   e.msg()));
  }
  std::unique_ptr<Backbone> b(new Backbone(std::move(impl)));
  Impl& m = *b->impl_;
  b->sha256_ = *sha;
  b->file_name_ = options.path.substr(options.path.find_last_of('/') + 1);
  b->name_ = b->file_name_.substr(0, b->file_name_.find_last_of('.'));
  b->device_ = m.device.str();
  b->dtype_ = DtypeName(m.dtype);
  if (!extra["preprocess.json"].empty()) {
    auto spec = ParsePreprocessSpec(extra["preprocess.json"]);
    if (!spec.ok()) return spec.status();
    b->preprocess_ = *spec;
  }
  if (!extra["tlserve.json"].empty()) {
    const auto info = nlohmann::json::parse(extra["tlserve.json"], nullptr, false);
    if (info.is_object()) {
      b->name_ = info.value("name", b->name_);
      b->pretrained_ = info.value("pretrained", true);
    }
  }

  for (const auto& p : m.module.parameters()) p.set_requires_grad(false);
  m.module.eval();
  m.module.to(m.device, m.dtype);
  if (m.device.is_cuda() && m.dtype == torch::kFloat) {
    // fp32 means fp32: LibTorch lets cuDNN use TF32 (10-bit mantissas) by
    // default, which put served embeddings 1e-3 off PyTorch's on the GPU
    // machine (measured, gpu-check 2026-11-28). --precision=bf16 is the fast
    // choice.
    at::globalContext().setAllowTF32CuDNN(false);
    at::globalContext().setFloat32MatmulPrecision("highest");
  }
  if (m.device.is_cuda()) {
    // Convolutions on CUDA are fastest with channels_last, fp32 included (a
    // ResNet-50 on an H100: 7,486 vs 6,219 img/s in fp32).
    m.channels_last = true;
    for (const auto& p : m.module.parameters()) {
      if (p.dim() == 4) p.set_data(p.contiguous(torch::MemoryFormat::ChannelsLast));
    }
  }
  for (const auto& child : m.module.named_children()) {
    b->stage_names_.push_back(child.name);
    m.stages.push_back(child.value);
  }

  if (m.stages.size() < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "backbone ", options.path, " has ", m.stages.size(),
        " top-level child module(s); tlserve needs a network whose children, run in order, "
        "make its forward, the last being the classifier head (e.g. torchvision's ResNet)"));
  }

  // Probe: the staged run must be the module's own forward, or the stages do
  // not describe the network and embeddings from them would be wrong.
  torch::NoGradGuard no_grad;
  const int64_t crop = b->preprocess_.crop;
  auto probe = torch::randn({1, 3, crop, crop}, torch::TensorOptions().dtype(torch::kFloat));
  torch::Tensor full, staged;
  try {
    c10::InferenceMode guard;
    auto out = m.module.forward({probe.to(m.device, m.dtype)});
    if (!out.isTensor()) {
      return absl::InvalidArgumentError(
          absl::StrCat("backbone ", options.path,
                       "'s forward does not return a tensor; tlserve needs a "
                       "classifier whose forward returns logits"));
    }
    full = out.toTensor().to(torch::kCPU, torch::kFloat);
    staged = b->RunStages(probe, static_cast<int>(m.stages.size()) - 1);
    b->embedding_dim_ = b->Embed(probe, EmbedSpec{}).size(1);
    // Each stage's width once pooled (its channels): what a head on it takes.
    torch::Tensor x = b->ToDevice(probe);
    for (int i = 0; i + 1 < static_cast<int>(m.stages.size()); ++i) {
      x = b->Forward(x, i, i);
      b->pooled_dims_.push_back(x.dim() >= 2 ? x.size(1) : 0);
    }
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        "backbone ", options.path, " cannot run its stages in order on a 1x3x", crop, "x", crop,
        " input: ", e.msg(),
        ". tlserve needs a network whose top-level children, run in order "
        "with a flatten before the last (the head), make its forward (e.g. torchvision's ResNet)"));
  }
  const double scale = std::max(1.0, full.abs().max().item<double>());
  const double tol = (m.dtype == torch::kFloat ? 1e-4 : 5e-2) * scale;
  if (!full.sizes().equals(staged.sizes()) || (full - staged).abs().max().item<double>() > tol) {
    return absl::InvalidArgumentError(absl::StrCat(
        "backbone ", options.path, ": running its top-level children in order (",
        absl::StrJoin(b->stage_names_, ", "),
        ") with a flatten before the last does not reproduce its forward; its forward does more "
        "than chain its children. tlserve supports networks shaped like torchvision's ResNet"));
  }
  LogInfo(
      "loaded backbone %s (%s, sha256 %s) on %s as %s: %d stages, embedding dim %d, %s, "
      "load and verification took %.2f s",
      b->name_, options.path, b->sha256_.substr(0, 12), b->device_, b->dtype_, m.stages.size(),
      b->embedding_dim_, b->pretrained_ ? "pretrained weights" : "RANDOM WEIGHTS (not pretrained)",
      absl::ToDoubleSeconds(absl::Now() - start));
  return b;
}

absl::StatusOr<int> Backbone::EmbeddableStage(const std::string& name) const {
  const int head = static_cast<int>(stage_names_.size()) - 1;
  for (int i = 0; i < head; ++i) {
    if (stage_names_[i] == name) return i;
  }
  std::vector<std::string> valid(stage_names_.begin(), stage_names_.end() - 1);
  return absl::InvalidArgumentError(
      absl::StrCat("layer \"", Bounded(name), "\" ",
                   name == stage_names_.back() ? "is the dropped head" : "is unknown",
                   "; choose one of: ", absl::StrJoin(valid, ", ")));
}

torch::Tensor Backbone::ToDevice(const torch::Tensor& cpu_batch) const {
  torch::Tensor x = cpu_batch.to(impl_->device, impl_->dtype);
  return impl_->channels_last ? x.contiguous(torch::MemoryFormat::ChannelsLast) : x;
}

torch::Tensor Backbone::Forward(torch::Tensor x, int first, int last) const {
  const Impl& m = *impl_;
  for (int i = first; i <= last; ++i) {
    if (i == head_index()) x = x.flatten(1);
    // forward() of a non-const module; the module itself is not modified.
    x = const_cast<torch::jit::Module&>(m.stages[i]).forward({x}).toTensor();
  }
  return x;
}

const torch::jit::Module& Backbone::stage(int i) const { return impl_->stages[i]; }

c10::Device Backbone::torch_device() const { return impl_->device; }
at::ScalarType Backbone::scalar_type() const { return impl_->dtype; }
bool Backbone::channels_last() const { return impl_->channels_last; }

torch::jit::Module Backbone::OnDevice(const torch::jit::Module& module, bool float32) const {
  torch::NoGradGuard no_grad;
  torch::jit::Module copy = module.clone();
  copy.to(impl_->device, float32 ? torch::kFloat : impl_->dtype);
  if (impl_->channels_last) {
    for (const auto& p : copy.parameters()) {
      if (p.dim() == 4) p.set_data(p.contiguous(torch::MemoryFormat::ChannelsLast));
    }
  }
  return copy;
}

torch::jit::Module Backbone::CloneStage(int i) const {
  torch::NoGradGuard no_grad;
  torch::jit::Module copy = impl_->stages[i].clone();
  for (const auto& p : copy.parameters()) p.set_requires_grad(true);
  return copy;
}

torch::Tensor Backbone::RunStages(torch::Tensor x, int last_stage) const {
  return Forward(ToDevice(x), 0, last_stage).to(torch::kCPU, torch::kFloat);
}

torch::Tensor PoolEmbedding(const torch::Tensor& stage_output, const EmbedSpec& spec) {
  torch::Tensor x = stage_output.to(torch::kFloat);
  if (x.dim() > 2) {
    x = spec.stage < 0            ? x.flatten(1)
        : spec.pool == Pool::kMax ? x.flatten(2).amax(2)
                                  : x.flatten(2).mean(2);
  }
  if (spec.normalize) x = x / x.norm(2, 1, /*keepdim=*/true).clamp_min(1e-12);
  return x.contiguous();
}

torch::Tensor Backbone::Embed(const torch::Tensor& batch, const EmbedSpec& spec) const {
  c10::InferenceMode guard;
  const int last = spec.stage < 0 ? static_cast<int>(impl_->stages.size()) - 2 : spec.stage;
  return PoolEmbedding(RunStages(batch, last), spec);
}

absl::StatusOr<int64_t> Backbone::PooledDim(int stage) const {
  if (stage < 0 || stage >= static_cast<int>(pooled_dims_.size()) || pooled_dims_[stage] < 1) {
    return absl::InvalidArgumentError(absl::StrCat("no stage ", stage, " to pool"));
  }
  return pooled_dims_[stage];
}

absl::StatusOr<BackboneSummary> Backbone::Describe(std::vector<int64_t> input_chw) const {
  const int64_t crop = preprocess_.crop;
  if (input_chw.empty()) input_chw = {3, crop, crop};
  if (input_chw.size() != 3 || input_chw[0] != 3 || input_chw[1] < 1 || input_chw[2] < 1 ||
      input_chw[1] > kMaxDescribePixels || input_chw[2] > kMaxDescribePixels ||
      input_chw[1] * input_chw[2] > kMaxDescribePixels) {
    return absl::InvalidArgumentError(
        absl::StrCat("input_shape must be 3xHxW with H, W >= 1 and H*W <= ", kMaxDescribePixels,
                     " (1024x1024): the shapes are computed with a real forward of one image"));
  }
  {
    absl::MutexLock lock(&cache_mu_);
    if (auto it = summaries_.find(input_chw); it != summaries_.end()) return it->second;
  }
  auto summary = Summarize(input_chw);
  if (summary.ok()) {
    absl::MutexLock lock(&cache_mu_);
    if (summaries_.size() >= 16) summaries_.clear();  // bounded: a few sizes are asked for
    summaries_[input_chw] = *summary;
  }
  return summary;
}

absl::StatusOr<BackboneSummary> Backbone::Summarize(const std::vector<int64_t>& input_chw) const {
  BackboneSummary summary;
  summary.input_shape = input_chw;
  const Impl& m = *impl_;
  c10::InferenceMode guard;
  torch::Tensor x =
      torch::zeros({1, input_chw[0], input_chw[1], input_chw[2]}).to(m.device, m.dtype);
  const int head = static_cast<int>(m.stages.size()) - 1;
  for (int i = 0; i <= head; ++i) {
    StageInfo s;
    s.name = stage_names_[i];
    s.type = TypeName(m.stages[i]);
    s.head = i == head;
    s.params = CountParams(m.stages[i], false);
    s.trainable = CountParams(m.stages[i], true);
    try {
      if (s.head) x = x.flatten(1);
      x = const_cast<torch::jit::Module&>(m.stages[i]).forward({x}).toTensor();
    } catch (const c10::Error& e) {
      return absl::InvalidArgumentError(absl::StrCat("input ", input_chw[1], "x", input_chw[2],
                                                     " is too small for stage ", s.name, ": ",
                                                     e.msg().substr(0, e.msg().find('\n'))));
    }
    s.output_shape.assign(x.sizes().begin() + 1, x.sizes().end());
    summary.stages.push_back(std::move(s));
  }
  summary.total_params = CountParams(m.module, false);
  summary.trainable_params = CountParams(m.module, true);
  return summary;
}

}  // namespace tlserve
