#include "server/api/export_reactor.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/api/status_util.h"
#include "server/core/contain.h"
#include "server/core/log.h"

namespace tlserve {
namespace {
constexpr int64_t kChunkBytes = 1 << 20;
}  // namespace

ExportReactor::ExportReactor(grpc::CallbackServerContext* context, ModelRegistry* models,
                             Engine* engine, Security* security, const v1::ExportModelRequest& req,
                             const ExportOptions& options,
                             std::shared_ptr<std::atomic<int>> in_flight)
    : models_(models),
      engine_(engine),
      options_(options),
      in_flight_(std::move(in_flight)),
      timer_(security->metrics(), "ExportModel") {
  const int exports = in_flight_->fetch_add(1);  // OnDone takes it back
  auto caller = security->Admit(*context, &timer_, req.model());
  if (!caller.ok()) {
    End(caller.status());
    return;
  }
  caller_ = *caller;
  auto key = caller_.Qualify(req.model(), "model");
  if (!key.ok()) {
    End(key.status());
    return;
  }
  if (exports >= options_.max_concurrent) {
    End(absl::ResourceExhaustedError(
        absl::StrCat(options_.max_concurrent,
                     " exports are in progress (--max_concurrent_exports); retry when one ends")));
    return;
  }
  // With tenants, one holds at most half the export slots.
  auto slot = security->AdmitSlot(caller_, "exports", std::max(1, options_.max_concurrent / 2));
  if (!slot.ok()) {
    End(slot.status());
    return;
  }
  tenant_slot_ = std::move(*slot);
  // Contained: an exception here must still finish the call and free the slot.
  const absl::Status started = Contain("export failed", [&]() -> absl::Status {
    if (req.version() < 0) {
      return absl::InvalidArgumentError("version must be >= 0 (0: the served version)");
    }
    // The version is looked up (and read, when not loaded) on the export's
    // own thread, not the gRPC one.
    worker_ = std::thread([this, model = *key, number = req.version()] {
      auto version = Contain("export failed", [&] { return models_->ServableNow(model, number); });
      if (!version.ok()) return End(version.status());
      Build(*version);
    });
    return absl::OkStatus();
  });
  if (!started.ok()) End(started);
}

void ExportReactor::Build(std::shared_ptr<const ServableVersion> version) {
  // The whole build is contained: this thread has no other boundary.
  const absl::Status built =
      Contain("export failed", [&]() -> absl::Status { return BuildFile(version); });
  if (!built.ok()) return End(built);
  StartWrite(&message_);
}

absl::Status ExportReactor::BuildFile(const std::shared_ptr<const ServableVersion>& handle) {
  const ServableVersion& version = *handle;
  const absl::Time start = absl::Now();
  if (options_.disk != nullptr) {
    // The file holds every weight of the network once, in float32.
    int64_t bytes = int64_t{1} << 20;
    bytes += version.plan.bytes();
    auto summary = models_->backbone().Describe({});
    if (summary.ok()) bytes += summary->total_params * 4;
    if (absl::Status s = options_.disk->Check(bytes, "the export", DiskBudget::Into::kFile);
        !s.ok()) {
      return s;
    }
  }
  std::random_device rd;
  const std::string path =
      absl::StrFormat("%s/%s-v%d-%08x.pt", options_.dir, version.model, version.version, rd());
  absl::StatusOr<ExportedModel> file = ExportModel(*engine_, handle, path);
  if (file.ok()) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) {
      file = absl::InternalError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
    }
  }
  ::unlink(path.c_str());  // open or not, the name goes now: nothing is left behind
  if (!file.ok()) return file.status();
  if (cancelled_) return absl::CancelledError("the client cancelled the export");
  size_ = file->size;
  LogInfo("exporting model %s v%d: %d bytes, sha256 %s, built in %.2f s", version.model,
          version.version, size_, file->sha256.substr(0, 12),
          absl::ToDoubleSeconds(absl::Now() - start));
  v1::ExportInfo* info = message_.mutable_info();
  info->set_model(caller_.Name(version.model));
  info->set_version(version.version);
  info->set_size_bytes(size_);
  info->set_sha256(file->sha256);
  for (const auto& c : version.classes) info->add_classes(c);
  info->set_crop(models_->backbone().preprocess().crop);
  return absl::OkStatus();
}

void ExportReactor::OnWriteDone(bool ok) {
  if (!ok) return End(absl::CancelledError("the client went away during the export"));
  if (offset_ >= size_) return End(absl::OkStatus());
  const absl::Status read = Contain("export failed", [&] { return ReadNextChunk(); });
  if (!read.ok()) return End(read);
  StartWrite(&message_);
}

absl::Status ExportReactor::ReadNextChunk() {
  const int64_t n = std::min(kChunkBytes, size_ - offset_);
  message_.Clear();
  std::string* chunk = message_.mutable_chunk();
  chunk->resize(static_cast<size_t>(n));
  int64_t got = 0;
  while (got < n) {
    const ssize_t r =
        ::pread(fd_, chunk->data() + got, static_cast<size_t>(n - got), offset_ + got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      return absl::InternalError(absl::StrCat("cannot read the export back: ",
                                              r < 0 ? std::strerror(errno) : "end of file"));
    }
    got += r;
  }
  offset_ += n;
  return absl::OkStatus();
}

void ExportReactor::End(const absl::Status& status) {
  const absl::Status scrubbed = caller_.Scrub(status);
  timer_.Done(scrubbed);
  Finish(ToGrpcStatus(scrubbed));
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
  if (fd_ >= 0) ::close(fd_);
  in_flight_->fetch_sub(1);
  delete this;
}

}  // namespace tlserve
