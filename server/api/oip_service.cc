#include "server/api/oip_service.h"

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"
#include "server/api/contained_call.h"
#include "server/api/oip_convert.h"
#include "server/api/rpc_timer.h"
#include "server/api/status_util.h"
#include "server/api/stream_classify_reactor.h"
#include "server/api/unary_image_call.h"
#include "server/core/contain.h"

#ifndef TLSERVE_VERSION
#define TLSERVE_VERSION "unknown"
#endif

namespace tlserve {
namespace {

using inference::ModelInferRequest;
using inference::ModelInferResponse;

constexpr char kPlatform[] = "pytorch_torchscript";
const std::vector<std::string>& ModelOutputs() {
  static const auto* outputs = new std::vector<std::string>{"probabilities", "labels", "label"};
  return *outputs;
}
constexpr char kEmbeddingOutput[] = "embedding";

void AddTensor(const char* name, const char* type, std::vector<int64_t> shape,
               inference::ModelMetadataResponse* out) {
  auto* t = out->add_outputs();
  t->set_name(name);
  t->set_datatype(type);
  for (int64_t d : shape) t->add_shape(d);
}

void SetString(inference::ModelMetadataResponse* out, const std::string& key,
               const std::string& value) {
  (*out->mutable_parameters())[key].set_string_param(value);
}

// "" -> 0 (the served version); else a positive number.
absl::StatusOr<int> ParseVersion(const std::string& text, const char* field) {
  if (text.empty()) return 0;
  int v = 0;
  if (!absl::SimpleAtoi(text, &v) || v < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " \"", Bounded(text, 32),
                     "\" is not a version: give a number (1, 2, ...) or none "
                     "for the served version"));
  }
  return v;
}

bool IsBackbone(const std::string& name) { return name == kOipBackboneModel; }

// The backbone has one version, "1".
absl::Status CheckBackboneVersion(const std::string& version) {
  auto v = ParseVersion(version, "version");
  if (!v.ok()) return v.status();
  if (*v == 0 || *v == 1) return absl::OkStatus();
  return absl::NotFoundError(
      absl::StrCat("model ", kOipBackboneModel, " has one version, 1; not ", *v));
}

}  // namespace

absl::StatusOr<OipService::Target> OipService::Find(const Caller& caller, const std::string& name,
                                                    const std::string& version) const {
  auto key = caller.Qualify(name, "model name");
  if (!key.ok()) return key.status();
  auto v = ParseVersion(version, "version");
  if (!v.ok()) return v.status();
  auto info = models_->Get(*key);
  if (!info.ok()) return info.status();
  if (*v != 0 && std::none_of(info->versions.begin(), info->versions.end(),
                              [&](const VersionInfo& x) { return x.version == *v; })) {
    std::vector<int> have;
    for (const VersionInfo& x : info->versions) have.push_back(x.version);
    return absl::NotFoundError(
        absl::StrCat("model ", name, " has no version ", *v,
                     have.empty() ? std::string(" (it has no trained version yet)")
                                  : absl::StrCat(" (versions: ", absl::StrJoin(have, ", "), ")")));
  }
  return Target{std::move(*info), *v};
}

