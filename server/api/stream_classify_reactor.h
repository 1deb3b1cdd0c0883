// One StreamClassify call (see ImageStreamReactor): the first message names
// the model; the version it resolves to serves the whole stream. A version
// that must be read from disk is read on the registry's loader thread; the
// messages that arrive meanwhile wait for it.
#ifndef TLSERVE_SERVER_API_STREAM_CLASSIFY_REACTOR_H_
#define TLSERVE_SERVER_API_STREAM_CLASSIFY_REACTOR_H_

#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "server/api/image_stream_reactor.h"
#include "server/core/embedder.h"
#include "server/core/models.h"
#include "tlserve/v1/models.grpc.pb.h"

namespace tlserve {

class StreamClassifyReactor final
    : public ImageStreamReactor<v1::StreamClassifyRequest, v1::StreamClassifyResponse> {
 public:
  StreamClassifyReactor(grpc::CallbackServerContext* context, ModelRegistry* models,
                        Embedder* embedder, Security* security, int max_images_per_message);

 private:
  absl::Status Begin(const v1::StreamClassifyRequest& first) override;
  void Start(Slot* slot, int64_t first_index) override;
  // The version is known: classify the slot's images.
  void Run(Slot* slot, int64_t first_index);
  void Resolved(absl::StatusOr<std::shared_ptr<const ServableVersion>> version);

  ModelRegistry* const models_;
  Embedder* const embedder_;
  int requested_top_k_ = 0;
  absl::Mutex mu_;
  // Set once the version is resolved (by Begin, or later by the loader).
  std::shared_ptr<const ServableVersion> version_ ABSL_GUARDED_BY(mu_);
  int top_k_ ABSL_GUARDED_BY(mu_) = 5;
  absl::Status failed_ ABSL_GUARDED_BY(mu_);
  bool in_begin_ ABSL_GUARDED_BY(mu_) = false;
  // Messages that arrived before the version was read.
  std::vector<std::pair<Slot*, int64_t>> waiting_ ABSL_GUARDED_BY(mu_);
};

// The top classes of one image, from the engine's result, into `out`.
void TopK(const ServableVersion& version, const EngineResult& top, v1::Classification* out);

// Whether Classify answers "unknown" for an image whose most probable class
// is `best` with probability `p` (below the version's threshold for it, or
// at a threshold of 1).
bool AnswersUnknown(const ServableVersion& version, float p, int64_t best);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_STREAM_CLASSIFY_REACTOR_H_
