#include "server/api/stream_classify_reactor.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "server/api/convert.h"
#include "server/core/training/evaluation.h"

namespace tlserve {

void TopK(const ServableVersion& version, const EngineResult& top, v1::Classification* out) {
  // Chosen on the device (highest first); only the top k came back.
  const at::Tensor p = top.values.to(at::kFloat).contiguous();
  const at::Tensor c = top.indices.to(at::kLong).contiguous();
  const float* prob = p.data_ptr<float>();
  const int64_t* cls = c.data_ptr<int64_t>();
  for (int64_t j = 0; j < p.size(0); ++j) {
    v1::Prediction* pred = out->add_top();
    pred->set_label(version.classes[cls[j]]);
    pred->set_probability(prob[j]);
  }
  if (p.size(0) == 0) return;
  const bool unknown = AnswersUnknown(version, prob[0], cls[0]);
  out->set_unknown(unknown);
  out->set_label(unknown ? "unknown" : version.classes[cls[0]]);
}

bool AnswersUnknown(const ServableVersion& version, float p, int64_t best) {
  const std::vector<float>& thresholds = version.calibration.thresholds;
  return !thresholds.empty() && AnswersUnknown(p, thresholds[best]);
}

StreamClassifyReactor::StreamClassifyReactor(grpc::CallbackServerContext* context,
                                             ModelRegistry* models, Embedder* embedder,
                                             Security* security, int max_images_per_message)
    : ImageStreamReactor(context, security, "StreamClassify", max_images_per_message),
      models_(models),
      embedder_(embedder) {
  StartReading();
}

absl::Status StreamClassifyReactor::Begin(const v1::StreamClassifyRequest& first) {
  if (first.top_k() < 0) return absl::InvalidArgumentError("top_k must be >= 0");
  auto key = caller().Qualify(first.model(), "model");
  if (!key.ok()) return key.status();
  requested_top_k_ = first.top_k();
  {
    absl::MutexLock lock(&mu_);
    in_begin_ = true;
  }
  // Resolved now when loaded, else later on the loader thread: the stream
  // does not end before (Hold).
  Hold();
  models_->Servable(*key, first.version(),
                    [this](absl::StatusOr<std::shared_ptr<const ServableVersion>> version) {
                      Resolved(std::move(version));
                      Release();
                    });
  absl::MutexLock lock(&mu_);
  in_begin_ = false;
  return failed_;  // known already: the stream ends with it now
}

void StreamClassifyReactor::Resolved(
    absl::StatusOr<std::shared_ptr<const ServableVersion>> version) {
  std::vector<std::pair<Slot*, int64_t>> waiting;
  {
    absl::MutexLock lock(&mu_);
    if (version.ok()) {
      version_ = *version;
      top_k_ = std::min<int>(requested_top_k_ == 0 ? 5 : requested_top_k_,
                             static_cast<int>(version_->classes.size()));
    } else {
      failed_ = version.status();
      if (in_begin_) return;  // Begin returns it
    }
    waiting.swap(waiting_);
  }
  if (!version.ok()) {
    Fail(version.status());
    for (auto& [slot, first] : waiting) {
      for (int i = 0; i < slot->request->images_size(); ++i) ImageDone(slot);
    }
    return;
  }
  for (auto& [slot, first] : waiting) Run(slot, first);
}

void StreamClassifyReactor::Start(Slot* slot, int64_t first_index) {
  absl::Status error;
  {
    absl::MutexLock lock(&mu_);
    if (!version_ && failed_.ok()) {  // still being read
      waiting_.emplace_back(slot, first_index);
      return;
    }
    error = failed_;
  }
  if (!error.ok()) {
    // The stream ends with the error once this message is done.
    Fail(error);
    for (int i = 0; i < slot->request->images_size(); ++i) ImageDone(slot);
    return;
  }
  Run(slot, first_index);
}

void StreamClassifyReactor::Run(Slot* slot, int64_t first_index) {
  std::shared_ptr<const ServableVersion> version;
  int top_k;
  {
    absl::MutexLock lock(&mu_);
    version = version_;
    top_k = top_k_;
  }
  const auto& images = slot->request->images();
  slot->response.set_version(version->version);
  for (int i = 0; i < images.size(); ++i) {
    v1::ClassifyResult* r = slot->response.add_results();
    r->set_index(first_index + i);
    r->set_name(images[i].name());
  }
  auto done = [this, slot, version](size_t i, absl::StatusOr<EngineResult> p) {
    v1::ClassifyResult* r = slot->response.mutable_results(static_cast<int>(i));
    if (p.ok()) {
      TopK(*version, *p, r->mutable_classification());
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
      *inputs, version, top_k, absl::FromChrono(context()->deadline()),
      [this] { return Cancelled(); }, done, caller().lane);
}

}  // namespace tlserve
