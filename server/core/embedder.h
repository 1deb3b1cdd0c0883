// Turns images into vectors with the shared backbone: each image is decoded
// and preprocessed on a worker pool, then queued in the batcher, which runs
// one forward for many concurrent callers. The gRPC layer calls in and is
// called back; nothing here blocks a caller's thread.
//
// Thread-safe. The backbone must outlive the Embedder.
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
#include "server/core/batcher.h"
#include "server/core/models.h"
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
    Batcher::Options batching;
    int64_t max_image_pixels = 40'000'000;
    // The decoded pixels of one request (or stream message) together,
    // checked from the headers before anything is decoded.
    int64_t max_request_pixels = 256'000'000;
    int preprocess_threads = 2;
  };
  using ImageDone = std::function<void(size_t i, absl::StatusOr<at::Tensor> vector)>;

  static absl::StatusOr<std::unique_ptr<Embedder>> Create(const Backbone* backbone,
                                                          const Options& options, Metrics* metrics);
  ~Embedder();

  // INVALID_ARGUMENT for an unknown layer or the head.
  absl::StatusOr<EmbedSpec> MakeSpec(const std::string& layer, Pool pool, bool normalize) const;

  // Calls `done(i, ...)` exactly once for each images[i], from a worker
  // thread, with a float vector or a status whose message names the image's
  // index and name. A queue without room fails every image with
  // RESOURCE_EXHAUSTED; images over --max_request_pixels together fail with
  // INVALID_ARGUMENT before any is decoded. `cancelled` (may be empty) is
  // polled before work. `caller` is the caller's lane of the preprocessing
  // pool (e.g. a hash of its connection): callers take turns.
  void Embed(std::shared_ptr<const std::vector<ImageInput>> images, const EmbedSpec& spec,
             absl::Time deadline, std::function<bool()> cancelled, ImageDone done,
             uint64_t caller = 0);

  // Class probabilities (softmax of the version's head on the embedding),
  // batched like Embed; `done` as for Embed, with a vector of classes.size().
  void Classify(std::shared_ptr<const std::vector<ImageInput>> images,
                std::shared_ptr<const ServableVersion> version, absl::Time deadline,
                std::function<bool()> cancelled, ImageDone done, uint64_t caller = 0);

  // Backbone::Describe on a lane of its own (one thread, at most
  // kMaxDescribesQueued waiting: RESOURCE_EXHAUSTED beyond); `done` runs there.
  static constexpr int kMaxDescribesQueued = 4;
  void Describe(std::vector<int64_t> input_chw,
                std::function<void(absl::StatusOr<BackboneSummary>)> done);

  // Forwards of a full batch, so that the first request is not slow.
  void Warmup();

  const Backbone& backbone() const { return *backbone_; }

 private:
  Embedder(const Backbone* backbone, const Options& options);
  absl::StatusOr<at::Tensor> Prepare(const ImageInput& image) const;
  // Prepares every image on the pool, then queues them under `key`.
  void Submit(std::shared_ptr<const std::vector<ImageInput>> images, const std::string& key,
              Batcher::RunFn run, absl::Time deadline, std::function<bool()> cancelled,
              ImageDone done, uint64_t caller);
  // OK when the request's images hold at most max_request_pixels together.
  absl::Status CheckRequestPixels(const std::vector<ImageInput>& images) const;

  const Backbone* backbone_;
  const Options options_;
  std::unique_ptr<Batcher> batcher_;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<ThreadPool> describe_lane_;
  std::atomic<int> describes_ = 0;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_EMBEDDER_H_
