// tlctl's commands for training jobs: train (with --wait), jobs, watch, cancel.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "client/tlctl/format.h"
#include "client/tlctl/model_commands.h"

namespace tlserve {
namespace {

std::string StateName(v1::Job::State s) {
  std::string n = v1::Job::State_Name(s);
  for (char& c : n) c = static_cast<char>(std::tolower(c));
  return n;
}

nlohmann::json JobJson(const v1::Job& j) {
  nlohmann::json epochs = nlohmann::json::array();
  for (const auto& e : j.epochs()) {
    epochs.push_back({{"epoch", e.epoch()},
                      {"train_loss", e.train_loss()},
                      {"train_accuracy", e.train_accuracy()},
                      {"validation_loss", e.validation_loss()},
                      {"validation_accuracy", e.validation_accuracy()},
                      {"images_per_second", e.images_per_second()},
                      {"elapsed_seconds", e.elapsed_seconds()}});
  }
  nlohmann::json out = {{"id", j.id()},
                        {"model", j.model()},
                        {"dataset", j.dataset()},
                        {"state", StateName(j.state())},
                        {"phase", j.phase()},
                        {"error", j.error()},
                        {"version", j.version()},
                        {"epochs", epochs},
                        {"outcome", j.outcome()},
                        // Whether a restart of the server resumes it (or fails it).
                        {"resumes_after_restart", !j.options().has_resume_after_restart() ||
                                                      j.options().resume_after_restart()}};
  if (const std::string t = TenantOf(j); !t.empty()) out["tenant"] = t;
  if (j.leaderboard_size() > 0) {
    nlohmann::json board = nlohmann::json::array();
    for (const auto& c : j.leaderboard()) {
      board.push_back({{"layer", c.layer()},
                       {"l2", c.l2()},
                       {"hidden", std::vector<int>(c.hidden().begin(), c.hidden().end())},
                       {"params", c.params()},
                       {"accuracy", c.accuracy()},
                       {"accuracy_std", c.accuracy_std()},
                       {"log_loss", c.log_loss()},
                       {"seconds", c.seconds()}});
    }
    out["leaderboard"] = board;
  }
  out["validation_accuracy"] = j.epochs_size()
                                   ? nlohmann::json(j.epochs().rbegin()->validation_accuracy())
                                   : nlohmann::json(nullptr);
  return out;
}

// Ctrl-C while waiting on a job: cancels the watch; the caller then asks.
class InterruptWatch {
 public:
  explicit InterruptWatch(grpc::ClientContext* ctx) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    thread_ = std::thread([this, ctx, set] {
      int sig = 0;
      sigwait(&set, &sig);
      if (done_) return;
      interrupted_ = true;
      ctx->TryCancel();
    });
  }
  ~InterruptWatch() {
    done_ = true;
    pthread_kill(thread_.native_handle(), SIGINT);
    thread_.join();
  }
  bool interrupted() const { return interrupted_; }

