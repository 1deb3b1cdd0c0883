#include "server/core/head.h"

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/serialize.h>

#include <sstream>

#include "absl/strings/str_cat.h"

namespace tlserve {

absl::Status ValidateHeadSpec(const HeadSpec& spec) {
  if (spec.hidden.size() > 4) return absl::InvalidArgumentError("head.hidden: at most 4 layers");
  for (size_t i = 0; i < spec.hidden.size(); ++i) {
    if (spec.hidden[i] < 1 || spec.hidden[i] > 16384) {
      return absl::InvalidArgumentError(absl::StrCat("head.hidden[", i, "] must be in [1, 16384]"));
    }
  }
  if (!(spec.dropout >= 0 && spec.dropout < 1)) {
    return absl::InvalidArgumentError("head.dropout must be in [0, 1)");
  }
  return absl::OkStatus();
}

torch::nn::Sequential MakeHead(const HeadSpec& spec, int64_t in_dim, int64_t classes) {
  torch::nn::Sequential head;
  int64_t width = in_dim;
  for (int h : spec.hidden) {
    head->push_back(torch::nn::Linear(width, h));
    head->push_back(torch::nn::ReLU());
    if (spec.dropout > 0) head->push_back(torch::nn::Dropout(spec.dropout));
    width = h;
  }
  head->push_back(torch::nn::Linear(width, classes));
  return head;
}

int64_t HeadParams(const HeadSpec& spec, int64_t in_dim, int64_t classes) {
  int64_t params = 0, width = in_dim;
  for (int h : spec.hidden) {
    params += width * h + h;
    width = h;
  }
  return params + width * classes + classes;
}

int64_t ParamCount(const torch::nn::Sequential& head) {
  int64_t n = 0;
  for (const auto& p : head->parameters()) n += p.numel();
  return n;
}

std::string SaveHead(const torch::nn::Sequential& head) {
  std::ostringstream out;
  torch::save(head, out);
  return out.str();
}

absl::Status LoadHead(const std::string& bytes, torch::nn::Sequential& head) {
  try {
    std::istringstream in(bytes);
    torch::load(head, in);
  } catch (const c10::Error& e) {
    return absl::DataLossError(absl::StrCat("cannot load head weights: ", e.msg()));
  }
  return absl::OkStatus();
}

}  // namespace tlserve
