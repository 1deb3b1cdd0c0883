// A model's classifier head: Linear (logistic regression) or a small MLP
// (Linear, ReLU, Dropout per hidden layer, then Linear), on top of the
// backbone's embedding. Weights are saved to and loaded from bytes.
#ifndef TLSERVE_SERVER_CORE_HEAD_H_
#define TLSERVE_SERVER_CORE_HEAD_H_

#include <torch/nn/modules/container/sequential.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace tlserve {

struct HeadSpec {
  std::vector<int> hidden;
  float dropout = 0;
};

absl::Status ValidateHeadSpec(const HeadSpec& spec);
torch::nn::Sequential MakeHead(const HeadSpec& spec, int64_t in_dim, int64_t classes);
int64_t ParamCount(const torch::nn::Sequential& head);
// The parameters MakeHead(spec, in_dim, classes) would have, computed
// without allocating them: checked against --max_head_params first.
int64_t HeadParams(const HeadSpec& spec, int64_t in_dim, int64_t classes);
std::string SaveHead(const torch::nn::Sequential& head);
// Loads weights into a head made with MakeHead of the same shape.
absl::Status LoadHead(const std::string& bytes, torch::nn::Sequential& head);

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_HEAD_H_
