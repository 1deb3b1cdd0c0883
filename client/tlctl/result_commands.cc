// tlctl's commands about results: evaluate (and compare versions), serve
// (promote, roll back), thresholds ("unknown" below a confidence) and suggest
// (which unlabelled images to label next).
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "client/tlctl/format.h"
#include "client/tlctl/model_commands.h"

namespace tlserve {
namespace {

// A progress bar made when the server first says how many images there are.
std::function<void(int64_t, int64_t)> Progress(const char* label,
                                               std::unique_ptr<ProgressBar>* bar) {
  return [label, bar](int64_t done, int64_t total) {
    if (total <= 0) return;
    if (!*bar) *bar = std::make_unique<ProgressBar>(label, static_cast<size_t>(total));
    (*bar)->Update(static_cast<size_t>(done));
  };
}

absl::StatusOr<std::vector<int>> Versions(const Args& a) {
  std::vector<int> out;
  const std::string list = a.Has("versions") ? a.Get("versions") : a.Get("version");
  if (list.empty()) return out;
  for (absl::string_view part : absl::StrSplit(list, ',', absl::SkipEmpty())) {
    int v = 0;
    if (!absl::SimpleAtoi(part, &v) || v < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--versions: \"", part, "\" is not a version number (1, 2, ...); e.g. --versions 1,2"));
    }
    out.push_back(v);
  }
  return out;
}

nlohmann::json EvaluationJson(const v1::VersionEvaluation& e, int classes) {
  nlohmann::json per_class = nlohmann::json::array(), confusion = nlohmann::json::array();
  for (const auto& c : e.classes()) {
    per_class.push_back({{"label", c.label()},
                         {"precision", c.precision()},
                         {"recall", c.recall()},
                         {"f1", c.f1()},
                         {"support", c.support()}});
  }
  for (int r = 0; r < classes; ++r) {
    std::vector<int64_t> row;
    for (int c = 0; c < classes && r * classes + c < e.confusion_size(); ++c) {
      row.push_back(e.confusion(r * classes + c));
    }
    confusion.push_back(row);
  }
  nlohmann::json out = {{"version", e.version()},         {"images", e.images()},
                        {"accuracy", e.accuracy()},       {"top5_accuracy", e.top5_accuracy()},
                        {"log_loss", e.log_loss()},       {"ece", e.ece()},
                        {"temperature", e.temperature()}, {"classes", per_class},
                        {"confusion", confusion}};
  if (!e.thresholds().empty()) {  // with --target-precision
    out["thresholds"] = std::map<std::string, float>(e.thresholds().begin(), e.thresholds().end());
    out["coverage"] = e.coverage();
    out["precision_at_thresholds"] = e.precision_at_thresholds();
  }
  return out;
}

void PrintEvaluation(const v1::EvaluateResponse& r) {
  std::cout << absl::StrFormat("%-8s %8s %9s %9s %9s %7s\n", "version", "images", "accuracy",
                               "top-5", "log loss", "ECE");
  for (const auto& e : r.evaluations()) {
    std::cout << absl::StrFormat("v%-7d %8d %9.4f %9.4f %9.4f %7.4f\n", e.version(), e.images(),
                                 e.accuracy(), e.top5_accuracy(), e.log_loss(), e.ece());
  }
  for (const auto& c : r.comparisons()) {
    std::cout << absl::StrFormat("v%d vs v%d: only v%d right on %d, only v%d right on %d: %s\n",
                                 c.version_a(), c.version_b(), c.version_a(), c.only_a_correct(),
                                 c.version_b(), c.only_b_correct(), c.verdict());
  }
  if (r.evaluations_size() != 1) return;
  const v1::VersionEvaluation& e = r.evaluations(0);
  std::cout << absl::StrFormat("\n%-24s %9s %9s %9s %8s\n", "class", "precision", "recall", "f1",
                               "support");
  for (const auto& c : e.classes()) {
    std::cout << absl::StrFormat("%-24s %9.4f %9.4f %9.4f %8d", c.label(), c.precision(),
                                 c.recall(), c.f1(), c.support());
    if (auto t = e.thresholds().find(c.label()); t != e.thresholds().end()) {
      std::cout << absl::StrFormat("  threshold %.4f", t->second);
    }
    std::cout << "\n";
  }
  if (!e.thresholds().empty()) {
    std::cout << absl::StrFormat(
        "under those thresholds %.1f%% of the images get a label, %.2f%% of them right\n",
        100 * e.coverage(), 100 * e.precision_at_thresholds());
  }
  const int n = r.classes_size();
  std::cout << "\nconfusion (rows: true class, columns: predicted, in the order above)\n";
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n && i * n + j < e.confusion_size(); ++j) {
      std::cout << absl::StrFormat("%7d", e.confusion(i * n + j));
    }
    std::cout << "  " << r.classes(i) << "\n";
  }
}

