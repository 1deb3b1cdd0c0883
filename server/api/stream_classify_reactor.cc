#include "server/api/stream_classify_reactor.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "server/api/caller_lane.h"
#include "server/api/convert.h"

namespace tlserve {

void TopK(const ServableVersion& version, const at::Tensor& probabilities, int k,
          v1::Classification* out) {
  const float* prob = probabilities.data_ptr<float>();
  std::vector<int> order(version.classes.size());
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [prob](int a, int b) { return prob[a] > prob[b]; });
  for (int j = 0; j < k; ++j) {
    v1::Prediction* p = out->add_top();
    p->set_label(version.classes[order[j]]);
    p->set_probability(prob[order[j]]);
  }
}

StreamClassifyReactor::StreamClassifyReactor(grpc::CallbackServerContext* context,
                                             ModelRegistry* models, Embedder* embedder,
                                             Metrics* metrics, int max_images_per_message)
    : ImageStreamReactor(context, metrics, "StreamClassify", max_images_per_message),
      models_(models),
      embedder_(embedder) {
  StartReading();
}

absl::Status StreamClassifyReactor::Begin(const v1::StreamClassifyRequest& first) {
  if (first.top_k() < 0) return absl::InvalidArgumentError("top_k must be >= 0");
  auto version = models_->Servable(first.model(), first.version());
  if (!version.ok()) return version.status();
  version_ = *version;
  top_k_ = std::min<int>(first.top_k() == 0 ? 5 : first.top_k(),
                         static_cast<int>(version_->classes.size()));
  return absl::OkStatus();
}

void StreamClassifyReactor::Start(Slot* slot, int64_t first_index) {
  const auto& images = slot->request->images();
  slot->response.set_version(version_->version);
  for (int i = 0; i < images.size(); ++i) {
    v1::ClassifyResult* r = slot->response.add_results();
    r->set_index(first_index + i);
    r->set_name(images[i].name());
  }
  auto done = [this, slot](size_t i, absl::StatusOr<at::Tensor> p) {
    v1::ClassifyResult* r = slot->response.mutable_results(static_cast<int>(i));
    if (p.ok()) {
      TopK(*version_, *p, top_k_, r->mutable_classification());
    } else {
      r->mutable_error()->set_code(static_cast<int>(p.status().code()));
      r->mutable_error()->set_message(std::string(p.status().message()));
    }
    ImageDone(slot);
  };
  auto inputs = ToImageInputs(images, first_index);
  if (!inputs.ok()) {
    for (int i = 0; i < images.size(); ++i) done(static_cast<size_t>(i), inputs.status());
    return;
  }
  embedder_->Classify(
      *inputs, version_, absl::FromChrono(context()->deadline()), [this] { return Cancelled(); },
      done, CallerLane(*context()));
}

}  // namespace tlserve