grpc::ServerUnaryReactor* OipService::ServerLive(grpc::CallbackServerContext* c,
                                                 const inference::ServerLiveRequest*,
                                                 inference::ServerLiveResponse* resp) {
  return ContainedUnary(c, security_, "ServerLive", "", [&](const Caller&) -> absl::Status {
    resp->set_live(true);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* OipService::ServerReady(grpc::CallbackServerContext* c,
                                                  const inference::ServerReadyRequest*,
                                                  inference::ServerReadyResponse* resp) {
  return ContainedUnary(c, security_, "ServerReady", "", [&](const Caller&) -> absl::Status {
    resp->set_ready(!draining_);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* OipService::ModelReady(grpc::CallbackServerContext* c,
                                                 const inference::ModelReadyRequest* req,
                                                 inference::ModelReadyResponse* resp) {
  return ContainedUnary(
      c, security_, "ModelReady", req->name(), [&](const Caller& caller) -> absl::Status {
        if (IsBackbone(req->name())) {
          if (absl::Status s = CheckBackboneVersion(req->version()); !s.ok()) {
            return s;
          }
          resp->set_ready(!draining_);
          return absl::OkStatus();
        }
        auto t = Find(caller, req->name(), req->version());
        if (!t.ok()) return t.status();
        // Ready: loadable, and with a trained version to answer.
        resp->set_ready(!draining_ && t->info.problem.ok() && t->info.served_version > 0);
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* OipService::ServerMetadata(grpc::CallbackServerContext* c,
                                                     const inference::ServerMetadataRequest*,
                                                     inference::ServerMetadataResponse* resp) {
  return ContainedUnary(c, security_, "ServerMetadata", "", [&](const Caller&) -> absl::Status {
    resp->set_name("tlserve");
    resp->set_version(TLSERVE_VERSION);
    // What tlserve adds to the protocol: its own API (tlserve.v1) for
    // datasets, training, evaluation and export; the backbone as a model
    // that embeds; ModelMetadataResponse.parameters (class names).
    for (const char* e : {"tlserve.v1", "datasets", "training", "evaluation", "export", "embedding",
                          "model_metadata_parameters"}) {
      resp->add_extensions(e);
    }
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* OipService::ModelMetadata(grpc::CallbackServerContext* c,
                                                    const inference::ModelMetadataRequest* req,
                                                    inference::ModelMetadataResponse* resp) {
  return ContainedUnary(
      c, security_, "ModelMetadata", req->name(), [&](const Caller& caller) -> absl::Status {
        resp->set_name(req->name());
        resp->set_platform(kPlatform);
        AddOipInputs(resp);
        if (IsBackbone(req->name())) {
          if (absl::Status s = CheckBackboneVersion(req->version()); !s.ok()) {
            return s;
          }
          const Backbone& b = embedder_->backbone();
          resp->add_versions("1");
          AddTensor(kEmbeddingOutput, "FP32", {-1, b.embedding_dim()}, resp);
          SetString(resp, "file_name", b.file_name());
          SetString(resp, "sha256", b.sha256());
          return absl::OkStatus();
        }
        auto t = Find(caller, req->name(), req->version());
        if (!t.ok()) return t.status();
        if (!t->info.problem.ok()) return t->info.problem;
        for (const VersionInfo& v : t->info.versions) {
          resp->add_versions(std::to_string(v.version));
        }
        const int64_t classes = static_cast<int64_t>(t->info.classes.size());
        AddTensor("probabilities", "FP32", {-1, classes}, resp);
        AddTensor("labels", "BYTES", {-1, -1}, resp);
        AddTensor("label", "BYTES", {-1}, resp);
        SetString(resp, "classes", nlohmann::json(t->info.classes).dump());
        (*resp->mutable_parameters())["served_version"].set_int64_param(t->info.served_version);
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* OipService::ModelInfer(grpc::CallbackServerContext* c,
                                                 const ModelInferRequest* req,
                                                 ModelInferResponse* resp) {
  return ContainedAsyncUnary(
      c, security_, "ModelInfer", req->model_name(),
      [&](grpc::ServerUnaryReactor* reactor, const RpcTimer& timer,
          const Caller& caller) -> absl::Status {
        resp->set_model_name(req->model_name());
        resp->set_id(req->id());
        if (absl::Status s = CheckOipParameters(
                req->inputs_size() > 0 ? req->inputs(0).parameters() : OipParameters(), {},
                "inputs[0]");
            !s.ok()) {
          return s;
        }
        return IsBackbone(req->model_name()) ? InferBackbone(c, req, resp, reactor, timer, caller)
                                             : InferModel(c, req, resp, reactor, timer, caller);
      });
}

absl::Status OipService::InferModel(grpc::CallbackServerContext* c, const ModelInferRequest* req,
                                    ModelInferResponse* resp, grpc::ServerUnaryReactor* reactor,
                                    const RpcTimer& held_timer, const Caller& caller) {
  // No registry read here: Servable answers NOT_FOUND / FAILED_PRECONDITION
  // from memory, as for Classify (serving never waits on the database).
  auto key = caller.Qualify(req->model_name(), "model_name");
  if (!key.ok()) return key.status();
  auto version = ParseVersion(req->model_version(), "model_version");
  if (!version.ok()) return version.status();
  if (absl::Status s = CheckOipParameters(req->parameters(), {"top_k"}, "parameters"); !s.ok()) {
    return s;
  }
  auto outputs = RequestedOipOutputs(*req, ModelOutputs());
  if (!outputs.ok()) return outputs.status();
  // top_k: the labels output's own parameter, else the request's, else 1.
  auto request_top_k = OipInt(req->parameters(), "top_k", 1);
  if (!request_top_k.ok()) return request_top_k.status();
  int64_t labels_top_k = *request_top_k;
  for (const auto& o : req->outputs()) {
    const bool labels = o.name() == "labels";
    if (absl::Status s = CheckOipParameters(
            o.parameters(), labels ? std::vector<std::string>{"top_k"} : std::vector<std::string>{},
            absl::StrCat("outputs \"", Bounded(o.name(), 64), "\""));
        !s.ok()) {
      return s;
    }
    if (labels) {
      auto k = OipInt(o.parameters(), "top_k", labels_top_k);
      if (!k.ok()) return k.status();
      labels_top_k = *k;
    }
  }
  if (labels_top_k < 1) {
    return absl::InvalidArgumentError(absl::StrCat("parameter \"top_k\" is ", labels_top_k,
                                                   "; give 1 or more (labels per image)"));
  }
  auto parsed = ParseOipImages(*req, limits_.max_images_per_request);
  if (!parsed.ok()) return parsed.status();
  const size_t n = parsed->images->size();
  security_->metrics()->AddImages("ModelInfer", static_cast<double>(n));
  auto lease = security_->AdmitImages(caller, static_cast<int>(n));
  if (!lease.ok()) return lease.status();
  RpcTimer timer = held_timer;
  timer.Hold(*lease);
  models_->Servable(
      *key, *version,
      [this, c, resp, reactor, timer, caller, images = *std::move(parsed),
       outputs = *std::move(outputs),
       k_asked = labels_top_k](absl::StatusOr<std::shared_ptr<const ServableVersion>> version) {
        ContainedContinuation(reactor, timer, caller, "ModelInfer failed", [&]() -> absl::Status {
          if (!version.ok()) return version.status();
          auto v = *version;
          const int64_t classes = static_cast<int64_t>(v->classes.size());
          const int64_t k = std::min<int64_t>(k_asked, classes);
          const int64_t rows = static_cast<int64_t>(images.images->size());
          resp->set_model_version(std::to_string(v->version));
          struct Result {
            std::vector<float> probabilities;
            std::vector<std::string> labels, label;
          };
          auto r = std::make_shared<Result>();
          r->probabilities.resize(rows * classes);
          r->labels.resize(rows * k);
          r->label.resize(rows);
          // Every class came back, highest first: scattered into class order.
          auto fill = [v, r, classes, k, keep = images.storage](size_t i, const EngineResult& top) {
            const at::Tensor p = top.values.to(at::kFloat).contiguous();
            const at::Tensor idx = top.indices.to(at::kLong).contiguous();
            const float* prob = p.data_ptr<float>();
            const int64_t* cls = idx.data_ptr<int64_t>();
            for (int64_t j = 0; j < p.size(0); ++j) {
              r->probabilities[i * classes + cls[j]] = prob[j];
              if (j < k) r->labels[i * k + j] = v->classes[cls[j]];
            }
            if (p.size(0) > 0) {
              r->label[i] = AnswersUnknown(*v, prob[0], cls[0]) ? "unknown" : v->classes[cls[0]];
            }
          };
          auto last = [resp, r, outputs, rows, classes, k, raw = images.raw]() {
            return Contain("ModelInfer failed", [&]() -> absl::Status {
              for (const std::string& o : outputs) {
                if (o == "probabilities") {
                  AddOipFp32(o, {rows, classes}, r->probabilities, raw, resp);
                } else if (o == "labels") {
                  AddOipBytes(o, {rows, k}, r->labels, raw, resp);
                } else {
                  AddOipBytes(o, {rows}, r->label, raw, resp);
                }
              }
              return absl::OkStatus();
            });
          };
          embedder_->Classify(
              images.images, v, /*top_k=*/0, absl::FromChrono(c->deadline()),
              [c] { return c->IsCancelled(); },
              FinishAfterImages(reactor, timer, images.images->size(), fill, last), caller.lane);
          return absl::OkStatus();
        });
      });
  return absl::OkStatus();
}

absl::Status OipService::InferBackbone(grpc::CallbackServerContext* c, const ModelInferRequest* req,
                                       ModelInferResponse* resp, grpc::ServerUnaryReactor* reactor,
                                       const RpcTimer& held_timer, const Caller& caller) {
  if (absl::Status s = CheckBackboneVersion(req->model_version()); !s.ok()) return s;
  resp->set_model_version("1");
  if (absl::Status s =
          CheckOipParameters(req->parameters(), {"layer", "pool", "normalize"}, "parameters");
      !s.ok()) {
    return s;
  }
  auto outputs = RequestedOipOutputs(*req, {kEmbeddingOutput});
  if (!outputs.ok()) return outputs.status();
  if (absl::Status s = CheckOipParameters(
          req->outputs_size() > 0 ? req->outputs(0).parameters() : OipParameters(), {},
          "outputs \"embedding\"");
      !s.ok()) {
    return s;
  }
  auto layer = OipString(req->parameters(), "layer", "");
  if (!layer.ok()) return layer.status();
  auto pool = OipString(req->parameters(), "pool", "avg");
  if (!pool.ok()) return pool.status();
  if (*pool != "avg" && *pool != "max") {
    return absl::InvalidArgumentError(absl::StrCat("parameter \"pool\" is \"", Bounded(*pool, 32),
                                                   "\"; give \"avg\" or \"max\""));
  }
  auto normalize = OipBool(req->parameters(), "normalize", false);
  if (!normalize.ok()) return normalize.status();
  auto spec = embedder_->MakeSpec(*layer, *pool == "max" ? Pool::kMax : Pool::kAvg, *normalize);
  if (!spec.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("parameter \"layer\": ", spec.status().message()));
  }
  auto parsed = ParseOipImages(*req, limits_.max_images_per_request);
  if (!parsed.ok()) return parsed.status();
  const size_t n = parsed->images->size();
  security_->metrics()->AddImages("ModelInfer", static_cast<double>(n));
  auto lease = security_->AdmitImages(caller, static_cast<int>(n));
  if (!lease.ok()) return lease.status();
  RpcTimer timer = held_timer;
  timer.Hold(*lease);
  auto vectors = std::make_shared<std::vector<std::vector<float>>>(n);
  auto fill = [vectors, keep = parsed->storage](size_t i, const EngineResult& r) {
    const at::Tensor v = r.values.to(at::kFloat).contiguous();
    const float* p = v.data_ptr<float>();
    (*vectors)[i].assign(p, p + v.numel());
  };
  auto last = [resp, vectors, outputs = *outputs, raw = parsed->raw]() {
    return Contain("ModelInfer failed", [&]() -> absl::Status {
      const int64_t dim = vectors->empty() ? 0 : static_cast<int64_t>((*vectors)[0].size());
      std::vector<float> flat;
      flat.reserve(vectors->size() * dim);
      for (const auto& v : *vectors) flat.insert(flat.end(), v.begin(), v.end());
      if (!outputs.empty()) {
        AddOipFp32(kEmbeddingOutput, {static_cast<int64_t>(vectors->size()), dim}, flat, raw, resp);
      }
      return absl::OkStatus();
    });
  };
  embedder_->Embed(
      parsed->images, *spec, absl::FromChrono(c->deadline()), [c] { return c->IsCancelled(); },
      FinishAfterImages(reactor, timer, n, fill, last), caller.lane);
  return absl::OkStatus();
}

}  // namespace tlserve
