#include "server/core/embedder.h"

#include <ATen/ATen.h>

#include <atomic>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "server/core/contain.h"
#include "server/core/image_decoder.h"
#include "server/core/metrics.h"

namespace tlserve {
namespace {

absl::Status Annotate(const ImageInput& image, const absl::Status& s) {
  std::string where = absl::StrCat("images[", image.index, "]");
  if (!image.name.empty()) absl::StrAppend(&where, " (\"", image.name, "\")");
  return absl::Status(s.code(), absl::StrCat(where, ": ", s.message()));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Embedder>> Embedder::Create(Engine* engine, const Options& options) {
  if (options.max_image_pixels < 1 || options.max_request_pixels < 1) {
    return absl::InvalidArgumentError(
        "--max_image_pixels and --max_request_pixels must be positive");
  }
  if (options.preprocess_threads < 1) {
    return absl::InvalidArgumentError("--preprocess_threads must be at least 1");
  }
  return std::unique_ptr<Embedder>(new Embedder(engine, options));
}

Embedder::Embedder(Engine* engine, const Options& options)
    : engine_(engine),
      backbone_(&engine->backbone()),
      options_(options),
      pool_(
          std::make_unique<ThreadPool>(options.preprocess_threads, [] { at::set_num_threads(1); })),
      describe_lane_(std::make_unique<ThreadPool>(1, [] { at::set_num_threads(1); })) {}

Embedder::~Embedder() {
  describe_lane_.reset();
  pool_.reset();  // finishes preprocessing, which may still submit
}

absl::StatusOr<EmbedSpec> Embedder::MakeSpec(const std::string& layer, Pool pool,
                                             bool normalize) const {
  EmbedSpec spec;
  spec.pool = pool;
  spec.normalize = normalize;
  if (!layer.empty()) {
    auto stage = backbone_->EmbeddableStage(layer);
    if (!stage.ok()) return stage.status();
    spec.stage = *stage;
  }
  return spec;
}

absl::StatusOr<at::Tensor> Embedder::Prepare(const ImageInput& image) const {
  const auto& shape = image.shape;
  switch (image.kind) {
    case ImageInput::Kind::kEncoded: {
      return DecodeAndPreprocessUint8(image.data, backbone_->preprocess(),
                                      options_.max_image_pixels);
    }
    case ImageInput::Kind::kUint8Hwc: {
      if (shape.size() != 3 || shape[0] < 1 || shape[1] < 1 ||
          (shape[2] != 1 && shape[2] != 3 && shape[2] != 4)) {
        return absl::InvalidArgumentError("uint8 tensor shape must be HxWxC with C in {1, 3, 4}");
      }
      // Divided, not multiplied: a client's dimensions can overflow int64.
      if (shape[0] > options_.max_image_pixels / shape[1]) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor is ", shape[0], "x", shape[1], " pixels, over the limit of ",
                         options_.max_image_pixels, " (--max_image_pixels)"));
      }
      if (static_cast<int64_t>(image.data.size()) != shape[0] * shape[1] * shape[2]) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor data has ", image.data.size(), " bytes; shape ", shape[0], "x",
                         shape[1], "x", shape[2], " needs ", shape[0] * shape[1] * shape[2]));
      }
      at::Tensor hwc = at::empty({shape[0], shape[1], shape[2]}, at::kByte);
      std::memcpy(hwc.data_ptr(), image.data.data(), image.data.size());
      auto rgb = ToRgb(hwc);
      if (!rgb.ok()) return rgb.status();
      return PreprocessUint8(*rgb, backbone_->preprocess(), options_.max_image_pixels);
    }
    case ImageInput::Kind::kFloatChw: {
      if (shape.size() != 3 || shape[0] != 3 || shape[1] < 1 || shape[2] < 1) {
        return absl::InvalidArgumentError("float32 tensor shape must be 3xHxW");
      }
      if (shape[1] > options_.max_image_pixels / shape[2]) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor is ", shape[1], "x", shape[2], " pixels, over the limit of ",
                         options_.max_image_pixels, " (--max_image_pixels)"));
      }
      const int64_t want = shape[0] * shape[1] * shape[2] * 4;
      if (static_cast<int64_t>(image.data.size()) != want) {
        return absl::InvalidArgumentError(absl::StrCat("tensor data has ", image.data.size(),
                                                       " bytes; shape 3x", shape[1], "x", shape[2],
                                                       " of float32 needs ", want));
      }
      at::Tensor chw = at::empty({shape[0], shape[1], shape[2]}, at::kFloat);
      std::memcpy(chw.data_ptr(), image.data.data(), image.data.size());
      return chw;
    }
  }
  return absl::InternalError("unknown image kind");
}

void Embedder::Embed(std::shared_ptr<const std::vector<ImageInput>> images, const EmbedSpec& spec,
                     absl::Time deadline, std::function<bool()> cancelled, ImageDone done,
                     uint64_t caller) {
  Engine::Work work;
  work.output = Engine::Output::kEmbedding;
  work.spec = spec;
  work.deadline = deadline;
  work.cancelled = std::move(cancelled);
  Submit(std::move(images), work, std::move(done), caller);
}

