#include "server/api/dataset_service.h"

#include "absl/strings/str_cat.h"
#include "server/api/rpc_timer.h"
#include "server/api/status_util.h"

namespace tlserve {
namespace {

void ToProto(const DatasetInfo& info, v1::Dataset* out) {
  out->set_name(info.name);
  out->set_created_unix(info.created_unix);
  out->set_images(info.images);
  out->set_bytes(info.bytes);
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

void Finish(grpc::ServerUnaryReactor* reactor, const RpcTimer& timer, const absl::Status& s) {
  timer.Done(s);
  reactor->Finish(ToGrpcStatus(s));
}

// One upload: each message's examples are checked on the pool, and the next
// read starts only then, so a fast client cannot pile up unchecked images.
class UploadReactor final : public grpc::ServerReadReactor<v1::UploadDatasetRequest> {
 public:
  UploadReactor(grpc::CallbackServerContext* context, DatasetCatalog* catalog, ThreadPool* pool,
                Metrics* metrics, v1::UploadDatasetResponse* response)
      : context_(context),
        catalog_(catalog),
        pool_(pool),
        response_(response),
        metrics_(metrics),
        timer_(metrics, "UploadDataset") {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      pool_->Schedule([this] { Commit(); });
      return;
    }
    if (first_) {
      first_ = false;
      dataset_ = request_.dataset();
      strict_ = request_.strict();
      if (absl::Status s = DatasetCatalog::ValidateName(dataset_, "dataset"); !s.ok()) {
        Done(s);
        return;
      }
    }
    pool_->Schedule([this] {
      for (auto& e : *request_.mutable_examples()) {
        UploadExample ex{e.name(), e.label(), std::move(*e.mutable_encoded())};
        if (absl::Status s = catalog_->CheckExample(ex); !s.ok()) {
          rejected_.push_back({index_, ex.name, std::string(s.message())});
        } else {
          accepted_.push_back(std::move(ex));
        }
        ++index_;
      }
      request_.Clear();
      StartRead(&request_);
    });
  }

  void OnDone() override { delete this; }

 private:
  void Commit() {
    // A client that went away mid-upload did not finish it: store nothing.
    if (context_->IsCancelled()) {
      Done(absl::CancelledError("the upload was cancelled; nothing was stored"));
      return;
    }
    if (first_) {
      Done(absl::InvalidArgumentError("dataset: the upload sent no message"));
      return;
    }
    auto result = catalog_->Commit(dataset_, std::move(accepted_), std::move(rejected_), strict_);
    RefreshGauges(catalog_, metrics_);
    if (result.ok()) {
      ToProto(result->dataset, response_->mutable_dataset());
      response_->set_accepted(result->accepted);
      for (const auto& r : result->rejected) {
        v1::RejectedExample* out = response_->add_rejected();
        out->set_index(r.index);
        out->set_name(r.name);
        out->set_reason(r.reason);
      }
    }
    Done(result.status());
  }
  void Done(const absl::Status& s) {
    timer_.Done(s);
    Finish(ToGrpcStatus(s));
  }

  grpc::CallbackServerContext* context_;
  DatasetCatalog* catalog_;
  ThreadPool* pool_;
  v1::UploadDatasetResponse* response_;
  Metrics* metrics_;
  RpcTimer timer_;
  v1::UploadDatasetRequest request_;
  // Touched by one thread at a time: reads and checks alternate.
  bool first_ = true;
  std::string dataset_;
  bool strict_ = false;
  int64_t index_ = 0;
  std::vector<UploadExample> accepted_;
  std::vector<RejectedExample> rejected_;
};

}  // namespace

DatasetService::DatasetService(DatasetCatalog* catalog, ThreadPool* pool, Metrics* metrics)
    : catalog_(catalog), pool_(pool), metrics_(metrics) {
  RefreshGauges(catalog_, metrics_);
}

grpc::ServerReadReactor<v1::UploadDatasetRequest>* DatasetService::UploadDataset(
    grpc::CallbackServerContext* context, v1::UploadDatasetResponse* response) {
  return new UploadReactor(context, catalog_, pool_, metrics_, response);
}

grpc::ServerUnaryReactor* DatasetService::ListDatasets(grpc::CallbackServerContext* context,
                                                       const v1::ListDatasetsRequest*,
                                                       v1::ListDatasetsResponse* response) {
  RpcTimer timer(metrics_, "ListDatasets");
  auto list = catalog_->List();
  if (list.ok()) {
    for (const auto& d : *list) ToProto(d, response->add_datasets());
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  Finish(reactor, timer, list.status());
  return reactor;
}

grpc::ServerUnaryReactor* DatasetService::GetDataset(grpc::CallbackServerContext* context,
                                                     const v1::GetDatasetRequest* request,
                                                     v1::Dataset* response) {
  RpcTimer timer(metrics_, "GetDataset");
  auto info = catalog_->Get(request->name());
  if (info.ok()) ToProto(*info, response);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  Finish(reactor, timer, info.status());
  return reactor;
}

grpc::ServerUnaryReactor* DatasetService::DeleteDataset(grpc::CallbackServerContext* context,
                                                        const v1::DeleteDatasetRequest* request,
                                                        v1::DeleteDatasetResponse*) {
  RpcTimer timer(metrics_, "DeleteDataset");
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::Status s = catalog_->Delete(request->name());
  RefreshGauges(catalog_, metrics_);
  Finish(reactor, timer, s);
  return reactor;
}

}  // namespace tlserve
