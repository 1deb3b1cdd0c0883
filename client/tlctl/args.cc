#include "client/tlctl/args.h"

#include <iostream>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace tlserve {
namespace {

// Flags that take a value; the others are switches.
bool TakesValue(const std::string& key) {
  static const std::set<std::string> kValued = {
      "server", "input", "layer", "pool", "out", "dataset", "classes", "hidden", "dropout", "from",
      "epochs", "lr", "head-lr", "optimizer", "batch-size", "weight-decay", "label-smoothing",
      "patience", "validation-fraction", "seed", "top-k", "version", "model",
      // evaluate, serve, thresholds, suggest, train's
      // recipe and sweep
      "versions", "split", "serve", "target-precision", "global", "class", "count", "strategy",
      "duplicate-cosine", "l2", "folds", "heads", "layers", "warmup", "layer-decay"};
  // How to reach the server; tlctl's other flags use hyphens, the server's
  // flags underscores, so these are taken in both spellings.
  static const std::set<std::string> kConnection = {"token",    "tls_ca",  "tls-ca",  "tls_cert",
                                                    "tls-cert", "tls_key", "tls-key", "lb"};
  return kValued.count(key) > 0 || kConnection.count(key) > 0;
}

}  // namespace

absl::StatusOr<double> Args::Number(const std::string& key, double fallback) const {
  auto it = flags.find(key);
  if (it == flags.end()) return fallback;
  double v = 0;
  if (!absl::SimpleAtod(it->second, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", key, " must be a number, not \"", it->second, "\""));
  }
  return v;
}

absl::StatusOr<Args> Parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) == 0) {
      std::string key = arg.substr(2), value = "true";
      if (auto eq = key.find('='); eq != std::string::npos) {
        value = key.substr(eq + 1);
        key = key.substr(0, eq);
      } else if (TakesValue(key)) {
        if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat(arg, " needs a value"));
        value = argv[++i];
      }
      a.flags[key] = value;
    } else if (a.command.empty()) {
      a.command = arg;
    } else {
      a.positional.push_back(arg);
    }
  }
  return a;
}

int Fail(const absl::Status& s) {
  std::cerr << "tlctl: " << s.message() << " [" << absl::StatusCodeToString(s.code()) << "]\n";
  if (absl::IsUnauthenticated(s)) {
    std::cerr << "tlctl: hint: the server needs an API key it knows: pass --token=KEY or set "
                 "$TLSERVE_TOKEN\n";
  } else if (absl::IsPermissionDenied(s)) {
    std::cerr << "tlctl: hint: the API key's role (read, write or admin) does not allow this; "
                 "use a key with a role that does\n";
  }
  return 1;
}

}  // namespace tlserve