void Embedder::Classify(std::shared_ptr<const std::vector<ImageInput>> images,
                        std::shared_ptr<const ServableVersion> version, int top_k,
                        absl::Time deadline, std::function<bool()> cancelled, ImageDone done,
                        uint64_t caller) {
  Engine::Work work;
  work.output = Engine::Output::kClassification;
  work.version = std::move(version);
  work.top_k = top_k;
  work.deadline = deadline;
  work.cancelled = std::move(cancelled);
  Submit(std::move(images), work, std::move(done), caller);
}

absl::Status Embedder::CheckRequestPixels(const std::vector<ImageInput>& images) const {
  int64_t total = 0;
  for (const ImageInput& image : images) {
    int64_t pixels = 0;
    if (image.kind == ImageInput::Kind::kEncoded) {
      // A header that cannot be read costs nothing: Prepare reports it.
      pixels = PeekImagePixels(image.data).value_or(0);
    } else if (image.shape.size() == 3) {
      const int64_t h = image.kind == ImageInput::Kind::kUint8Hwc ? image.shape[0] : image.shape[1];
      const int64_t w = image.kind == ImageInput::Kind::kUint8Hwc ? image.shape[1] : image.shape[2];
      // Invalid or oversized shapes fail alone in Prepare; no overflow here.
      pixels = h >= 1 && w >= 1 && h <= options_.max_image_pixels / w ? h * w : 0;
    }
    // An image over --max_image_pixels fails alone, from its header, before
    // it costs anything: it does not count against the request.
    if (pixels < 0 || pixels > options_.max_image_pixels) pixels = 0;
    total += pixels;
    if (total > options_.max_request_pixels) {
      return absl::InvalidArgumentError(absl::StrCat(
          "images: the request's images hold over ", options_.max_request_pixels,
          " pixels together (--max_request_pixels); send fewer or smaller images per request"));
    }
  }
  return absl::OkStatus();
}

void Embedder::Submit(std::shared_ptr<const std::vector<ImageInput>> images,
                      const Engine::Work& work, ImageDone done, uint64_t caller) {
  // Every image is prepared on the pool; they are queued together once all
  // are ready, so a request's images tend to share batches.
  struct Pending {
    std::shared_ptr<const std::vector<ImageInput>> images;
    std::vector<absl::StatusOr<at::Tensor>> inputs;
    std::atomic<size_t> remaining;
  };
  const size_t n = images->size();
  auto pending = std::make_shared<Pending>();
  pending->images = images;
  pending->inputs.resize(n);
  pending->remaining = n;
  auto submit = [this, pending, work, done, caller]() {
    std::vector<Engine::Work> tasks;
    std::vector<size_t> which;
    for (size_t i = 0; i < pending->inputs.size(); ++i) {
      const ImageInput& image = (*pending->images)[i];
      if (!pending->inputs[i].ok()) {
        done(i, Annotate(image, pending->inputs[i].status()));
        continue;
      }
      Engine::Work t = work;
      t.input = std::move(*pending->inputs[i]);
      t.lane = caller;
      t.done = [done, i, image](absl::StatusOr<EngineResult> r) {
        done(i, r.ok() ? std::move(r) : absl::StatusOr<EngineResult>(Annotate(image, r.status())));
      };
      tasks.push_back(std::move(t));
      which.push_back(i);
    }
    if (tasks.empty()) return;
    absl::Status queued = engine_->Submit(std::move(tasks));
    if (!queued.ok()) {
      for (size_t i : which) done(i, Annotate((*pending->images)[i], queued));
    }
  };
  if (n == 0) return;
  if (absl::Status s = CheckRequestPixels(*images); !s.ok()) {
    for (size_t i = 0; i < n; ++i) done(i, s);
    return;
  }
  const std::function<bool()>& cancelled = work.cancelled;
  for (size_t i = 0; i < n; ++i) {
    pool_->Schedule(caller, [this, pending, i, cancelled, submit]() {
      const ImageInput& image = (*pending->images)[i];
      if (cancelled && cancelled()) {
        pending->inputs[i] = absl::CancelledError("the request was cancelled");
      } else {
        pending->inputs[i] = Contain("preprocessing failed", [&] { return Prepare(image); });
      }
      if (pending->remaining.fetch_sub(1) == 1) submit();
    });
  }
}

void Embedder::Describe(std::vector<int64_t> input_chw,
                        std::function<void(absl::StatusOr<BackboneSummary>)> done) {
  if (describes_.fetch_add(1) >= kMaxDescribesQueued) {
    describes_.fetch_sub(1);
    done(absl::ResourceExhaustedError(
        absl::StrCat(kMaxDescribesQueued, " DescribeBackbone calls are already waiting; retry")));
    return;
  }
  describe_lane_->Schedule([this, input_chw = std::move(input_chw), done = std::move(done)]() {
    auto summary =
        Contain("DescribeBackbone failed", [&] { return backbone_->Describe(input_chw); });
    describes_.fetch_sub(1);
    done(std::move(summary));
  });
}

}  // namespace tlserve
