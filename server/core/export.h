// Export: one model version as a standalone TorchScript classifier, the
// shared stages, the version's private stages and its head composed into a
// module whose forward takes a normalised float32 batch N×3×H×W and returns
// logits (softmax of them is what Classify returns). Stages keep their names
// and order and the head is the last child, so the file is itself a valid
// tlserve backbone (the head is dropped) and loads in Python with
// torch.jit.load, in Triton's and TorchServe's PyTorch backends, or in
// LibTorch. Extra files: preprocess.json (the backbone's), classes.json
// (class names in logit order) and tlserve.json (name, provenance).
#ifndef TLSERVE_SERVER_CORE_EXPORT_H_
#define TLSERVE_SERVER_CORE_EXPORT_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "server/core/engine/engine.h"

namespace tlserve {

struct ExportedModel {
  int64_t size = 0;  // of the TorchScript zip file
  std::string sha256;
};

// Builds the file on the CPU in float32, whatever the serving device, checks
// it (on a probe batch its softmax must equal what the engine's Classify
// computes, INTERNAL otherwise) and writes it to `path` — a file, not memory, so that
// exports in flight hold no copies of models. INVALID_ARGUMENT when a stage
// name is not a Python identifier (TorchScript could not name it).
absl::StatusOr<ExportedModel> ExportModel(Engine& engine,
                                          const std::shared_ptr<const ServableVersion>& version,
                                          const std::string& path);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_EXPORT_H_
