// The front of serving: each image of an Embed or Classify request is
// decoded and preprocessed (to uint8, resized and cropped) on a worker pool,
// then queued in the device engine, which batches every tenant's images
// together (server/core/engine/engine.h). The gRPC layer calls in and is
// called back; nothing here blocks a caller's thread.
//
// Thread-safe. The engine must outlive the Embedder.
#ifndef TLSERVE_SERVER_CORE_EMBEDDER_H_
#define TLSERVE_SERVER_CORE_EMBEDDER_H_

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/core/backbone.h"
#include "server/core/engine/engine.h"
#include "server/core/thread_pool.h"

namespace tlserve {

class Metrics;

// One image of a request. `data` is not owned: the caller keeps it alive
// until the image's callback has run.
struct ImageInput {
  enum class Kind { kEncoded, kUint8Hwc, kFloatChw };
  int64_t index = 0;  // position in the caller's request, for messages
  std::string name;   // the client's name for it, for messages
  Kind kind = Kind::kEncoded;
  absl::string_view data;
  std::vector<int64_t> shape;  // for raw tensors
};

class Embedder {
 public:
  struct Options {
    int64_t max_image_pixels = 40'000'000;
    // The decoded pixels of one request (or stream message) together,
    // checked from the headers before anything is decoded.
    int64_t max_request_pixels = 256'000'000;
    // Each worker runs with one intra-op thread: images are many, and the
    // engine's thread gets the cores for the forwards.
    int preprocess_threads = 2;
  };
  using ImageDone = std::function<void(size_t i, absl::StatusOr<EngineResult> result)>;

  static absl::StatusOr<std::unique_ptr<Embedder>> Create(Engine* engine, const Options& options);
  ~Embedder();

  // INVALID_ARGUMENT for an unknown layer or the head.
  absl::StatusOr<EmbedSpec> MakeSpec(const std::string& layer, Pool pool, bool normalize) const;

  // Calls `done(i, ...)` exactly once for each images[i], from the engine's
  // completion thread or a worker, with a float vector or a status whose message names the image's
  // index and name. A queue without room fails every image with
  // RESOURCE_EXHAUSTED; images over --max_request_pixels together fail with
  // INVALID_ARGUMENT before any is decoded. `cancelled` (may be empty) is
  // polled before work. `caller` is the caller's lane of the preprocessing
  // pool (e.g. a hash of its connection): callers take turns.
  void Embed(std::shared_ptr<const std::vector<ImageInput>> images, const EmbedSpec& spec,
             absl::Time deadline, std::function<bool()> cancelled, ImageDone done,
             uint64_t caller = 0);

  // The top_k classes (0: all) by probability (softmax of the version's
  // logits), highest first, batched like Embed; `done` as for Embed, with
  // the probabilities in `values` and class indices in `indices`.
  void Classify(std::shared_ptr<const std::vector<ImageInput>> images,
                std::shared_ptr<const ServableVersion> version, int top_k, absl::Time deadline,
                std::function<bool()> cancelled, ImageDone done, uint64_t caller = 0);

  // Backbone::Describe on a lane of its own (one thread, at most
  // kMaxDescribesQueued waiting: RESOURCE_EXHAUSTED beyond); `done` runs there.
  static constexpr int kMaxDescribesQueued = 4;
  void Describe(std::vector<int64_t> input_chw,
                std::function<void(absl::StatusOr<BackboneSummary>)> done);

  const Backbone& backbone() const { return *backbone_; }
  Engine& engine() const { return *engine_; }

 private:
  Embedder(Engine* engine, const Options& options);
  absl::StatusOr<at::Tensor> Prepare(const ImageInput& image) const;
  // Prepares every image on the pool, then queues them in the engine as
  // copies of `work` (its input, deadline, cancelled, done and lane set here).
  void Submit(std::shared_ptr<const std::vector<ImageInput>> images, const Engine::Work& work,
              ImageDone done, uint64_t caller);
  // OK when the request's images hold at most max_request_pixels together.
  absl::Status CheckRequestPixels(const std::vector<ImageInput>& images) const;

  Engine* engine_;
  const Backbone* backbone_;
  const Options options_;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<ThreadPool> describe_lane_;
  std::atomic<int> describes_ = 0;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_EMBEDDER_H_
