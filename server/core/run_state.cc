#include "server/core/run_state.h"

#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/torch.h>

#include <sstream>

#include "absl/strings/str_cat.h"
#include "server/core/head_trainer.h"

namespace tlserve {

std::string SaveRunState(const RunState& s, torch::optim::Optimizer* optimizer) {
  torch::NoGradGuard no_grad;
  torch::serialize::OutputArchive a;
  a.write("meta",
          torch::tensor({static_cast<double>(s.epoch), s.best, static_cast<double>(s.since_best),
                         s.previous_loss, s.finished ? 1.0 : 0.0},
                        torch::kDouble));
  for (size_t i = 0; i < s.current.size(); ++i) {
    a.write(absl::StrCat("current.", i), s.current[i].detach().to(torch::kCPU));
  }
  for (size_t i = 0; i < s.best_weights.size(); ++i) {
    a.write(absl::StrCat("best.", i), s.best_weights[i].detach().to(torch::kCPU));
  }
  std::vector<double> history;
  for (const EpochStats& e : s.history) {
    history.insert(history.end(),
                   {static_cast<double>(e.epoch), e.train_loss, e.train_accuracy, e.validation_loss,
                    e.validation_accuracy, e.images_per_second, e.elapsed_seconds, e.eta_seconds});
  }
  a.write("history", torch::tensor(history, torch::kDouble));
  if (optimizer != nullptr) {
    torch::serialize::OutputArchive o;
    optimizer->save(o);
    a.write("optimizer", o);
  }
  std::ostringstream out;
  a.save_to(out);
  return out.str();
}

absl::Status LoadRunState(const std::string& bytes, RunState& s,
                          torch::optim::Optimizer* optimizer) {
  try {
    torch::NoGradGuard no_grad;
    torch::serialize::InputArchive a;
    std::istringstream in(bytes);
    a.load_from(in);
    at::Tensor meta;
    a.read("meta", meta);
    s.epoch = static_cast<int>(meta[0].item<double>());
    s.best = meta[1].item<double>();
    s.since_best = static_cast<int>(meta[2].item<double>());
    s.previous_loss = meta[3].item<double>();
    s.finished = meta[4].item<double>() != 0;
    for (size_t i = 0; i < s.current.size(); ++i) {
      at::Tensor t;
      a.read(absl::StrCat("current.", i), t);
      s.current[i].copy_(t);
    }
    for (size_t i = 0; i < s.best_weights.size(); ++i) {
      at::Tensor t;
      a.read(absl::StrCat("best.", i), t);
      s.best_weights[i].copy_(t);
    }
    at::Tensor history;
    a.read("history", history);
    s.history.clear();
    for (int64_t r = 0; r + 8 <= history.numel(); r += 8) {
      EpochStats e;
      e.epoch = static_cast<int>(history[r].item<double>());
      e.train_loss = history[r + 1].item<double>();
      e.train_accuracy = history[r + 2].item<double>();
      e.validation_loss = history[r + 3].item<double>();
      e.validation_accuracy = history[r + 4].item<double>();
      e.images_per_second = history[r + 5].item<double>();
      e.elapsed_seconds = history[r + 6].item<double>();
      e.eta_seconds = history[r + 7].item<double>();
      s.history.push_back(e);
    }
    if (optimizer != nullptr) {
      torch::serialize::InputArchive o;
      a.read("optimizer", o);
      optimizer->load(o);
    }
  } catch (const c10::Error& e) {
    return absl::DataLossError(
        absl::StrCat("the checkpoint cannot be read: ", e.msg().substr(0, 200)));
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat("the checkpoint cannot be read: ", e.what()));
  }
  return absl::OkStatus();
}

}  // namespace tlserve
