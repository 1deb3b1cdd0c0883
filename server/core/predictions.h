// Classifies stored examples of a dataset through the device engine with one
// or more model versions (and, when asked, embeds them): what Evaluate,
// SuggestLabels and a job's "is the new version better than the served
// one?" run. Each image is read from the database and decoded once per
// chunk of an engine batch, then submitted once per version (the engine runs
// the shared prefix once for a mixed batch); full class probabilities come
// back (calibrated: softmax(logits / the version's temperature)).
//
// Blocks the calling thread (a job's, an evaluation's), never a gRPC one.
// Thread-safe: it holds no state.
#ifndef TLSERVE_SERVER_CORE_PREDICTIONS_H_
#define TLSERVE_SERVER_CORE_PREDICTIONS_H_

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "server/core/engine/engine.h"
#include "server/core/engine/servable.h"
#include "server/store/database.h"

namespace tlserve {

struct PredictOptions {
  Engine::Priority priority = Engine::Priority::kTraining;
  uint64_t lane = 0;
  int64_t max_image_pixels = 40'000'000;
  bool embeddings = false;  // also the backbone's embedding of each image
  // Called after each chunk with the examples done so far and the total.
  std::function<void(int64_t, int64_t)> progress;
  std::function<bool()> cancelled;  // polled between chunks: CANCELLED
};

struct Predictions {
  std::vector<at::Tensor> probabilities;  // per version: N×C float32, CPU
  at::Tensor embeddings;                  // N×D float32, CPU, when asked
};

// `examples` as Database::ListExamples gives them (bytes are read here, a
// chunk at a time). FAILED_PRECONDITION naming an example that cannot be
// decoded or that disappeared; the engine's errors as they come.
absl::StatusOr<Predictions> PredictExamples(
    Engine& engine, Database& db, const std::vector<StoredExample>& examples,
    const std::vector<std::shared_ptr<const ServableVersion>>& versions,
    const PredictOptions& options);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_PREDICTIONS_H_
