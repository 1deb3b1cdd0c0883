// The methods of tlserve.v1.Models about results users can trust: Evaluate
// (scores and paired comparisons of versions on a stored dataset),
// SetServedVersion (promote, roll back), SetThresholds ("unknown" below a
// confidence) and SuggestLabels (which unlabelled images to label next).
// Evaluate and SuggestLabels classify whole datasets: they run on an
// AnalysisReactor's thread and stream progress.
#include <ATen/ATen.h>

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/api/analysis_reactor.h"
#include "server/api/contained_call.h"
#include "server/api/model_service.h"
#include "server/core/predictions.h"
#include "server/core/training/evaluation.h"

namespace tlserve {
namespace {

constexpr int kMaxEvaluatedVersions = 8;
constexpr int kMaxSuggestions = 10000;

// The dataset's examples (without bytes) that the analysis reads, held
// against deletion until the analysis ends.
struct HeldExamples {
  std::shared_ptr<const void> hold;
  std::vector<StoredExample> examples;
};

absl::StatusOr<HeldExamples> ReadExamples(DatasetCatalog* datasets, const std::string& key) {
  HeldExamples held;
  held.hold = datasets->Hold(key);  // first: no delete between the check and the read
  if (auto d = datasets->Get(key); !d.ok()) return d.status();
  auto listed = datasets->database()->ListExamples(key);
  if (!listed.ok()) return listed.status();
  held.examples = *std::move(listed);
  return held;
}

// RESOURCE_EXHAUSTED before an analysis of `bytes` is started over the limit.
absl::Status CheckAnalysisBytes(int64_t bytes, const AnalysisLimits& limits, const char* what) {
  if (bytes <= limits.max_bytes) return absl::OkStatus();
  return absl::ResourceExhaustedError(
      absl::StrCat(what, " would hold ", bytes >> 20,
                   " MiB of probabilities and scores, over --max_analysis_mb ",
                   limits.max_bytes >> 20, "; use a smaller dataset or split, or fewer versions"));
}

// The qualified (tenant's) keys of an analysis's model and dataset.
struct AnalysisKeys {
  std::string model, dataset;
};
absl::StatusOr<AnalysisKeys> QualifyKeys(const Caller& caller, const std::string& model,
                                         const std::string& dataset) {
  auto m = caller.Qualify(model, "model");
  if (!m.ok()) return m.status();
  auto d = caller.Qualify(dataset, "dataset");
  if (!d.ok()) return d.status();
  return AnalysisKeys{*std::move(m), *std::move(d)};
}

// How an analysis runs its images through the engine: at serving priority,
// in the caller's lane, with the analysis's progress and cancellation.
PredictOptions AnalysisPredictOptions(const AnalysisContext& ctx, const AnalysisLimits& limits) {
  PredictOptions o;
  o.priority = Engine::Priority::kServing;
  o.lane = ctx.caller.lane;
  o.max_image_pixels = limits.max_image_pixels;
  o.progress = ctx.progress;
  o.cancelled = ctx.cancelled;
  return o;
}

std::string Verdict(const PairedTest& t, int a, int b) {
  if (t.p_value < 0.05) {
    return absl::StrFormat("v%d is better (p = %.3g)", t.only_a > t.only_b ? a : b, t.p_value);
  }
  return absl::StrFormat("no significant difference (p = %.3g)", t.p_value);
}

}  // namespace

grpc::ServerWriteReactor<v1::EvaluateResponse>* ModelService::Evaluate(
    grpc::CallbackServerContext* c, const v1::EvaluateRequest* req) {
  return new AnalysisReactor<v1::EvaluateResponse>(
      c, security_, "Evaluate", req->model(), analyses_,
      [this, req = *req](const AnalysisContext& ctx) -> absl::StatusOr<v1::EvaluateResponse> {
        auto keys = QualifyKeys(ctx.caller, req.model(), req.dataset());
        if (!keys.ok()) return keys.status();
        if (req.versions_size() > kMaxEvaluatedVersions) {
          return absl::InvalidArgumentError(absl::StrCat("versions: ", req.versions_size(),
                                                         " given, at most ", kMaxEvaluatedVersions,
                                                         " at once"));
        }
        if (!v1::Split_IsValid(req.split())) {
          return absl::InvalidArgumentError(
              "split: unknown value; use SPLIT_ALL, SPLIT_VALIDATION or SPLIT_TRAIN");
        }
        const double fraction = req.has_validation_fraction() ? req.validation_fraction() : 0.15;
        if (!(fraction >= 0 && fraction < 1)) {
          return absl::InvalidArgumentError("validation_fraction must be in [0, 1)");
        }
        if (!(req.target_precision() >= 0 && req.target_precision() < 1)) {
          return absl::InvalidArgumentError(
              "target_precision must be in (0, 1), e.g. 0.95 (0: no thresholds)");
        }
        std::vector<int> numbers(req.versions().begin(), req.versions().end());
        if (numbers.empty()) numbers.push_back(0);
        std::vector<std::shared_ptr<const ServableVersion>> versions;
        std::set<int> seen;
        for (size_t i = 0; i < numbers.size(); ++i) {
          if (numbers[i] < 0) {
            return absl::InvalidArgumentError(absl::StrCat(
                "versions[", i, "] = ", numbers[i], " must be >= 0 (0: the served version)"));
          }
          auto v = models_->ServableNow(keys->model, numbers[i]);
          if (!v.ok()) return v.status();
          if (!seen.insert((*v)->version).second) {
            return absl::InvalidArgumentError(
                absl::StrCat("versions[", i, "]: v", (*v)->version, " is named twice"));
          }
          versions.push_back(*std::move(v));
        }
        const std::vector<std::string>& classes = versions.front()->classes;
        std::map<std::string, int64_t> class_index;
        for (size_t i = 0; i < classes.size(); ++i) class_index[classes[i]] = i;
        auto held = ReadExamples(datasets_, keys->dataset);
        if (!held.ok()) return held.status();
        std::vector<StoredExample> chosen;
        std::vector<int64_t> labels;
        for (StoredExample& e : held->examples) {
          if (e.label.empty()) continue;  // the unlabelled pool is not scored
          if (req.split() != v1::SPLIT_ALL && DatasetCatalog::IsValidation(e.hash, fraction) !=
                                                  (req.split() == v1::SPLIT_VALIDATION)) {
            continue;
          }
          auto it = class_index.find(e.label);
          if (it == class_index.end()) {
            return absl::FailedPreconditionError(
                absl::StrCat("dataset \"", req.dataset(), "\" has label \"", Bounded(e.label),
                             "\", which model \"", req.model(), "\" does not know"));
          }
          labels.push_back(it->second);
          chosen.push_back(std::move(e));
        }
        if (chosen.empty()) {
          return absl::FailedPreconditionError(absl::StrCat(
              "dataset \"", req.dataset(), "\" has no labelled image in the chosen split"));
        }
        // float32 probabilities, their float64 copy while scored.
        if (absl::Status s = CheckAnalysisBytes(static_cast<int64_t>(chosen.size()) *
                                                    static_cast<int64_t>(classes.size()) *
                                                    static_cast<int64_t>(versions.size()) * 12,
                                                analyses_, "this evaluation");
            !s.ok()) {
          return s;
        }
        auto predicted = PredictExamples(embedder_->engine(), *datasets_->database(), chosen,
                                         versions, AnalysisPredictOptions(ctx, analyses_));
        if (!predicted.ok()) return predicted.status();
        v1::EvaluateResponse out;
        out.set_images_done(static_cast<int64_t>(chosen.size()));
        out.set_images_total(static_cast<int64_t>(chosen.size()));
        for (const auto& name : classes) out.add_classes(name);
        std::vector<ScoreReport> reports;
        for (size_t v = 0; v < versions.size(); ++v) {
          auto report = ScorePredictions(predicted->probabilities[v], labels);
          if (!report.ok()) return report.status();
          v1::VersionEvaluation* e = out.add_evaluations();
          e->set_version(versions[v]->version);
          e->set_images(report->examples);
          e->set_accuracy(report->accuracy);
          e->set_top5_accuracy(report->top_k_accuracy);
          e->set_log_loss(report->log_loss);
          e->set_ece(report->ece);
          e->set_temperature(versions[v]->calibration.temperature);
          for (size_t k = 0; k < report->classes.size(); ++k) {
            v1::ClassScore* cs = e->add_classes();
            cs->set_label(classes[k]);
            cs->set_precision(report->classes[k].precision);
            cs->set_recall(report->classes[k].recall);
            cs->set_f1(report->classes[k].f1);
            cs->set_support(report->classes[k].support);
          }
          for (int64_t x : report->confusion) e->add_confusion(x);
          if (req.target_precision() > 0) {
            const ThresholdChoice t =
                ChooseThresholds(predicted->probabilities[v], labels, req.target_precision());
            for (size_t k = 0; k < t.thresholds.size() && k < classes.size(); ++k) {
              (*e->mutable_thresholds())[classes[k]] = t.thresholds[k];
            }
            e->set_coverage(t.coverage);
            e->set_precision_at_thresholds(t.precision);
          }
          reports.push_back(*std::move(report));
        }
        for (size_t a = 0; a < versions.size(); ++a) {
          for (size_t b = a + 1; b < versions.size(); ++b) {
            auto t = McNemar(reports[a].correct, reports[b].correct);
            if (!t.ok()) return t.status();
            v1::VersionComparison* cmp = out.add_comparisons();
            cmp->set_version_a(versions[a]->version);
            cmp->set_version_b(versions[b]->version);
            cmp->set_only_a_correct(t->only_a);
            cmp->set_only_b_correct(t->only_b);
            cmp->set_p_value(t->p_value);
            cmp->set_verdict(Verdict(*t, versions[a]->version, versions[b]->version));
          }
        }
        return out;
      });
}

grpc::ServerWriteReactor<v1::SuggestLabelsResponse>* ModelService::SuggestLabels(
    grpc::CallbackServerContext* c, const v1::SuggestLabelsRequest* req) {
  return new AnalysisReactor<v1::SuggestLabelsResponse>(
      c, security_, "SuggestLabels", req->model(), analyses_,
      [this, req = *req](const AnalysisContext& ctx) -> absl::StatusOr<v1::SuggestLabelsResponse> {
        auto keys = QualifyKeys(ctx.caller, req.model(), req.dataset());
        if (!keys.ok()) return keys.status();
        if (req.count() < 1 || req.count() > kMaxSuggestions) {
          return absl::InvalidArgumentError(
              absl::StrCat("count must be in [1, ", kMaxSuggestions, "]"));
        }
        if (!v1::Uncertainty_IsValid(req.strategy())) {
          return absl::InvalidArgumentError(
              "strategy: unknown value; use UNCERTAINTY_MARGIN or UNCERTAINTY_ENTROPY");
        }
        const double cosine = req.has_duplicate_cosine() ? req.duplicate_cosine() : 0.95;
        if (!(cosine > 0)) {
          return absl::InvalidArgumentError("duplicate_cosine must be > 0 (>= 1: keep all)");
        }
        if (req.version() < 0) return absl::InvalidArgumentError("version must be >= 0");
        auto version = models_->ServableNow(keys->model, req.version());
        if (!version.ok()) return version.status();
        auto held = ReadExamples(datasets_, keys->dataset);
        if (!held.ok()) return held.status();
        std::vector<StoredExample> pool;
        for (StoredExample& e : held->examples) {
          if (e.label.empty()) pool.push_back(std::move(e));
        }
        if (pool.empty()) {
          return absl::FailedPreconditionError(
              absl::StrCat("dataset \"", req.dataset(),
                           "\" has no unlabelled image; upload the pool with empty labels"));
        }
        // Probabilities (float32 and a float64 copy) and embeddings (float32,
        // a float64 copy and its unit rows).
        const int64_t n = static_cast<int64_t>(pool.size());
        if (absl::Status s =
                CheckAnalysisBytes(n * static_cast<int64_t>((*version)->classes.size()) * 12 +
                                       n * embedder_->engine().backbone().embedding_dim() * 20,
                                   analyses_, "these suggestions");
            !s.ok()) {
          return s;
        }
        PredictOptions o = AnalysisPredictOptions(ctx, analyses_);
        o.embeddings = true;
        auto predicted =
            PredictExamples(embedder_->engine(), *datasets_->database(), pool, {*version}, o);
        if (!predicted.ok()) return predicted.status();
        const at::Tensor& p = predicted->probabilities[0];
        int64_t skipped = 0;
        const std::vector<Suggestion> ranked =
            RankForLabelling(p, predicted->embeddings, req.count(),
                             req.strategy() == v1::UNCERTAINTY_ENTROPY ? Uncertainty::kEntropy
                                                                       : Uncertainty::kMargin,
                             cosine, &skipped);
        v1::SuggestLabelsResponse out;
        out.set_images_done(static_cast<int64_t>(pool.size()));
        out.set_images_total(static_cast<int64_t>(pool.size()));
        out.set_duplicates_skipped(skipped);
        const std::vector<std::string>& classes = (*version)->classes;
        const int top = std::min<int>(3, static_cast<int>(classes.size()));
        for (const Suggestion& s : ranked) {
          v1::LabelSuggestion* ls = out.add_suggestions();
          ls->set_name(pool[s.index].name);
          ls->set_margin(s.margin);
          ls->set_entropy(s.entropy);
          auto [values, indices] = p[s.index].topk(top);
          for (int k = 0; k < top; ++k) {
            v1::SuggestedLabel* l = ls->add_top();
            l->set_label(classes[indices[k].item<int64_t>()]);
            l->set_probability(values[k].item<float>());
          }
        }
        return out;
      });
}

grpc::ServerUnaryReactor* ModelService::SetServedVersion(grpc::CallbackServerContext* c,
                                                         const v1::SetServedVersionRequest* req,
                                                         v1::Model* resp) {
  return ContainedOnWorker(
      c, security_, "SetServedVersion", req->model(), work_,
      [this, req, resp](const Caller& caller) -> absl::Status {
        auto key = caller.Qualify(req->model(), "model");
        if (!key.ok()) return key.status();
        if (req->version() < 1) {
          return absl::InvalidArgumentError("version must be >= 1 (GetModel lists the versions)");
        }
        auto m = models_->Serve(*key, req->version());
        if (!m.ok()) return m.status();
        ToProto(*m, caller, resp);
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* ModelService::SetThresholds(grpc::CallbackServerContext* c,
                                                      const v1::SetThresholdsRequest* req,
                                                      v1::Model* resp) {
  return ContainedOnWorker(
      c, security_, "SetThresholds", req->model(), work_,
      [this, req, resp](const Caller& caller) -> absl::Status {
        auto key = caller.Qualify(req->model(), "model");
        if (!key.ok()) return key.status();
        if (req->version() < 0) return absl::InvalidArgumentError("version must be >= 0");
        if (req->has_global() && !req->per_class().empty()) {
          return absl::InvalidArgumentError("give global or per_class, not both");
        }
        auto info = models_->Get(*key);
        if (!info.ok()) return info.status();
        std::vector<float> thresholds;
        if (req->has_global()) thresholds.assign(info->classes.size(), req->global());
        if (!req->per_class().empty()) {
          thresholds.assign(info->classes.size(), 0.0f);
          std::map<std::string, size_t> index;
          for (size_t i = 0; i < info->classes.size(); ++i) index[info->classes[i]] = i;
          for (const auto& [label, t] : req->per_class()) {
            auto it = index.find(label);
            if (it == index.end()) {
              return absl::InvalidArgumentError(
                  absl::StrCat("per_class: \"", Bounded(label), "\" is not a class of the model"));
            }
            thresholds[it->second] = t;
          }
        }
        auto m = models_->SetThresholds(*key, req->version(), std::move(thresholds));
        if (!m.ok()) return m.status();
        ToProto(*m, caller, resp);
        return absl::OkStatus();
      });
}

}  // namespace tlserve
