// Head training on cached features: tlserve's TrainHead (float32 full-batch
// L-BFGS, or AdamW) on a features file, timed. bench/head_bench.py makes the
// data, runs this and scikit-learn on the same files and prints the table.
//
//   head_bench --train=X.f32 --train_labels=Y.i64 --test=X.f32 --test_labels=Y.i64
//              --dim=D --classes=K [--weight_decay=1] [--device=cpu]
#include <torch/torch.h>

#include <cstdio>
#include <fstream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/time/clock.h"
#include "server/core/head_trainer.h"

ABSL_FLAG(std::string, train, "", "float32 N×D features");
ABSL_FLAG(std::string, train_labels, "", "int64 N labels");
ABSL_FLAG(std::string, test, "", "float32 M×D features");
ABSL_FLAG(std::string, test_labels, "", "int64 M labels");
ABSL_FLAG(int, dim, 512, "feature dimension");
ABSL_FLAG(int, classes, 10, "classes");
ABSL_FLAG(double, weight_decay, 1.0, "L2 penalty; 1 is scikit-learn's C=1");
ABSL_FLAG(int, threads, 0, "intra-op threads (0: LibTorch's default)");

namespace {

at::Tensor Read(const std::string& path, at::ScalarType type, int64_t cols) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  const auto bytes = static_cast<int64_t>(in.tellg());
  in.seekg(0);
  const int64_t elem = type == at::kFloat ? 4 : 8;
  at::Tensor t = at::empty({bytes / elem / cols, cols}, type);
  in.read(static_cast<char*>(t.data_ptr()), bytes);
  return cols == 1 ? t.view({-1}) : t;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_threads) > 0) at::set_num_threads(absl::GetFlag(FLAGS_threads));
  const int64_t d = absl::GetFlag(FLAGS_dim), k = absl::GetFlag(FLAGS_classes);
  const at::Tensor x = Read(absl::GetFlag(FLAGS_train), at::kFloat, d);
  const at::Tensor y = Read(absl::GetFlag(FLAGS_train_labels), at::kLong, 1);
  const at::Tensor xt = Read(absl::GetFlag(FLAGS_test), at::kFloat, d);
  const at::Tensor yt = Read(absl::GetFlag(FLAGS_test_labels), at::kLong, 1);
  tlserve::TrainOptions o;
  o.weight_decay = static_cast<float>(absl::GetFlag(FLAGS_weight_decay));
  auto resolved = tlserve::ResolveTrainOptions(o, tlserve::HeadSpec{}, false);
  if (!resolved.ok()) return 2;
  const absl::Time start = absl::Now();
  // No validation split: like scikit-learn, fit on all training data.
  auto r = tlserve::TrainHead(tlserve::HeadSpec{}, k, x, y, at::empty({0, d}),
                              at::empty({0}, at::kLong), *resolved, nullptr, nullptr);
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  if (!r.ok()) {
    std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
    return 1;
  }
  const auto test = tlserve::Evaluate(r->head, xt, yt, k);
  std::printf(
      "{\"seconds\": %.4f, \"epochs\": %zu, \"train_accuracy\": %.5f, \"test_accuracy\": %.5f, "
      "\"threads\": %d}\n",
      seconds, r->history.size(), r->train.accuracy, test.accuracy, at::get_num_threads());
  return 0;
}
