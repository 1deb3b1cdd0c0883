// tlctl's command line: COMMAND, positional arguments and --flags.
#ifndef TLSERVE_CLIENT_TLCTL_ARGS_H_
#define TLSERVE_CLIENT_TLCTL_ARGS_H_

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace tlserve {

struct Args {
  std::string command;
  std::vector<std::string> positional;
  std::map<std::string, std::string> flags;  // --key=value, --key value, or --flag

  bool Has(const std::string& key) const { return flags.count(key) > 0; }
  std::string Get(const std::string& key, const std::string& fallback = "") const {
    auto it = flags.find(key);
    return it == flags.end() ? fallback : it->second;
  }
  // INVALID_ARGUMENT naming the flag when it is not a number.
  absl::StatusOr<double> Number(const std::string& key, double fallback) const;
};

absl::StatusOr<Args> Parse(int argc, char** argv);

// Prints "tlctl: MESSAGE [CODE]" on stderr, and a hint for UNAUTHENTICATED
// and PERMISSION_DENIED; returns the exit status 1.
int Fail(const absl::Status& s);

}  // namespace tlserve

#endif  // TLSERVE_CLIENT_TLCTL_ARGS_H_
