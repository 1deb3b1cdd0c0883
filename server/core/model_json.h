// The stored form of a model (its record in the Database): JSON.
#ifndef TLSERVE_SERVER_CORE_MODEL_JSON_H_
#define TLSERVE_SERVER_CORE_MODEL_JSON_H_

#include <nlohmann/json.hpp>

#include "server/core/models.h"

namespace tlserve {

nlohmann::json ModelToJson(const ModelInfo& m);
// Throws nlohmann::json::exception on a record that lacks a field.
ModelInfo ModelFromJson(const nlohmann::json& j);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_MODEL_JSON_H_
