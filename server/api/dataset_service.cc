#include "server/api/dataset_service.h"

#include <algorithm>
#include <atomic>
#include <memory>

#include "absl/strings/str_cat.h"
#include "server/api/contained_call.h"
#include "server/api/rpc_timer.h"
#include "server/api/status_util.h"
#include "server/core/catalog/tenant_key.h"
#include "server/core/contain.h"

namespace tlserve {
namespace {

void ToProto(const DatasetInfo& info, const Caller& caller, v1::Dataset* out) {
  out->set_name(caller.Name(info.name));
  out->set_tenant(TenantOf(info.name));
  out->set_created_unix(info.created_unix);
  out->set_images(info.images);
  out->set_bytes(info.bytes);
  out->set_unlabelled(info.unlabelled);
  for (const auto& [label, count] : info.class_counts) {
    v1::ClassCount* c = out->add_classes();
    c->set_label(label);
    c->set_count(count);
  }
}

void RefreshGauges(DatasetCatalog* catalog, Metrics* metrics) {
  auto list = catalog->List();
  if (!list.ok()) return;
  double images = 0;
  for (const auto& d : *list) images += static_cast<double>(d.images);
  metrics->SetDatasets(static_cast<double>(list->size()), images);
}

// One upload: each message's examples are checked and staged on the pool,
// and the next read starts only then, so a fast client cannot pile up
// unchecked images; memory is one message plus one staging chunk.
class UploadReactor final : public grpc::ServerReadReactor<v1::UploadDatasetRequest> {
 public:
  UploadReactor(grpc::CallbackServerContext* context, DatasetCatalog* catalog, ThreadPool* pool,
                Security* security, v1::UploadDatasetResponse* response,
                std::shared_ptr<std::atomic<int>> in_flight, int max_in_flight)
      : context_(context),
        catalog_(catalog),
        pool_(pool),
        response_(response),
        security_(security),
        metrics_(security->metrics()),
        timer_(security->metrics(), "UploadDataset"),
        in_flight_(std::move(in_flight)) {
    const int uploads = in_flight_->fetch_add(1);  // OnDone takes it back
    auto caller = security_->Admit(*context, &timer_);
    if (!caller.ok()) {
      Done(caller.status());
      return;
    }
    caller_ = *caller;
    if (uploads >= max_in_flight) {
      Done(absl::ResourceExhaustedError(
          absl::StrCat("too many uploads in progress (", max_in_flight,
                       ", --max_concurrent_uploads); retry when one has finished")));
      return;
    }
    // With tenants, one holds at most half the upload slots.
    auto slot = security_->AdmitSlot(caller_, "uploads", std::max(1, max_in_flight / 2));
    if (!slot.ok()) {
      Done(slot.status());
      return;
    }
    tenant_slot_ = std::move(*slot);
    // Initial metadata now tells the client that its upload holds a slot
    // (a client may wait for it before sending a large first message).
    StartSendInitialMetadata();
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      // The stream ended before a message with `commit`: a client that went
      // away, a cut connection, or a message that could not be parsed. The
      // staged examples are dropped with the upload.
      pool_->Schedule(caller_.lane, [this] {
        upload_.reset();
        Done(context_->IsCancelled()
                 ? absl::CancelledError("the upload was cancelled; nothing was stored")
                 : absl::AbortedError(
                       "the upload ended without its final message (commit = true), or sent a "
                       "message the server could not parse (e.g. a name or label that is not "
                       "UTF-8); nothing was stored"));
      });
      return;
    }
    pool_->Schedule(caller_.lane, [this] {
      absl::Status s = Contain("upload failed", [this] { return Process(); });
      if (!s.ok()) {
        upload_.reset();
        Done(s);
      }
    });
  }

  void OnDone() override {
    in_flight_->fetch_sub(1);
    delete this;
  }