 private:
  std::atomic<bool> done_{false}, interrupted_{false};
  std::thread thread_;
};

// Follows a job with a progress bar; on Ctrl-C asks whether to cancel it.
int Follow(Client& c, const std::string& id, bool json) {
  grpc::ClientContext ctx;
  v1::Job last;
  const bool tty = isatty(STDERR_FILENO);
  absl::Status s;
  bool interrupted = false;
  {
    InterruptWatch watch(&ctx);
    s = c.WatchJob(id, &ctx, [&](const v1::Job& j) {
      last = j;
      if (!tty) return;
      const int total = j.options().epochs() > 0 ? j.options().epochs() : 1;
      const int done = j.epochs_size();
      const int width = 30, filled = std::min(width, width * done / total);
      std::string line =
          absl::StrFormat("\r%s [%s%s] %d/%d epochs", StateName(j.state()),
                          std::string(filled, '#'), std::string(width - filled, '.'), done, total);
      if (done > 0) {
        const auto& e = *j.epochs().rbegin();
        absl::StrAppendFormat(&line, "  loss %.4f  train %.3f  val %.3f  %.0f img/s  ETA %.0fs",
                              e.train_loss(), e.train_accuracy(), e.validation_accuracy(),
                              e.images_per_second(), e.eta_seconds());
      } else {
        absl::StrAppend(&line, "  ", j.phase());
      }
      std::fprintf(stderr, "%s\033[K", line.c_str());
      std::fflush(stderr);
    });
    interrupted = watch.interrupted();
  }
  if (tty) std::fprintf(stderr, "\n");
  if (interrupted) {
    std::string answer = "d";
    if (isatty(STDIN_FILENO)) {
      std::cerr << "job " << id << " is still running: [c]ancel it or [d]etach? ";
      std::getline(std::cin, answer);
    }
    if (!answer.empty() && (answer[0] == 'c' || answer[0] == 'C')) {
      v1::CancelJobRequest req;
      req.set_id(id);
      auto j = c.Call(&v1::Models::Stub::CancelJob, req);
      if (!j.ok()) return Fail(j.status());
      std::cerr << "cancelled job " << id << "\n";
    } else {
      std::cerr << "detached; follow it with: tlctl watch " << id << "\n";
    }
    return 130;
  }
  if (!s.ok()) return Fail(s);
  if (json) {
    std::cout << JobJson(last).dump() << "\n";
  } else {
    std::cout << "job " << last.id() << ": " << StateName(last.state());
    if (last.state() == v1::Job::SUCCEEDED) {
      std::cout << ", version " << last.version();
      if (last.epochs_size()) {
        std::cout << absl::StrFormat(", validation accuracy %.4f",
                                     last.epochs().rbegin()->validation_accuracy());
      }
    }
    if (!last.error().empty()) std::cout << ": " << last.error();
    std::cout << "\n";
    if (last.leaderboard_size() > 0) {
      std::cout << absl::StrFormat("%-4s %12s %10s %10s %10s %8s %9s\n", "rank", "l2 (1/C)",
                                   "hidden", "layer", "accuracy", "+-", "log loss");
      int rank = 0;
      for (const auto& cand : last.leaderboard()) {
        std::string hidden = "linear";
        if (cand.hidden_size() > 0) hidden = absl::StrCat(cand.hidden(0));
        ++rank;
        std::cout << absl::StrFormat("%-4d %12.6g %10s %10s %10.4f %8.4f %9.4f%s\n", rank,
                                     cand.l2(), hidden, cand.layer(), cand.accuracy(),
                                     cand.accuracy_std(), cand.log_loss(),
                                     rank == 1 ? "  <- the version" : "");
      }
    }
    if (!last.outcome().empty()) std::cout << last.outcome() << "\n";
  }
  return last.state() == v1::Job::SUCCEEDED ? 0 : 1;
}

int Train(Client& c, const Args& a) {
  if (a.positional.size() != 1 || !a.Has("dataset")) {
    return Fail(absl::InvalidArgumentError(
        "usage: tlctl train MODEL --dataset D [--epochs N --head-lr X --lr X --optimizer "
        "lbfgs|adamw|sgd "
        "--batch-size N --weight-decay X --label-smoothing X --balanced --patience N --augment "
        "--train-batchnorm --no-head-first --no-resume --seed N --serve if-not-worse|always|never "
        "--target-precision P --sweep [--l2 X,Y,.. --folds K --heads linear,H --layers "
        "L,embedding] "
        "--constant-lr "
        "--warmup F "
        "--layer-decay X --no-gradual] [--wait]"));
  }
  v1::StartTrainingRequest req;
  req.set_model(a.positional[0]);
  req.set_dataset(a.Get("dataset"));
  v1::TrainingOptions* o = req.mutable_options();
  for (const auto& [flag, setter] :
       std::vector<std::pair<std::string, std::function<void(double)>>>{
           {"epochs", [o](double v) { o->set_epochs(static_cast<int>(v)); }},
           {"batch-size", [o](double v) { o->set_batch_size(static_cast<int>(v)); }},
           {"head-lr", [o](double v) { o->set_learning_rate(static_cast<float>(v)); }},
           {"lr", [o](double v) { o->set_stage_learning_rate(static_cast<float>(v)); }},
           {"weight-decay", [o](double v) { o->set_weight_decay(static_cast<float>(v)); }},
           {"label-smoothing", [o](double v) { o->set_label_smoothing(static_cast<float>(v)); }},
           {"patience", [o](double v) { o->set_early_stopping_patience(static_cast<int>(v)); }},
           {"validation-fraction",
            [o](double v) { o->set_validation_fraction(static_cast<float>(v)); }},
           {"seed", [o](double v) { o->set_seed(static_cast<uint64_t>(v)); }},
           {"warmup", [o](double v) { o->set_warmup_fraction(static_cast<float>(v)); }},
           {"layer-decay", [o](double v) { o->set_layer_decay(static_cast<float>(v)); }},
           {"target-precision",
            [o](double v) { o->set_target_precision(static_cast<float>(v)); }}}) {
    if (!a.Has(flag)) continue;
    auto v = a.Number(flag, 0);
    if (!v.ok()) return Fail(v.status());
    setter(*v);
  }
  const std::string opt = a.Get("optimizer");
  if (opt == "lbfgs") {
    o->set_optimizer(v1::TrainingOptions::LBFGS);
  } else if (opt == "adamw") {
    o->set_optimizer(v1::TrainingOptions::ADAMW);
  } else if (opt == "sgd") {
    o->set_optimizer(v1::TrainingOptions::SGD);
  } else if (!opt.empty()) {
    return Fail(absl::InvalidArgumentError("--optimizer is lbfgs, adamw or sgd"));
  }
  o->set_balanced_class_weights(a.Has("balanced"));
  o->set_augment(a.Has("augment"));
  if (a.Has("freeze-batchnorm") && a.Has("train-batchnorm")) {
    return Fail(absl::InvalidArgumentError("--freeze-batchnorm and --train-batchnorm conflict"));
  }
  if (a.Has("freeze-batchnorm")) o->set_freeze_batchnorm(true);
  if (a.Has("train-batchnorm")) o->set_freeze_batchnorm(false);
  if (a.Has("no-head-first")) o->set_head_first(false);
  // A restart fails the job as "interrupted" instead of resuming it.
  if (a.Has("no-resume")) o->set_resume_after_restart(false);
  if (a.Has("constant-lr")) o->set_schedule(v1::TrainingOptions::SCHEDULE_CONSTANT);
  if (a.Has("no-gradual")) o->set_gradual_unfreezing(false);
  if (a.Has("sweep")) {
    v1::SweepOptions* sw = o->mutable_sweep();
    for (absl::string_view part : absl::StrSplit(a.Get("l2"), ',', absl::SkipEmpty())) {
      double v = 0;
      if (!absl::SimpleAtod(part, &v)) {
        return Fail(absl::InvalidArgumentError(
            absl::StrCat("--l2: \"", part, "\" is not a number; e.g. --l2 0.01,0.1,1,10")));
      }
      sw->add_l2(static_cast<float>(v));
    }
    auto folds = a.Number("folds", 0);
    if (!folds.ok()) return Fail(folds.status());
    sw->set_folds(static_cast<int>(*folds));
    for (absl::string_view part : absl::StrSplit(a.Get("heads"), ',', absl::SkipEmpty())) {
      int width = 0;
      if (part == "linear") {
        width = 0;
      } else if (!absl::SimpleAtoi(part, &width) || width < 0) {
        return Fail(absl::InvalidArgumentError(
            absl::StrCat("--heads: \"", part,
                         "\" is not a head shape; e.g. --heads linear,512 (linear, or "
                         "one hidden layer of 512 units)")));
      }
      sw->add_hidden(width);
    }
    for (absl::string_view layer : absl::StrSplit(a.Get("layers"), ',', absl::SkipEmpty())) {
      sw->add_layers(std::string(layer));
    }
  }
  const std::string serve = a.Get("serve", "if-not-worse");
  if (serve == "always") {
    o->set_serve(v1::TrainingOptions::SERVE_ALWAYS);
  } else if (serve == "never") {
    o->set_serve(v1::TrainingOptions::SERVE_NEVER);
  } else if (serve != "if-not-worse") {
    return Fail(absl::InvalidArgumentError("--serve is if-not-worse, always or never"));
  }
  auto job = c.Call(&v1::Models::Stub::StartTraining, req);
  if (!job.ok()) return Fail(job.status());
  if (a.Has("wait")) return Follow(c, job->id(), a.Has("json"));
  if (a.Has("json")) {
    std::cout << JobJson(*job).dump() << "\n";
  } else {
    std::cout << "started job " << job->id() << "; follow it with: tlctl watch " << job->id()
              << "\n";
  }
  return 0;
}

int Jobs(Client& c, const Args& a) {
  v1::ListJobsRequest req;
  req.set_model(a.Get("model"));
  auto list = c.Call(&v1::Models::Stub::ListJobs, req);
  if (!list.ok()) return Fail(list.status());
  if (a.Has("json")) {
    nlohmann::json all = nlohmann::json::array();
    for (const auto& j : list->jobs()) all.push_back(JobJson(j));
    std::cout << nlohmann::json{{"jobs", all}}.dump() << "\n";
    return 0;
  }
  const bool several = SeveralTenants(list->jobs());
  for (const auto& j : list->jobs()) {
    std::cout << TenantCell(j, several) << j.id() << "\t" << j.model() << "\t" << j.dataset()
              << "\t" << StateName(j.state()) << "\t" << j.phase()
              << (j.error().empty() ? "" : "\t" + j.error()) << "\n";
  }
  return 0;
}

int Watch(Client& c, const Args& a) {
  if (a.positional.size() != 1) return Fail(absl::InvalidArgumentError("usage: tlctl watch JOB"));
  return Follow(c, a.positional[0], a.Has("json"));
}

int Cancel(Client& c, const Args& a) {
  if (a.positional.size() != 1) return Fail(absl::InvalidArgumentError("usage: tlctl cancel JOB"));
  v1::CancelJobRequest req;
  req.set_id(a.positional[0]);
  auto j = c.Call(&v1::Models::Stub::CancelJob, req);
  if (!j.ok()) return Fail(j.status());
  if (a.Has("json")) {
    std::cout << JobJson(*j).dump() << "\n";
  } else {
    std::cout << "job " << j->id() << ": " << StateName(j->state()) << "\n";
  }
  return 0;
}

}  // namespace

void AddJobCommands(std::map<std::string, Command>& commands) {
  commands["train"] = Train;
  commands["jobs"] = Jobs;
  commands["watch"] = Watch;
  commands["cancel"] = Cancel;
}

}  // namespace tlserve
