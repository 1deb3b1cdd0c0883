#include "server/api/stream_embed_reactor.h"

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "server/api/convert.h"
#include "server/api/status_util.h"

namespace tlserve {

StreamEmbedReactor::StreamEmbedReactor(grpc::CallbackServerContext* context, Embedder* embedder,
                                       Metrics* metrics, int max_images_per_message)
    : context_(context),
      embedder_(embedder),
      metrics_(metrics),
      max_images_per_message_(max_images_per_message),
      timer_(metrics, "StreamEmbed") {
  {
    absl::MutexLock lock(&mu_);
    read_pending_ = true;
  }
  StartNextRead();
}

void StreamEmbedReactor::StartNextRead() {
  reading_ = std::make_shared<v1::StreamEmbedRequest>();
  StartRead(reading_.get());
}

void StreamEmbedReactor::OnReadDone(bool ok) {
  absl::Status dispatched;
  if (ok) dispatched = Dispatch(std::move(reading_));
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    read_pending_ = false;
    if (!ok) reads_done_ = true;
    if (!dispatched.ok() && error_.ok()) error_ = dispatched;
    actions = NextActionsLocked();
  }
  Run(actions);
}

absl::Status StreamEmbedReactor::Dispatch(std::shared_ptr<v1::StreamEmbedRequest> request) {
  if (!spec_.has_value()) {
    const auto& o = request->options();
    auto spec = embedder_->MakeSpec(o.layer(), FromProto(o.pool()), o.normalize());
    if (!spec.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("options.layer: ", spec.status().message()));
    }
    spec_ = *spec;
  }
  const int n = request->images_size();
  if (n == 0) return absl::OkStatus();
  if (n > max_images_per_message_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a StreamEmbed message has ", n, " images, over the limit of ", max_images_per_message_,
        " per message (--max_images_per_request); send smaller messages"));
  }
  metrics_->AddImages("StreamEmbed", n);
  const int64_t first = next_index_;
  next_index_ += n;
  auto slot = std::make_unique<Slot>();
  Slot* s = slot.get();
  s->request = request;
  s->remaining = static_cast<size_t>(n);
  for (int i = 0; i < n; ++i) {
    v1::EmbedResult* r = s->response.add_results();
    r->set_index(first + i);
    r->set_name(request->images(i).name());
  }
  auto inputs = ToImageInputs(request->images(), first);
  {
    absl::MutexLock lock(&mu_);
    slots_.push_back(std::move(slot));
  }
  if (!inputs.ok()) {
    // An image without data: every image of the message reports it.
    for (int i = 0; i < n; ++i) OnImage(s, static_cast<size_t>(i), inputs.status());
    return absl::OkStatus();
  }
  embedder_->Embed(
      *inputs, *spec_, absl::FromChrono(context_->deadline()),
      [this] { return context_->IsCancelled(); },
      [this, s](size_t i, absl::StatusOr<at::Tensor> v) { OnImage(s, i, std::move(v)); });
  return absl::OkStatus();
}

void StreamEmbedReactor::OnImage(Slot* slot, size_t i, absl::StatusOr<at::Tensor> v) {
  v1::EmbedResult* r = slot->response.mutable_results(static_cast<int>(i));
  if (v.ok()) {
    const float* p = v->data_ptr<float>();
    r->mutable_embedding()->mutable_values()->Add(p, p + v->size(0));
  } else {
    r->mutable_error()->set_code(static_cast<int>(v.status().code()));
    r->mutable_error()->set_message(std::string(v.status().message()));
  }
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    if (v.ok()) slot->response.set_dim(v->size(0));
    if (--slot->remaining > 0) return;
    actions = NextActionsLocked();
  }
  Run(actions);
}

StreamEmbedReactor::Actions StreamEmbedReactor::NextActionsLocked() {
  Actions a;
  if (finished_) return a;
  if (!writing_ && !slots_.empty() && slots_.front()->remaining == 0 && error_.ok() &&
      !context_->IsCancelled()) {
    writing_ = true;
    a.write = &slots_.front()->response;
  }
  // Drop results nobody can receive any more.
  if (!writing_ && (!error_.ok() || context_->IsCancelled())) {
    while (!slots_.empty() && slots_.front()->remaining == 0) slots_.pop_front();
  }
  const bool stop_reading = reads_done_ || !error_.ok() || context_->IsCancelled();
  if (!stop_reading && !read_pending_ && slots_.size() < kWindow) {
    read_pending_ = true;
    a.read = true;
  }
  if (stop_reading && slots_.empty() && !writing_) {
    finished_ = true;
    a.finish =
        context_->IsCancelled() ? absl::CancelledError("the client cancelled the stream") : error_;
  }
  return a;
}

void StreamEmbedReactor::Run(const Actions& a) {
  if (a.write != nullptr) StartWrite(a.write);
  if (a.read) StartNextRead();
  if (a.finish.has_value()) {
    timer_.Done(*a.finish);
    Finish(ToGrpcStatus(*a.finish));
  }
}

void StreamEmbedReactor::OnWriteDone(bool ok) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    slots_.pop_front();
    if (!ok && error_.ok()) error_ = absl::CancelledError("the client stopped receiving");
    actions = NextActionsLocked();
  }
  Run(actions);
}

void StreamEmbedReactor::OnCancel() {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    actions = NextActionsLocked();
  }
  Run(actions);
}

void StreamEmbedReactor::OnDone() { delete this; }

}  // namespace tlserve
