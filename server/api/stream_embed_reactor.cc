#include "server/api/stream_embed_reactor.h"

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "server/api/convert.h"

namespace tlserve {

StreamEmbedReactor::StreamEmbedReactor(grpc::CallbackServerContext* context, Embedder* embedder,
                                       Security* security, int max_images_per_message)
    : ImageStreamReactor(context, security, "StreamEmbed", max_images_per_message),
      embedder_(embedder) {
  StartReading();
}

absl::Status StreamEmbedReactor::Begin(const v1::StreamEmbedRequest& first) {
  const auto& o = first.options();
  auto spec = embedder_->MakeSpec(o.layer(), FromProto(o.pool()), o.normalize());
  if (!spec.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("options.layer: ", spec.status().message()));
  }
  spec_ = *spec;
  return absl::OkStatus();
}

void StreamEmbedReactor::Start(Slot* slot, int64_t first_index) {
  const auto& images = slot->request->images();
  for (int i = 0; i < images.size(); ++i) {
    v1::EmbedResult* r = slot->response.add_results();
    r->set_index(first_index + i);
    r->set_name(images[i].name());
  }
  auto done = [this, slot](size_t i, absl::StatusOr<EngineResult> v) {
    v1::EmbedResult* r = slot->response.mutable_results(static_cast<int>(i));
    if (v.ok()) {
      const float* p = v->values.data_ptr<float>();
      r->mutable_embedding()->mutable_values()->Add(p, p + v->values.size(0));
    } else {
      r->mutable_error()->set_code(static_cast<int>(v.status().code()));
      r->mutable_error()->set_message(std::string(v.status().message()));
    }
    ImageDone(slot);
  };
  auto inputs = ToImageInputs(images, first_index);
  if (!inputs.ok()) {  // an image without data: every image of the message reports it
    for (int i = 0; i < images.size(); ++i) done(static_cast<size_t>(i), inputs.status());
    return;
  }
  embedder_->Embed(
      *inputs, *spec_, absl::FromChrono(context()->deadline()), [this] { return Cancelled(); },
      done, caller().lane);
}

}  // namespace tlserve
