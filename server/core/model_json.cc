#include "server/core/model_json.h"

#include <cmath>

namespace tlserve {
namespace {

// A number that may be missing (older records) or null (JSON has no NaN).
double NumberOr(const nlohmann::json& j, const char* key, double fallback) {
  auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<double>() : fallback;
}

}  // namespace

nlohmann::json ModelToJson(const ModelInfo& m) {
  nlohmann::json versions = nlohmann::json::array();
  for (const auto& v : m.versions) {
    versions.push_back({{"version", v.version},
                        {"private_stages", v.private_stages},
                        {"created_unix", v.created_unix},
                        {"job_id", v.job_id},
                        {"train_accuracy", v.train_accuracy},
                        {"validation_accuracy", v.validation.accuracy},
                        {"precision", v.validation.precision},
                        {"recall", v.validation.recall},
                        {"support", v.validation.support},
                        {"confusion", v.validation.confusion},
                        {"temperature", v.calibration.temperature},
                        {"thresholds", v.calibration.thresholds},
                        {"validation_ece_uncalibrated", v.validation_ece_uncalibrated},
                        {"validation_ece", v.validation_ece}});
    if (v.head) {
      versions.back()["head"] = {{"hidden", v.head->hidden}, {"dropout", v.head->dropout}};
    }
    if (!v.feature_layer.empty()) versions.back()["feature_layer"] = v.feature_layer;
  }
  nlohmann::json j = {{"name", m.name},
                      {"classes", m.classes},
                      {"hidden", m.head.hidden},
                      {"dropout", m.head.dropout},
                      {"versions", versions},
                      {"served_version", m.served_version},
                      {"private_stages", m.private_stages}};
  if (!m.created.empty()) j["created"] = m.created;
  return j;
}

ModelInfo ModelFromJson(const nlohmann::json& j) {
  ModelInfo m;
  m.name = j.at("name").get<std::string>();
  m.classes = j.at("classes").get<std::vector<std::string>>();
  m.head.hidden = j.at("hidden").get<std::vector<int>>();
  m.head.dropout = j.at("dropout").get<float>();
  m.served_version = j.at("served_version").get<int>();
  m.created = j.value("created", "");
  m.private_stages = j.value("private_stages", std::map<std::string, bool>{});
  for (const auto& v : j.at("versions")) {
    VersionInfo vi;
    vi.version = v.at("version").get<int>();
    vi.private_stages = v.value("private_stages", std::vector<std::string>{});
    vi.created_unix = v.at("created_unix").get<int64_t>();
    vi.job_id = v.at("job_id").get<std::string>();
    vi.train_accuracy = v.at("train_accuracy").get<double>();
    vi.validation.accuracy = v.at("validation_accuracy").get<double>();
    vi.validation.precision = v.at("precision").get<std::vector<double>>();
    vi.validation.recall = v.at("recall").get<std::vector<double>>();
    vi.validation.support = v.at("support").get<std::vector<int64_t>>();
    vi.validation.confusion = v.at("confusion").get<std::vector<int64_t>>();
    // Versions made before calibration: temperature 1, no thresholds. A
    // temperature or thresholds that cannot be right are dropped (a damaged
    // record must not index past the classes).
    vi.calibration.temperature = NumberOr(v, "temperature", 1.0);
    if (!(vi.calibration.temperature > 0 && std::isfinite(vi.calibration.temperature))) {
      vi.calibration.temperature = 1;
    }
    if (auto t = v.find("thresholds"); t != v.end() && t->is_array()) {
      for (const auto& x : *t) {
        vi.calibration.thresholds.push_back(x.is_number() ? x.get<float>() : 2.0f);
      }
    }
    bool valid = vi.calibration.thresholds.size() == m.classes.size();
    for (float x : vi.calibration.thresholds) valid = valid && x >= 0 && x <= 1;
    if (!valid) vi.calibration.thresholds.clear();
    vi.validation_ece_uncalibrated = NumberOr(v, "validation_ece_uncalibrated", 0.0);
    vi.validation_ece = NumberOr(v, "validation_ece", 0.0);
    vi.feature_layer = v.value("feature_layer", "");
    if (auto h = v.find("head"); h != v.end() && h->is_object()) {
      // Checked where the version is loaded (a bad one is the model's problem).
      vi.head = HeadSpec{h->at("hidden").get<std::vector<int>>(), h->at("dropout").get<float>()};
    }
    m.versions.push_back(std::move(vi));
  }
  return m;
}

}  // namespace tlserve
