// The pretrained network every request shares: a TorchScript module loaded
// once, frozen (requires_grad=false, eval mode) and never modified. Its
// stages are its top-level children in order; the last one is the original
// classifier head, dropped for embeddings.
//
// Thread-safe after Load: every method is const and TorchScript's forward is
// reentrant. Errors: INVALID_ARGUMENT for a file or input that cannot be
// used, with the reason.
#ifndef TLSERVE_SERVER_CORE_BACKBONE_H_
#define TLSERVE_SERVER_CORE_BACKBONE_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/core/preprocess.h"

namespace torch::jit {
struct Module;
}  // namespace torch::jit

namespace tlserve {

struct BackboneOptions {
  std::string path;
  std::string device = "auto";     // auto | cpu | cuda | cuda:N
  std::string precision = "fp32";  // fp32 | bf16 | fp16 (reduced only on CUDA)
  int threads = 0;                 // LibTorch intra-op threads; 0 keeps LibTorch's
};

struct StageInfo {
  std::string name;
  std::string type;
  std::vector<int64_t> output_shape;  // one image, no batch dimension
  int64_t params = 0;
  int64_t trainable = 0;
  bool head = false;
};

struct BackboneSummary {
  std::vector<int64_t> input_shape;  // C×H×W
  std::vector<StageInfo> stages;
  int64_t total_params = 0;
  int64_t trainable_params = 0;
};

enum class Pool { kAvg, kMax };

// What to compute for an image: the output of `stage` (by default the last
// stage before the head, flattened), pooled over space, optionally L2-normed.
struct EmbedSpec {
  int stage = -1;  // -1: the embedding
  Pool pool = Pool::kAvg;
  bool normalize = false;
};

// A stage's output N×… (any device) as the embedding `spec` asks for:
// flattened (the default stage) or pooled over space, optionally L2-normed,
// in float32.
at::Tensor PoolEmbedding(const at::Tensor& stage_output, const EmbedSpec& spec);

class Backbone {
 public:
  static constexpr int64_t kMaxDescribePixels = 1024 * 1024;

  // Loads, freezes and verifies the module: on a probe input, running the
  // stages in order (flattening before the head) must equal its forward.
  static absl::StatusOr<std::unique_ptr<Backbone>> Load(const BackboneOptions& options);
  ~Backbone();
  Backbone(const Backbone&) = delete;
  Backbone& operator=(const Backbone&) = delete;

  const std::string& name() const { return name_; }
  const std::string& file_name() const { return file_name_; }
  const std::string& sha256() const { return sha256_; }
  bool pretrained() const { return pretrained_; }
  const std::string& device() const { return device_; }
  const std::string& dtype() const { return dtype_; }
  const PreprocessSpec& preprocess() const { return preprocess_; }
  int64_t embedding_dim() const { return embedding_dim_; }
  // Stage names in order, the head last.
  const std::vector<std::string>& stage_names() const { return stage_names_; }

  // The index of a stage usable for embeddings; INVALID_ARGUMENT for the
  // head or an unknown name, listing the valid ones.
  absl::StatusOr<int> EmbeddableStage(const std::string& name) const;

  // Output shapes for one input of `input_chw` (empty: 3×crop×crop), at most
  // kMaxDescribePixels: a real forward of one image (LibTorch 1.13 cannot
  // run convolutions on the meta device from C++), once per size; answers
  // are cached. Embedder::Describe runs it on a lane of its own.
  absl::StatusOr<BackboneSummary> Describe(std::vector<int64_t> input_chw) const;
  // The width of stage `stage`'s output pooled over space (its channels):
  // what a head reading that stage takes. Measured once, at load.
  absl::StatusOr<int64_t> PooledDim(int stage) const;

  // float32 N×3×H×W on the CPU -> float32 N×D on the CPU, on the calling
  // thread: the reference (load-time checks, tests); serving and training
  // go through the device engine.
  at::Tensor Embed(const at::Tensor& batch, const EmbedSpec& spec) const;

  // The pieces models compose with their private stages. Stage indices are
  // into stage_names(); the head is the last.
  int head_index() const { return static_cast<int>(stage_names_.size()) - 1; }
  // A float batch (on any device) on the backbone's device, dtype and memory
  // format.
  at::Tensor ToDevice(const at::Tensor& cpu_batch) const;
  c10::Device torch_device() const;
  at::ScalarType scalar_type() const;
  bool channels_last() const;
  // A copy of `module` (a private stage) on the backbone's device, in its
  // memory format, in its dtype or (`float32`: training's master weights)
  // in float32; made under NoGradGuard, so its parameters are leaves.
  torch::jit::Module OnDevice(const torch::jit::Module& module, bool float32) const;
  // Runs the shared stages first..last on a device tensor (flattening before
  // the head). The caller chooses the autograd mode.
  at::Tensor Forward(at::Tensor x, int first, int last) const;
  // The shared stage itself (frozen, eval mode); callers must not modify it.
  const torch::jit::Module& stage(int i) const;
  // A private copy of stage i for one model (copy-on-write): made under
  // NoGradGuard so its parameters are leaves, then set trainable.
  torch::jit::Module CloneStage(int i) const;

 private:
  struct Impl;
  explicit Backbone(std::unique_ptr<Impl> impl);
  at::Tensor RunStages(at::Tensor x, int last_stage) const;
  absl::StatusOr<BackboneSummary> Summarize(const std::vector<int64_t>& input_chw) const;

  std::unique_ptr<Impl> impl_;
  std::string name_, file_name_, sha256_, device_, dtype_;
  bool pretrained_ = true;
  PreprocessSpec preprocess_;
  int64_t embedding_dim_ = 0;
  std::vector<int64_t> pooled_dims_;  // by stage, the head excluded
  std::vector<std::string> stage_names_;
  mutable absl::Mutex cache_mu_;
  mutable std::map<std::vector<int64_t>, BackboneSummary> summaries_ ABSL_GUARDED_BY(cache_mu_);
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_BACKBONE_H_
