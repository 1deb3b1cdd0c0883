#include "server/core/predictions.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "server/core/contain.h"
#include "server/core/preprocess.h"

namespace tlserve {

absl::StatusOr<Predictions> PredictExamples(
    Engine& engine, Database& db, const std::vector<StoredExample>& examples,
    const std::vector<std::shared_ptr<const ServableVersion>>& versions,
    const PredictOptions& options) {
  const Backbone& backbone = engine.backbone();
  const int64_t n = static_cast<int64_t>(examples.size());
  Predictions out;
  for (const auto& v : versions) {
    out.probabilities.push_back(at::zeros({n, static_cast<int64_t>(v->classes.size())}));
  }
  if (options.embeddings) out.embeddings = at::zeros({n, backbone.embedding_dim()});
  const int64_t chunk = std::max(1, engine.max_batch_size());
  for (int64_t first = 0; first < n; first += chunk) {
    if (options.cancelled && options.cancelled()) return absl::CancelledError("cancelled");
    const int64_t end = std::min(n, first + chunk);
    std::vector<int64_t> ids;
    for (int64_t i = first; i < end; ++i) ids.push_back(examples[i].id);
    auto bytes = db.ReadExampleBytes(ids);
    if (!bytes.ok()) {
      if (bytes.status().code() == absl::StatusCode::kNotFound) {
        return absl::FailedPreconditionError(
            absl::StrCat("the dataset changed while it was read: ", bytes.status().message()));
      }
      return bytes.status();
    }
    std::vector<Engine::Work> work;
    for (int64_t i = first; i < end; ++i) {
      auto x = DecodeAndPreprocessUint8((*bytes)[i - first], backbone.preprocess(),
                                        options.max_image_pixels);
      if (!x.ok()) {
        return absl::FailedPreconditionError(
            absl::StrCat("example ", examples[i].id, " (\"", Bounded(examples[i].name),
                         "\") cannot be used: ", x.status().message()));
      }
      // One piece of work per version (and one for the embedding) on the
      // same input: the engine runs their shared prefix once.
      for (const auto& v : versions) {
        Engine::Work w;
        w.input = *x;
        w.output = Engine::Output::kClassification;
        w.version = v;
        w.top_k = 0;
        w.priority = options.priority;
        w.lane = options.lane;
        work.push_back(std::move(w));
      }
      if (options.embeddings) {
        Engine::Work w;
        w.input = *x;
        w.output = Engine::Output::kEmbedding;
        w.priority = options.priority;
        w.lane = options.lane;
        work.push_back(std::move(w));
      }
    }
    auto results = engine.Run(std::move(work));
    if (!results.ok()) return results.status();
    size_t k = 0;
    for (int64_t i = first; i < end; ++i) {
      for (size_t v = 0; v < versions.size(); ++v, ++k) {
        // Every class comes back sorted by probability: put each in its place.
        const EngineResult& r = (*results)[k];
        out.probabilities[v][i].scatter_(0, r.indices, r.values.to(at::kFloat));
      }
      if (options.embeddings) out.embeddings[i].copy_((*results)[k++].values);
    }
    if (options.progress) options.progress(end, n);
  }
  return out;
}

}  // namespace tlserve