// --split for Evaluate; `fallback` when not given.
absl::StatusOr<v1::Split> SplitOf(const Args& a, const char* fallback) {
  const std::string split = a.Get("split", fallback);
  if (split == "all") return v1::SPLIT_ALL;
  if (split == "validation") return v1::SPLIT_VALIDATION;
  if (split == "train") return v1::SPLIT_TRAIN;
  return absl::InvalidArgumentError("--split: use all, validation or train");
}

int Evaluate(Client& c, const Args& a) {
  if (a.positional.size() != 1 || !a.Has("dataset")) {
    return Fail(absl::InvalidArgumentError(
        "usage: tlctl evaluate MODEL --dataset D [--version V | --versions 1,2,3] "
        "[--split all|validation|train] [--validation-fraction F] [--target-precision P]"));
  }
  auto versions = Versions(a);
  if (!versions.ok()) return Fail(versions.status());
  auto target = a.Number("target-precision", 0);
  if (!target.ok()) return Fail(target.status());
  v1::EvaluateRequest req;
  req.set_target_precision(*target);
  if (a.Has("validation-fraction")) {
    auto fraction = a.Number("validation-fraction", 0.15);
    if (!fraction.ok()) return Fail(fraction.status());
    req.set_validation_fraction(static_cast<float>(*fraction));
  }
  req.set_model(a.positional[0]);
  req.set_dataset(a.Get("dataset"));
  for (int v : *versions) req.add_versions(v);
  auto split = SplitOf(a, "all");
  if (!split.ok()) return Fail(split.status());
  req.set_split(*split);
  std::unique_ptr<ProgressBar> bar;
  auto r = c.Evaluate(req, Progress("evaluating", &bar));
  if (bar) bar->Finish();
  if (!r.ok()) return Fail(r.status());
  if (!a.Has("json")) {
    PrintEvaluation(*r);
    return 0;
  }
  const int n = r->classes_size();
  if (r->evaluations_size() == 1) {
    std::cout << EvaluationJson(r->evaluations(0), n).dump() << "\n";
    return 0;
  }
  nlohmann::json evaluations = nlohmann::json::array(), comparisons = nlohmann::json::array();
  for (const auto& e : r->evaluations()) evaluations.push_back(EvaluationJson(e, n));
  for (const auto& cmp : r->comparisons()) {
    comparisons.push_back({{"version_a", cmp.version_a()},
                           {"version_b", cmp.version_b()},
                           {"only_a_correct", cmp.only_a_correct()},
                           {"only_b_correct", cmp.only_b_correct()},
                           {"p_value", cmp.p_value()},
                           {"verdict", cmp.verdict()}});
  }
  std::cout << nlohmann::json{{"evaluations", evaluations}, {"comparisons", comparisons}}.dump()
            << "\n";
  return 0;
}

