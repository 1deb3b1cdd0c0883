// A training run's state at the end of an epoch, as bytes: what a job
// checkpoints so that it resumes after a restart (SIGTERM or kill -9) from
// its last epoch instead of starting over. The trainers (TrainHead,
// FineTune) say what goes in; the JobRunner writes the bytes durably.
#ifndef TLSERVE_SERVER_CORE_RUN_STATE_H_
#define TLSERVE_SERVER_CORE_RUN_STATE_H_

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace torch::optim {
class Optimizer;
}  // namespace torch::optim

namespace tlserve {

struct EpochStats;

// Saving and resuming a run at epoch boundaries.
struct Resume {
  // Called at the end of each epoch, before the epoch is reported, with the
  // state that continues after it. Must not throw; a failed save is the
  // caller's to log (the run goes on).
  std::function<void(const EpochStats& epoch, const std::string& state)> save;
  // Non-empty: the run continues from this state (a previous save's).
  std::string state;
};

// What a trainer keeps between epochs.
struct RunState {
  int epoch = 0;  // the last finished epoch
  double best = -1;
  int since_best = 0;
  double previous_loss = 0;
  bool finished = false;            // it stopped after `epoch` (early stopping, convergence)
  std::vector<at::Tensor> current;  // the weights (and buffers) now
  std::vector<at::Tensor> best_weights;
  std::vector<EpochStats> history;
};

// `optimizer` (may be null) is saved with the state and loaded back into.
std::string SaveRunState(const RunState& state, torch::optim::Optimizer* optimizer);
// DATA_LOSS when the bytes are not a state of this shape (the tensors are
// copied into `state.current` and `state.best_weights`, which must be sized).
absl::Status LoadRunState(const std::string& bytes, RunState& state,
                          torch::optim::Optimizer* optimizer);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_RUN_STATE_H_
