#include "server/api/export_reactor.h"

#include "absl/strings/str_cat.h"
#include "server/api/status_util.h"
#include "server/core/log.h"

namespace tlserve {
namespace {
constexpr size_t kChunkBytes = 1 << 20;
}  // namespace

ExportReactor::ExportReactor(const ModelRegistry* models, Metrics* metrics,
                             const v1::ExportModelRequest& req)
    : models_(models), timer_(metrics, "ExportModel") {
  if (req.version() < 0) {
    End(absl::InvalidArgumentError("version must be >= 0 (0: the served version)"));
    return;
  }
  auto version = models_->Servable(req.model(), req.version());
  if (!version.ok()) {
    End(version.status());
    return;
  }
  worker_ = std::thread([this, v = *version] { Build(v); });
}

void ExportReactor::Build(std::shared_ptr<const ServableVersion> version) {
  const absl::Time start = absl::Now();
  absl::StatusOr<ExportedModel> file;
  try {
    file = ExportModel(models_->backbone(), *version);
  } catch (const std::exception& e) {  // c10::Error, TorchScript's ErrorReport
    file = absl::InternalError(absl::StrCat("export failed: ", e.what()));
  }
  if (!file.ok()) return End(file.status());
  if (cancelled_) return End(absl::CancelledError("the client cancelled the export"));
  file_ = *std::move(file);
  LogInfo("exporting model %s v%d: %d bytes, sha256 %s, built in %.2f s", version->model,
          version->version, file_.bytes.size(), file_.sha256.substr(0, 12),
          absl::ToDoubleSeconds(absl::Now() - start));
  v1::ExportInfo* info = message_.mutable_info();
  info->set_model(version->model);
  info->set_version(version->version);
  info->set_size_bytes(static_cast<int64_t>(file_.bytes.size()));
  info->set_sha256(file_.sha256);
  for (const auto& c : version->classes) info->add_classes(c);
  info->set_crop(models_->backbone().preprocess().crop);
  StartWrite(&message_);
}

void ExportReactor::OnWriteDone(bool ok) {
  if (!ok) return End(absl::CancelledError("the client went away during the export"));
  if (offset_ >= file_.bytes.size()) return End(absl::OkStatus());
  WriteNext();
}

void ExportReactor::WriteNext() {
  const size_t n = std::min(kChunkBytes, file_.bytes.size() - offset_);
  message_.Clear();
  message_.set_chunk(file_.bytes.substr(offset_, n));
  offset_ += n;
  StartWrite(&message_);
}

void ExportReactor::End(const absl::Status& status) {
  timer_.Done(status);
  Finish(ToGrpcStatus(status));
}

void ExportReactor::OnDone() {
  if (worker_.joinable()) {
    // OnDone may run on the worker itself, right after its Finish.
    if (worker_.get_id() == std::this_thread::get_id()) {
      worker_.detach();
    } else {
      worker_.join();
    }
  }
  delete this;
}

}  // namespace tlserve