int Serve(Client& c, const Args& a) {
  auto version = a.Number("version", 0);
  if (a.positional.size() != 1 || !version.ok() || *version < 1) {
    return Fail(absl::InvalidArgumentError("usage: tlctl serve MODEL --version V"));
  }
  v1::SetServedVersionRequest req;
  req.set_model(a.positional[0]);
  req.set_version(static_cast<int>(*version));
  auto m = c.Call(&v1::Models::Stub::SetServedVersion, req);
  if (!m.ok()) return Fail(m.status());
  if (a.Has("json")) {
    std::cout << nlohmann::json{{"model", m->name()}, {"served_version", m->served_version()}}
              << "\n";
  } else {
    std::cout << m->name() << ": serving v" << m->served_version() << "\n";
  }
  return 0;
}

// tlctl thresholds --target-precision: Evaluate chooses per-class thresholds
// for the precision on the dataset's images (with a progress bar); they are
// then set on the version that was evaluated.
absl::StatusOr<v1::SetThresholdsRequest> ThresholdsForTarget(Client& c, const Args& a,
                                                             int version) {
  auto target = a.Number("target-precision", 0);
  if (!target.ok()) return target.status();
  if (!(*target > 0 && *target < 1)) {
    return absl::InvalidArgumentError("--target-precision must be in (0, 1), e.g. 0.95");
  }
  if (!a.Has("dataset")) {
    return absl::InvalidArgumentError(
        "--target-precision needs --dataset D: the labelled images to choose the thresholds on");
  }
  auto split = SplitOf(a, "validation");
  if (!split.ok()) return split.status();
  v1::EvaluateRequest req;
  req.set_model(a.positional[0]);
  req.set_dataset(a.Get("dataset"));
  if (version > 0) req.add_versions(version);
  req.set_split(*split);
  req.set_target_precision(*target);
  if (a.Has("validation-fraction")) {
    auto fraction = a.Number("validation-fraction", 0.15);
    if (!fraction.ok()) return fraction.status();
    req.set_validation_fraction(static_cast<float>(*fraction));
  }
  std::unique_ptr<ProgressBar> bar;
  auto r = c.Evaluate(req, Progress("choosing thresholds", &bar));
  if (bar) bar->Finish();
  if (!r.ok()) return r.status();
  if (r->evaluations_size() != 1) return absl::InternalError("Evaluate answered no evaluation");
  const v1::VersionEvaluation& e = r->evaluations(0);
  if (e.thresholds().empty()) return absl::InternalError("Evaluate answered no thresholds");
  if (!a.Has("json")) {
    std::cout << absl::StrFormat(
        "on %d images of %s (%s): %.1f%% get a label, %.2f%% of those right (target %.2f%%)\n",
        e.images(), req.dataset(), a.Get("split", "validation"), 100 * e.coverage(),
        100 * e.precision_at_thresholds(), 100 * *target);
  }
  v1::SetThresholdsRequest set;
  set.set_model(req.model());
  set.set_version(e.version());
  for (const auto& [label, t] : e.thresholds()) (*set.mutable_per_class())[label] = t;
  return set;
}

int Thresholds(Client& c, const Args& a) {
  auto version = a.Number("version", 0);
  auto global = a.Number("global", -1);
  if (a.positional.size() != 1 || !version.ok() || !global.ok() ||
      (a.Has("global") + a.Has("class") + a.Has("clear") + a.Has("target-precision")) != 1) {
    return Fail(absl::InvalidArgumentError(
        "usage: tlctl thresholds MODEL [--version V] (--global P | --class LABEL=P,LABEL=P | "
        "--target-precision P --dataset D [--split validation|all|train] [--validation-fraction F] "
        "| "
        "--clear)"));
  }
  v1::SetThresholdsRequest req;
  if (a.Has("target-precision")) {
    auto chosen = ThresholdsForTarget(c, a, static_cast<int>(*version));
    if (!chosen.ok()) return Fail(chosen.status());
    req = *std::move(chosen);
  }
  req.set_model(a.positional[0]);
  if (req.version() == 0) req.set_version(static_cast<int>(*version));
  if (a.Has("global")) req.set_global(static_cast<float>(*global));
  for (absl::string_view pair : absl::StrSplit(a.Get("class"), ',', absl::SkipEmpty())) {
    std::pair<std::string, std::string> kv = absl::StrSplit(pair, absl::MaxSplits('=', 1));
    float p = 0;
    if (!absl::SimpleAtof(kv.second, &p)) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("--class: \"", pair, "\" is not LABEL=PROBABILITY")));
    }
    (*req.mutable_per_class())[kv.first] = p;
  }
  auto m = c.Call(&v1::Models::Stub::SetThresholds, req);
  if (!m.ok()) return Fail(m.status());
  const int v = req.version() > 0 ? req.version() : m->served_version();
  for (const auto& mv : m->versions()) {
    if (mv.version() != v) continue;
    if (a.Has("json")) {
      std::cout << nlohmann::json{{"model", m->name()},
                                  {"version", v},
                                  {"thresholds", std::vector<float>(mv.thresholds().begin(),
                                                                    mv.thresholds().end())}}
                << "\n";
    } else if (mv.thresholds().empty()) {
      std::cout << m->name() << " v" << v << ": no thresholds\n";
    } else {
      std::cout << m->name() << " v" << v << " thresholds:\n";
      for (int i = 0; i < mv.thresholds_size() && i < m->classes_size(); ++i) {
        std::cout << absl::StrFormat("  %-24s %.4f\n", m->classes(i), mv.thresholds(i));
      }
    }
  }
  return 0;
}