 private:
  // One message, on the pool: checks and stages its examples, then reads
  // the next or, after `commit`, commits. OK: the call goes on (or is done).
  absl::Status Process() {
    if (upload_ == nullptr) {
      security_->AttachAudit(&timer_, caller_, request_.dataset());
      auto key = caller_.Qualify(request_.dataset(), "dataset");
      if (!key.ok()) return key.status();
      key_ = *key;
      tenant_ = TenantOf(key_);
      // The tenant's use before this upload: each message is checked
      // against it (fail early), the commit again (authoritative).
      auto use = security_->Usage(tenant_);
      if (!use.ok()) return use.status();
      use_ = *use;
      new_dataset_ = !catalog_->Get(key_).ok();
      auto upload = catalog_->BeginUpload(key_, request_.strict());
      if (!upload.ok()) return upload.status();
      upload_ = std::move(*upload);
    }
    // Over a quota already with this message's examples (from their count
    // and encoded sizes): refused before any of them is decoded.
    int64_t message_bytes = 0;
    for (const auto& e : request_.examples()) message_bytes += e.encoded().size();
    if (absl::Status s = CheckQuotas(use_, new_dataset_, request_.examples_size(), message_bytes);
        !s.ok()) {
      return s;
    }
    for (auto& e : *request_.mutable_examples()) {
      UploadExample ex{std::move(*e.mutable_name()), std::move(*e.mutable_label()),
                       std::move(*e.mutable_encoded())};
      if (absl::Status s = upload_->Add(std::move(ex)); !s.ok()) return s;
    }
    if (absl::Status s = CheckQuotas(use_, new_dataset_); !s.ok()) return s;
    const bool commit = request_.commit();
    request_.Clear();
    if (!commit) {
      StartRead(&request_);
      return absl::OkStatus();
    }
    absl::StatusOr<UploadResult> result;
    {
      absl::MutexLock lock(security_->QuotaLock(tenant_));
      auto use = security_->Usage(tenant_);
      if (!use.ok()) return use.status();
      if (absl::Status s = CheckQuotas(*use, !catalog_->Get(key_).ok()); !s.ok()) return s;
      result = upload_->Commit();
    }
    upload_.reset();
    RefreshGauges(catalog_, metrics_);
    if (!result.ok()) return result.status();
    ToProto(result->dataset, caller_, response_->mutable_dataset());
    response_->set_accepted(result->accepted);
    response_->set_rejected_total(result->rejected_total);
    for (const auto& r : result->rejected) {
      v1::RejectedExample* out = response_->add_rejected();
      out->set_index(r.index);
      out->set_name(r.name);
      out->set_reason(r.reason);
    }
    Done(absl::OkStatus());
    return absl::OkStatus();
  }
  // The tenant's dataset, image and storage quotas with this upload's
  // accepted examples (and `more`) on top of `use`; `new_dataset`: the
  // upload makes the dataset (per message: as found at its start; at the
  // commit: as found then).
  absl::Status CheckQuotas(const TenantUsage& use, bool new_dataset, int64_t more_images = 0,
                           int64_t more_bytes = 0) const {
    const QuotaLimits q = security_->QuotasOf(tenant_);
    if (new_dataset) {
      if (absl::Status s = Security::CheckQuota(tenant_, "datasets", use.datasets, 1, q.datasets);
          !s.ok()) {
        return s;
      }
    }
    const int64_t images = (upload_ ? upload_->accepted() : 0) + more_images;
    const int64_t bytes = (upload_ ? upload_->accepted_bytes() : 0) + more_bytes;
    if (absl::Status s = Security::CheckQuota(tenant_, "images", use.images, images, q.images);
        !s.ok()) {
      return s;
    }
    return Security::CheckQuota(tenant_, "storage_mb", use.storage_bytes, bytes, q.storage_bytes,
                                " bytes");
  }
  void Done(const absl::Status& s) {
    const absl::Status scrubbed = caller_.Scrub(s);
    timer_.Done(scrubbed);
    Finish(ToGrpcStatus(scrubbed));
  }

  grpc::CallbackServerContext* context_;
  DatasetCatalog* catalog_;
  ThreadPool* pool_;
  v1::UploadDatasetResponse* response_;
  Security* security_;
  Metrics* metrics_;
  Caller caller_;
  std::string key_, tenant_;
  bool new_dataset_ = false;
  std::shared_ptr<const void> tenant_slot_;  // Security::AdmitSlot
  TenantUsage use_;
  RpcTimer timer_;
  std::shared_ptr<std::atomic<int>> in_flight_;
  v1::UploadDatasetRequest request_;
  // Touched by one thread at a time: reads and checks alternate.
  std::unique_ptr<DatasetUpload> upload_;
};

}  // namespace

DatasetService::DatasetService(DatasetCatalog* catalog, ThreadPool* pool, Security* security,
                               int max_concurrent_uploads)
    : catalog_(catalog),
      pool_(pool),
      security_(security),
      metrics_(security->metrics()),
      max_concurrent_uploads_(max_concurrent_uploads) {
  RefreshGauges(catalog_, metrics_);
}

grpc::ServerReadReactor<v1::UploadDatasetRequest>* DatasetService::UploadDataset(
    grpc::CallbackServerContext* context, v1::UploadDatasetResponse* response) {
  return new UploadReactor(context, catalog_, pool_, security_, response, uploads_in_flight_,
                           max_concurrent_uploads_);
}

grpc::ServerUnaryReactor* DatasetService::ListDatasets(grpc::CallbackServerContext* context,
                                                       const v1::ListDatasetsRequest*,
                                                       v1::ListDatasetsResponse* response) {
  // The catalog reads the database: on a worker, not the gRPC thread.
  return ContainedOnWorker(context, security_, "ListDatasets", "", pool_,
                           [this, response](const Caller& caller) -> absl::Status {
                             auto list = catalog_->List();
                             if (!list.ok()) return list.status();
                             for (const auto& d : *list) {
                               if (caller.Sees(d.name)) {
                                 ToProto(d, caller, response->add_datasets());
                               }
                             }
                             return absl::OkStatus();
                           });
}

grpc::ServerUnaryReactor* DatasetService::GetDataset(grpc::CallbackServerContext* context,
                                                     const v1::GetDatasetRequest* request,
                                                     v1::Dataset* response) {
  return ContainedOnWorker(context, security_, "GetDataset", request->name(), pool_,
                           [this, request, response](const Caller& caller) -> absl::Status {
                             auto key = caller.Qualify(request->name(), "name");
                             if (!key.ok()) return key.status();
                             auto info = catalog_->Get(*key);
                             if (info.ok()) ToProto(*info, caller, response);
                             return info.status();
                           });
}

grpc::ServerUnaryReactor* DatasetService::DeleteDataset(grpc::CallbackServerContext* context,
                                                        const v1::DeleteDatasetRequest* request,
                                                        v1::DeleteDatasetResponse*) {
  // Deleting frees a dataset's images: on a worker, not the gRPC thread.
  return ContainedOnWorker(context, security_, "DeleteDataset", request->name(), pool_,
                           [this, request](const Caller& caller) -> absl::Status {
                             auto key = caller.Qualify(request->name(), "name");
                             if (!key.ok()) return key.status();
                             absl::Status s = catalog_->Delete(*key);
                             RefreshGauges(catalog_, metrics_);
                             return s;
                           });
}

}  // namespace tlserve
