#include "client/tlctl/model_commands.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/lib/image_files.h"
#include "client/tlctl/format.h"

namespace tlserve {
namespace {

nlohmann::json ModelJson(const v1::Model& m) {
  nlohmann::json stages = nlohmann::json::array(), versions = nlohmann::json::array();
  for (const auto& s : m.stages()) {
    stages.push_back({{"name", s.name()},
                      {"private", s.private_()},
                      {"trainable", s.trainable()},
                      {"params", s.params()}});
  }
  for (const auto& v : m.versions()) {
    nlohmann::json classes = nlohmann::json::array();
    for (const auto& c : v.classes()) {
      classes.push_back({{"label", c.label()},
                         {"precision", c.precision()},
                         {"recall", c.recall()},
                         {"support", c.support()}});
    }
    versions.push_back(
        {{"version", v.version()},
         {"created_unix", v.created_unix()},
         {"job", v.job_id()},
         {"train_accuracy", v.train_accuracy()},
         {"validation_accuracy", v.validation_accuracy()},
         {"classes", classes},
         {"confusion", std::vector<int64_t>(v.confusion().begin(), v.confusion().end())},
         {"temperature", v.temperature()},
         {"validation_ece", v.validation_ece()},
         {"validation_ece_uncalibrated", v.validation_ece_uncalibrated()},
         {"thresholds", std::vector<float>(v.thresholds().begin(), v.thresholds().end())},
         {"hidden", std::vector<int>(v.head().hidden().begin(), v.head().hidden().end())},
         {"feature_layer", v.feature_layer()},
         {"head_params", v.head_params()}});
  }
  nlohmann::json out = {
      {"name", m.name()},
      {"classes", std::vector<std::string>(m.classes().begin(), m.classes().end())},
      {"head_params", m.head_params()},
      {"served_version", m.served_version()},
      {"training", m.training()},
      {"problem", m.problem()},
      {"stages", stages},
      {"versions", versions}};
  if (const std::string t = TenantOf(m); !t.empty()) out["tenant"] = t;
  return out;
}

void PrintModel(const v1::Model& m) {
  std::cout << m.name() << ": " << m.classes_size() << " classes, head "
            << WithCommas(m.head_params()) << " params, served version " << m.served_version()
            << (m.training() ? " (training)" : "") << "\n";
  if (!m.problem().empty()) std::cout << "  PROBLEM: " << m.problem() << "\n";
  std::cout << "  stages:\n";
  for (const auto& s : m.stages()) {
    std::cout << absl::StrFormat("    %-10s %-8s %-10s %s\n", s.name(),
                                 s.private_() ? "private" : "shared",
                                 s.trainable() ? "trainable" : "frozen", WithCommas(s.params()));
  }
  for (const auto& v : m.versions()) {
    std::cout << absl::StrFormat("  v%d: train accuracy %.4f, validation accuracy %.4f (job %s)\n",
                                 v.version(), v.train_accuracy(), v.validation_accuracy(),
                                 v.job_id());
    std::cout << absl::StrFormat(
        "      temperature %.4g, validation ECE %.4f (uncalibrated %.4f)%s\n", v.temperature(),
        v.validation_ece(), v.validation_ece_uncalibrated(),
        v.thresholds().empty() ? "" : ", with confidence thresholds");
    if (!v.feature_layer().empty() || v.head().hidden_size() > 0) {
      std::string hidden = "linear";
      if (v.head().hidden_size() > 0)
        hidden = absl::StrCat("hidden ", absl::StrJoin(v.head().hidden(), ","));
      std::cout << absl::StrFormat("      head: %s on %s, %s params\n", hidden,
                                   v.feature_layer().empty() ? "the embedding" : v.feature_layer(),
                                   WithCommas(v.head_params()));
    }
  }
}

// Prints a model returned by a call, as JSON or as text; the exit status.
int ShowModel(const absl::StatusOr<v1::Model>& m, const Args& a) {
  if (!m.ok()) return Fail(m.status());
  if (a.Has("json")) {
    std::cout << ModelJson(*m).dump() << "\n";
  } else {
    PrintModel(*m);
  }
  return 0;
}

int CreateModel(Client& c, const Args& a) {
  if (a.positional.size() != 1 || (a.Has("dataset") == a.Has("classes"))) {
    return Fail(
        absl::InvalidArgumentError("usage: tlctl create-model NAME (--dataset D | --classes a,b,c) "
                                   "[--hidden 256,64 --dropout 0.2]"));
  }
  v1::CreateModelRequest req;
  req.set_name(a.positional[0]);
  req.set_dataset(a.Get("dataset"));
  if (a.Has("classes")) {
    for (absl::string_view cl : absl::StrSplit(a.Get("classes"), ','))
      req.add_classes(std::string(cl));
  }
  if (a.Has("hidden")) {
    for (absl::string_view h : absl::StrSplit(a.Get("hidden"), ',')) {
      int v = 0;
      if (!absl::SimpleAtoi(h, &v))
        return Fail(absl::InvalidArgumentError("--hidden is a list of widths, e.g. 256,64"));
      req.mutable_head()->add_hidden(v);
    }
  }
  auto dropout = a.Number("dropout", 0);
  if (!dropout.ok()) return Fail(dropout.status());
  req.mutable_head()->set_dropout(static_cast<float>(*dropout));
  return ShowModel(c.Call(&v1::Models::Stub::CreateModel, req), a);
}

int Models(Client& c, const Args& a) {
  auto list = c.Call(&v1::Models::Stub::ListModels, v1::ListModelsRequest());
  if (!list.ok()) return Fail(list.status());
  if (a.Has("json")) {
    nlohmann::json all = nlohmann::json::array();
    for (const auto& m : list->models()) all.push_back(ModelJson(m));
    std::cout << nlohmann::json{{"models", all}}.dump() << "\n";
    return 0;
  }
  const bool several = SeveralTenants(list->models());
  for (const auto& m : list->models()) {
    std::cout << TenantCell(m, several) << m.name() << "\t" << m.classes_size()
              << " classes\tserved v" << m.served_version() << (m.training() ? "\ttraining" : "")
              << (m.problem().empty() ? "" : "\tDAMAGED: " + m.problem()) << "\n";
  }
  return 0;
}

int DescribeModel(Client& c, const Args& a) {
  if (a.positional.size() != 1)
    return Fail(absl::InvalidArgumentError("usage: tlctl describe-model MODEL"));
  v1::GetModelRequest req;
  req.set_name(a.positional[0]);
  return ShowModel(c.Call(&v1::Models::Stub::GetModel, req), a);
}

int DeleteModel(Client& c, const Args& a) {
  if (a.positional.size() != 1)
    return Fail(absl::InvalidArgumentError("usage: tlctl delete-model MODEL"));
  v1::DeleteModelRequest req;
  req.set_name(a.positional[0]);
  auto r = c.Call(&v1::Models::Stub::DeleteModel, req);
  if (!r.ok()) return Fail(r.status());
  if (!a.Has("json")) std::cout << "deleted model " << a.positional[0] << "\n";
  return 0;
}

template <typename Request>
int ChangeStages(Client& c, const Args& a, bool unfreeze) {
  if (a.positional.empty() || (a.positional.size() == 1 && !a.Has("from"))) {
    return Fail(absl::InvalidArgumentError(
        unfreeze ? "usage: tlctl unfreeze MODEL STAGE... | --from STAGE"
                 : "usage: tlctl freeze MODEL STAGE... | --from STAGE [--drop]"));
  }
  Request req;
  req.set_model(a.positional[0]);
  for (size_t i = 1; i < a.positional.size(); ++i) req.add_stages(a.positional[i]);
  req.set_from(a.Get("from"));
  if constexpr (std::is_same_v<Request, v1::FreezeLayersRequest>) {
    req.set_drop_private(a.Has("drop"));
    return ShowModel(c.Call(&v1::Models::Stub::FreezeLayers, req), a);
  } else {
    return ShowModel(c.Call(&v1::Models::Stub::UnfreezeLayers, req), a);
  }
}

int Classify(Client& c, const Args& a) {
  if (a.positional.size() < 2) {
    return Fail(absl::InvalidArgumentError(
        "usage: tlctl classify MODEL FILE|DIR... [--top-k K] [--version V]"));
  }
  auto files = ListImageFiles({a.positional.begin() + 1, a.positional.end()});
  if (!files.ok()) return Fail(files.status());
  auto top_k = a.Number("top-k", 5);
  auto version = a.Number("version", 0);
  if (!top_k.ok()) return Fail(top_k.status());
  if (!version.ok()) return Fail(version.status());
  nlohmann::json predictions = nlohmann::json::array();
  int failed = 0;
  size_t seen = 0;
  ProgressBar bar("classifying", files->size());
  absl::Status s = c.StreamClassify(
      a.positional[0], static_cast<int>(*version), static_cast<int>(*top_k), files->size(), 16,
      [&](size_t i) { return ReadImage((*files)[i]); },
      [&](const v1::ClassifyResult& r) {
        bar.Update(++seen);
        if (r.has_error()) {
          ++failed;
          std::cerr << "tlctl: " << r.error().message() << "\n";
          return;
        }
        nlohmann::json top = nlohmann::json::array();
        for (const auto& p : r.classification().top()) {
          top.push_back({{"label", p.label()}, {"probability", p.probability()}});
        }
        predictions.push_back({{"name", r.name()},
                               {"label", r.classification().label()},
                               {"unknown", r.classification().unknown()},
                               {"top", top}});
        if (!a.Has("json")) {
          std::cout << r.name() << ":";
          if (r.classification().unknown()) std::cout << " unknown (below the threshold):";
          for (const auto& p : r.classification().top()) {
            std::cout << absl::StrFormat(" %s %.4f", p.label(), p.probability());
          }
          std::cout << "\n";
        }
      });
  bar.Finish();
  if (!s.ok()) return Fail(s);
  if (a.Has("json")) std::cout << nlohmann::json{{"predictions", predictions}}.dump() << "\n";
  return failed > 0 ? 1 : 0;
}

int Export(Client& c, const Args& a) {
  if (a.positional.size() != 1 || !a.Has("out")) {
    return Fail(
        absl::InvalidArgumentError("usage: tlctl export MODEL --out FILE.pt [--version V]"));
  }
  auto version = a.Number("version", 0);
  if (!version.ok()) return Fail(version.status());
  std::unique_ptr<ProgressBar> bar;
  auto info = c.ExportModel(a.positional[0], static_cast<int>(*version), a.Get("out"),
                            [&](int64_t done, int64_t total) {
                              if (!bar) bar = std::make_unique<ProgressBar>("downloading", total);
                              bar->Update(static_cast<size_t>(done));
                            });
  if (bar) bar->Finish();
  if (!info.ok()) return Fail(info.status());
  if (a.Has("json")) {
    std::cout << nlohmann::json{{"model", info->model()},   {"version", info->version()},
                                {"path", a.Get("out")},     {"size_bytes", info->size_bytes()},
                                {"sha256", info->sha256()}, {"classes", info->classes()},
                                {"crop", info->crop()}}
                     .dump()
              << "\n";
  } else {
    std::cout << absl::StrFormat(
        "exported %s v%d to %s (%.1f MB, sha256 %s): TorchScript, input N×3×%d×%d normalised "
        "as preprocess.json says, output logits over %d classes (classes.json)\n",
        info->model(), info->version(), a.Get("out"), info->size_bytes() / 1e6,
        info->sha256().substr(0, 12), info->crop(), info->crop(), info->classes_size());
  }
  return 0;
}

}  // namespace

void AddModelCommands(std::map<std::string, Command>& commands) {
  commands["create-model"] = CreateModel;
  commands["models"] = Models;
  commands["describe-model"] = DescribeModel;
  commands["delete-model"] = DeleteModel;
  commands["unfreeze"] = [](Client& c, const Args& a) {
    return ChangeStages<v1::UnfreezeLayersRequest>(c, a, true);
  };
  commands["freeze"] = [](Client& c, const Args& a) {
    return ChangeStages<v1::FreezeLayersRequest>(c, a, false);
  };
  AddJobCommands(commands);
  AddResultCommands(commands);
  commands["classify"] = Classify;
  commands["export"] = Export;
}

}  // namespace tlserve