int Suggest(Client& c, const Args& a) {
  auto count = a.Number("count", 10);
  auto version = a.Number("version", 0);
  auto cosine = a.Number("duplicate-cosine", 0.95);
  if (a.positional.size() != 1 || !a.Has("dataset") || !count.ok() || !version.ok() ||
      !cosine.ok()) {
    return Fail(absl::InvalidArgumentError(
        "usage: tlctl suggest MODEL --dataset POOL [--count K] [--strategy margin|entropy] "
        "[--duplicate-cosine X] [--version V]"));
  }
  v1::SuggestLabelsRequest req;
  req.set_model(a.positional[0]);
  req.set_dataset(a.Get("dataset"));
  req.set_count(static_cast<int>(*count));
  req.set_version(static_cast<int>(*version));
  req.set_duplicate_cosine(static_cast<float>(*cosine));
  const std::string strategy = a.Get("strategy", "margin");
  if (strategy == "entropy") {
    req.set_strategy(v1::UNCERTAINTY_ENTROPY);
  } else if (strategy != "margin") {
    return Fail(absl::InvalidArgumentError("--strategy: use margin or entropy"));
  }
  std::unique_ptr<ProgressBar> bar;
  auto r = c.SuggestLabels(req, Progress("ranking", &bar));
  if (bar) bar->Finish();
  if (!r.ok()) return Fail(r.status());
  if (a.Has("json")) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& s : r->suggestions()) {
      nlohmann::json top = nlohmann::json::array();
      for (const auto& t : s.top()) {
        top.push_back({{"label", t.label()}, {"probability", t.probability()}});
      }
      list.push_back(
          {{"name", s.name()}, {"margin", s.margin()}, {"entropy", s.entropy()}, {"top", top}});
    }
    std::cout << nlohmann::json{{"suggestions", list},
                                {"duplicates_skipped", r->duplicates_skipped()}}
                     .dump()
              << "\n";
    return 0;
  }
  std::cout << absl::StrFormat("%-40s %8s  %s\n", "image", "margin", "top labels");
  for (const auto& s : r->suggestions()) {
    std::string top;
    for (const auto& t : s.top()) {
      absl::StrAppend(&top, top.empty() ? "" : ", ", t.label(),
                      absl::StrFormat(" %.3f", t.probability()));
    }
    std::cout << absl::StrFormat("%-40s %8.4f  %s\n", s.name(), s.margin(), top);
  }
  std::cout << r->duplicates_skipped() << " near-duplicates skipped\n";
  return 0;
}

}  // namespace

void AddResultCommands(std::map<std::string, Command>& commands) {
  commands["evaluate"] = Evaluate;
  commands["serve"] = Serve;
  commands["thresholds"] = Thresholds;
  commands["suggest"] = Suggest;
}

}  // namespace tlserve
