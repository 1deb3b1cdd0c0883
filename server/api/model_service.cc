#include "server/api/model_service.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "server/api/contained_call.h"
#include "server/api/convert.h"
#include "server/api/export_reactor.h"
#include "server/api/rpc_timer.h"
#include "server/api/status_util.h"
#include "server/api/stream_classify_reactor.h"
#include "server/api/unary_image_call.h"
#include "server/core/catalog/tenant_key.h"
#include "server/core/contain.h"
#include "server/core/head.h"

namespace tlserve {

void ToProto(const ModelInfo& m, const Caller& caller, v1::Model* out) {
  out->set_name(caller.Name(m.name));
  out->set_tenant(TenantOf(m.name));
  for (const auto& c : m.classes) out->add_classes(c);
  for (int h : m.head.hidden) out->mutable_head()->add_hidden(h);
  out->mutable_head()->set_dropout(m.head.dropout);
  out->set_head_params(m.head_params);
  out->set_served_version(m.served_version);
  out->set_training(m.training);
  if (!m.problem.ok()) out->set_problem(m.problem.ToString());
  for (const auto& st : m.stages) {
    v1::ModelStage* ps = out->add_stages();
    ps->set_name(st.name);
    ps->set_private_(st.is_private);
    ps->set_trainable(st.trainable);
    ps->set_params(st.params);
  }
  for (const auto& v : m.versions) {
    v1::ModelVersion* pv = out->add_versions();
    pv->set_version(v.version);
    pv->set_created_unix(v.created_unix);
    pv->set_job_id(v.job_id);
    pv->set_train_accuracy(v.train_accuracy);
    pv->set_validation_accuracy(v.validation.accuracy);
    for (size_t c = 0; c < v.validation.precision.size() && c < m.classes.size(); ++c) {
      v1::ClassMetrics* cm = pv->add_classes();
      cm->set_label(m.classes[c]);
      cm->set_precision(v.validation.precision[c]);
      cm->set_recall(v.validation.recall[c]);
      cm->set_support(v.validation.support[c]);
      const double p = v.validation.precision[c], r = v.validation.recall[c];
      cm->set_f1(p + r > 0 ? 2 * p * r / (p + r) : 0);
    }
    for (int64_t x : v.validation.confusion) pv->add_confusion(x);
    pv->set_temperature(v.calibration.temperature);
    for (float t : v.calibration.thresholds) pv->add_thresholds(t);
    pv->set_validation_ece_uncalibrated(v.validation_ece_uncalibrated);
    pv->set_validation_ece(v.validation_ece);
    const HeadSpec& head = v.head ? *v.head : m.head;
    for (int h : head.hidden) pv->mutable_head()->add_hidden(h);
    pv->mutable_head()->set_dropout(head.dropout);
    pv->set_feature_layer(v.feature_layer);
    pv->set_head_params(v.head_params);
  }
}

grpc::ServerUnaryReactor* ModelService::CreateModel(grpc::CallbackServerContext* c,
                                                    const v1::CreateModelRequest* req,
                                                    v1::Model* resp) {
  return ContainedOnWorker(
      c, security_, "CreateModel", req->name(), work_,
      [this, req, resp](const Caller& caller) -> absl::Status {
        auto key = caller.Qualify(req->name(), "name");
        if (!key.ok()) return key.status();
        std::vector<std::string> classes(req->classes().begin(), req->classes().end());
        if (!req->dataset().empty()) {
          if (!classes.empty()) {
            return absl::InvalidArgumentError("give classes or dataset, not both");
          }
          auto dataset = caller.Qualify(req->dataset(), "dataset");
          if (!dataset.ok()) return dataset.status();
          auto d = datasets_->Get(*dataset);
          if (!d.ok()) return d.status();
          for (const auto& [label, n] : d->class_counts) classes.push_back(label);
        }
        HeadSpec head{{req->head().hidden().begin(), req->head().hidden().end()},
                      req->head().dropout()};
        const std::string tenant = TenantOf(*key);
        absl::MutexLock quota(security_->QuotaLock(tenant));
        auto use = security_->Usage(tenant);
        if (!use.ok()) return use.status();
        const QuotaLimits quotas = security_->QuotasOf(tenant);
        if (absl::Status s = Security::CheckQuota(tenant, "models", use->models, 1, quotas.models);
            !s.ok()) {
          return s;
        }
        // The head's parameters take device memory like a private stage's.
        const int64_t head_params = HeadParams(head, models_->backbone().embedding_dim(),
                                               static_cast<int64_t>(classes.size()));
        if (absl::Status s =
                Security::CheckQuota(tenant, "private_params", use->private_params, head_params,
                                     quotas.private_params, " parameters");
            !s.ok()) {
          return s;
        }
        auto m = models_->Create(*key, std::move(classes), head);
        if (m.ok()) ToProto(*m, caller, resp);
        metrics_->SetModels(models_->size());
        return m.status();
      });
}

grpc::ServerUnaryReactor* ModelService::GetModel(grpc::CallbackServerContext* c,
                                                 const v1::GetModelRequest* req, v1::Model* resp) {
  return ContainedUnary(c, security_, "GetModel", req->name(),
                        [&](const Caller& caller) -> absl::Status {
                          auto key = caller.Qualify(req->name(), "name");
                          if (!key.ok()) return key.status();
                          auto m = models_->Get(*key);
                          if (m.ok()) ToProto(*m, caller, resp);
                          return m.status();
                        });
}

grpc::ServerUnaryReactor* ModelService::ListModels(grpc::CallbackServerContext* c,
                                                   const v1::ListModelsRequest*,
                                                   v1::ListModelsResponse* resp) {
  return ContainedUnary(c, security_, "ListModels", "", [&](const Caller& caller) -> absl::Status {
    for (const auto& m : models_->List()) {
      if (caller.Sees(m.name)) ToProto(m, caller, resp->add_models());
    }
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ModelService::DeleteModel(grpc::CallbackServerContext* c,
                                                    const v1::DeleteModelRequest* req,
                                                    v1::DeleteModelResponse*) {
  return ContainedOnWorker(c, security_, "DeleteModel", req->name(), work_,
                           [this, req](const Caller& caller) -> absl::Status {
                             auto key = caller.Qualify(req->name(), "name");
                             if (!key.ok()) return key.status();
                             absl::Status s = models_->Delete(*key);
                             if (s.ok()) metrics_->RemoveModel(*key);
                             metrics_->SetModels(models_->size());
                             return s;
                           });
}

namespace {

absl::StatusOr<std::vector<std::string>> StageList(
    const ModelRegistry& models, const google::protobuf::RepeatedPtrField<std::string>& stages,
    const std::string& from) {
  std::vector<std::string> out(stages.begin(), stages.end());
  if (!from.empty()) {
    auto more = models.StagesFrom(from);
    if (!more.ok()) return more.status();
    out.insert(out.end(), more->begin(), more->end());
  }
  return out;
}

}  // namespace

grpc::ServerUnaryReactor* ModelService::UnfreezeLayers(grpc::CallbackServerContext* c,
                                                       const v1::UnfreezeLayersRequest* req,
                                                       v1::Model* resp) {
  return ContainedOnWorker(
      c, security_, "UnfreezeLayers", req->model(), work_,
      [this, req, resp](const Caller& caller) -> absl::Status {
        auto key = caller.Qualify(req->model(), "model");
        if (!key.ok()) return key.status();
        auto stages = StageList(*models_, req->stages(), req->from());
        if (!stages.ok()) return stages.status();
        // The private copies' parameters count against the tenant's quota
        // (they take device memory); stages already private cost nothing.
        const std::string tenant = TenantOf(*key);
        absl::MutexLock quota(security_->QuotaLock(tenant));
        auto before = models_->Get(*key);
        if (!before.ok()) return before.status();
        int64_t more = 0;
        for (const auto& st : before->stages) {
          if (!st.is_private && std::count(stages->begin(), stages->end(), st.name) > 0) {
            more += st.params;
          }
        }
        auto use = security_->Usage(tenant);
        if (!use.ok()) return use.status();
        if (absl::Status s =
                Security::CheckQuota(tenant, "private_params", use->private_params, more,
                                     security_->QuotasOf(tenant).private_params, " parameters");
            !s.ok()) {
          return s;
        }
        auto m = models_->Unfreeze(*key, *stages);
        if (m.ok()) ToProto(*m, caller, resp);
        return m.status();
      });
}

grpc::ServerUnaryReactor* ModelService::FreezeLayers(grpc::CallbackServerContext* c,
                                                     const v1::FreezeLayersRequest* req,
                                                     v1::Model* resp) {
  return ContainedOnWorker(c, security_, "FreezeLayers", req->model(), work_,
                           [this, req, resp](const Caller& caller) -> absl::Status {
                             auto key = caller.Qualify(req->model(), "model");
                             if (!key.ok()) return key.status();
                             auto stages = StageList(*models_, req->stages(), req->from());
                             if (!stages.ok()) return stages.status();
                             auto m = models_->Freeze(*key, *stages, req->drop_private());
                             if (m.ok()) ToProto(*m, caller, resp);
                             return m.status();
                           });
}

grpc::ServerUnaryReactor* ModelService::Classify(grpc::CallbackServerContext* c,
                                                 const v1::ClassifyRequest* req,
                                                 v1::ClassifyResponse* resp) {
  return ContainedAsyncUnary(
      c, security_, "Classify", req->model(),
      [&](grpc::ServerUnaryReactor* reactor, const RpcTimer& held_timer,
          const Caller& caller) -> absl::Status {
        metrics_->AddImages("Classify", req->images_size());
        if (req->images_size() == 0) {
          return absl::InvalidArgumentError("images: the request has no images");
        }
        if (req->images_size() > limits_.max_images_per_request) {
          return absl::InvalidArgumentError(
              absl::StrCat("images: ", req->images_size(), " images, over the limit of ",
                           limits_.max_images_per_request, " (--max_images_per_request)"));
        }
        if (req->top_k() < 0) return absl::InvalidArgumentError("top_k must be >= 0");
        auto key = caller.Qualify(req->model(), "model");
        if (!key.ok()) return key.status();
        auto inputs = ToImageInputs(req->images(), 0);
        if (!inputs.ok()) return inputs.status();
        // The tenant's in-flight images, until the last image's callback goes.
        auto lease = security_->AdmitImages(caller, req->images_size());
        if (!lease.ok()) return lease.status();
        RpcTimer t = held_timer;
        t.Hold(*lease);
        // The served version is at hand; an older one not loaded yet is read
        // on the registry's loader thread, and the call goes on from there.
        models_->Servable(
            *key, req->version(),
            [this, c, req, resp, reactor, timer = t, caller,
             inputs = *inputs](absl::StatusOr<std::shared_ptr<const ServableVersion>> version) {
              ContainedContinuation(
                  reactor, timer, caller, "Classify failed", [&]() -> absl::Status {
                    if (!version.ok()) return version.status();
                    auto v = *version;
                    const int k = std::min<int>(req->top_k() == 0 ? 5 : req->top_k(),
                                                static_cast<int>(v->classes.size()));
                    resp->set_version(v->version);
                    for (int i = 0; i < req->images_size(); ++i) resp->add_results();
                    embedder_->Classify(
                        inputs, v, k, absl::FromChrono(c->deadline()),
                        [c] { return c->IsCancelled(); },
                        FinishAfterImages(reactor, timer, inputs->size(),
                                          [resp, v](size_t i, const EngineResult& top) {
                                            TopK(*v, top,
                                                 resp->mutable_results(static_cast<int>(i)));
                                          }),
                        caller.lane);
                    return absl::OkStatus();
                  });
            });
        return absl::OkStatus();
      });
}

grpc::ServerBidiReactor<v1::StreamClassifyRequest, v1::StreamClassifyResponse>*
ModelService::StreamClassify(grpc::CallbackServerContext* c) {
  return new StreamClassifyReactor(c, models_, embedder_, security_,
                                   limits_.max_images_per_request);
}

grpc::ServerWriteReactor<v1::ExportModelResponse>* ModelService::ExportModel(
    grpc::CallbackServerContext* c, const v1::ExportModelRequest* req) {
  return new ExportReactor(c, models_, &embedder_->engine(), security_, *req, exports_,
                           exports_in_flight_);
}

}  // namespace tlserve
