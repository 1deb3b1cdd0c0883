// A head sweep on cached features: tlserve's Sweep (every L2 value × every
// fold of a linear head stacked into one batched L-BFGS run, then the winner
// refitted) on a features file, timed. bench/sweep_bench.py makes the
// features from real images, runs this and scikit-learn's
// LogisticRegressionCV on the same files and prints the table.
//
//   sweep_bench --train=X.f32 --train_labels=Y.i64 --test=X.f32 --test_labels=Y.i64
//               --dim=D --classes=K [--folds=5] [--shuffle=false] [--threads=2]
#include <torch/torch.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "server/core/training/sweep.h"

ABSL_FLAG(std::string, train, "", "float32 N×D features");
ABSL_FLAG(std::string, train_labels, "", "int64 N labels");
ABSL_FLAG(std::string, test, "", "float32 M×D features");
ABSL_FLAG(std::string, test_labels, "", "int64 M labels");
ABSL_FLAG(int, dim, 512, "feature dimension");
ABSL_FLAG(int, classes, 10, "classes");
ABSL_FLAG(int, folds, 5, "cross-validation folds");
ABSL_FLAG(bool, shuffle, false,
          "shuffle the folds; false: scikit-learn's StratifiedKFold(shuffle=False) folds, as "
          "LogisticRegressionCV(cv=5) uses");
ABSL_FLAG(int, max_iterations, 100, "L-BFGS iterations per fit (scikit-learn's max_iter)");
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
  tlserve::SweepData data;
  data.features = {Read(absl::GetFlag(FLAGS_train), at::kFloat, d)};
  data.labels = Read(absl::GetFlag(FLAGS_train_labels), at::kLong, 1);
  data.classes = k;
  const at::Tensor xt = Read(absl::GetFlag(FLAGS_test), at::kFloat, d);
  const at::Tensor yt = Read(absl::GetFlag(FLAGS_test_labels), at::kLong, 1);
  tlserve::SweepOptions o;
  o.folds = absl::GetFlag(FLAGS_folds);
  o.shuffle = absl::GetFlag(FLAGS_shuffle);
  o.max_iterations = absl::GetFlag(FLAGS_max_iterations);
  auto r = tlserve::Sweep(data, o, nullptr, nullptr);
  if (!r.ok()) {
    std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
    return 1;
  }
  torch::NoGradGuard no_grad;
  const double test_accuracy =
      r->head->forward(xt).argmax(1).eq(yt).to(at::kDouble).mean().item<double>();
  std::string board;
  for (const tlserve::SweepEntry& e : r->leaderboard) {
    absl::StrAppendFormat(&board, "%s{\"l2\": %.6g, \"accuracy\": %.5f, \"std\": %.5f}",
                          board.empty() ? "" : ", ", e.l2, e.accuracy, e.accuracy_std);
  }
  std::printf(
      "{\"seconds\": %.4f, \"refit_seconds\": %.4f, \"l2\": %.6g, \"cv_accuracy\": %.5f, "
      "\"train_accuracy\": %.5f, \"test_accuracy\": %.5f, \"threads\": %d, \"leaderboard\": "
      "[%s]}\n",
      r->seconds, r->refit_seconds, r->leaderboard[0].l2, r->leaderboard[0].accuracy,
      r->train_accuracy, test_accuracy, at::get_num_threads(), board.c_str());
  return 0;
}
