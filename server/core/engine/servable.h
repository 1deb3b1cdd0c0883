// An immutable trained version of a model: what Classify runs. Readers hold
// a shared_ptr to the version they started with; a new version is swapped in
// atomically (ModelRegistry), so an in-flight call never sees half a model.
#ifndef TLSERVE_SERVER_CORE_ENGINE_SERVABLE_H_
#define TLSERVE_SERVER_CORE_ENGINE_SERVABLE_H_

#include <string>
#include <utility>
#include <vector>

#include "server/core/engine/stage_plan.h"

namespace tlserve {

// How a version's logits become the probabilities and the label Classify
// returns: softmax(logits / temperature) (temperature scaling, fitted on the
// validation split when the version is made), and per-class confidence
// thresholds below which the label is "unknown".
struct Calibration {
  double temperature = 1;
  // One per class, in [0, 1]: "unknown" below it, and always at 1
  // (AnswersUnknown); empty: no thresholds (never "unknown").
  std::vector<float> thresholds;
};

struct ServableVersion {
  ServableVersion(std::string model, int version, std::vector<std::string> classes, StagePlan plan,
                  Calibration calibration = {})
      : model(std::move(model)),
        version(version),
        classes(std::move(classes)),
        plan(std::move(plan)),
        calibration(std::move(calibration)) {}

  const std::string model;
  const int version;
  const std::vector<std::string> classes;
  // The host copy (the master): private stages and head in float32 on the
  // CPU, eval mode, never modified. The device engine runs a copy of it in
  // the backbone's dtype on the device (its residency cache); on the CPU
  // the master itself runs.
  const StagePlan plan;
  const Calibration calibration;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_ENGINE_SERVABLE_H_
