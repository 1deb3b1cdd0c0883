// Runs the real tlserve binary for tests that signal or kill it.
#ifndef TLSERVE_TESTS_INTEGRATION_SERVER_PROCESS_H_
#define TLSERVE_TESTS_INTEGRATION_SERVER_PROCESS_H_

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/lib/client.h"
#include "tests/integration/test_env.h"

namespace tlserve::testing {

// $TLSERVE_BIN/tlserve on a free loopback port with `data_dir`, stderr to `log`,
// on TestDevice() ($TLSERVE_TEST_DEVICE, default cpu), metrics off.
class ServerProcess {
 public:
  ServerProcess(const std::string& backbone, const std::string& data_dir, const std::string& log,
                std::vector<std::string> extra = {})
      : port_(FreePort()) {
    const char* bin = std::getenv("TLSERVE_BIN");
    const std::string server = std::string(bin ? bin : ".") + "/tlserve";
    std::vector<std::string> args = {server,
                                     "--backbone=" + backbone,
                                     absl::StrCat("--port=", port_),
                                     "--data_dir=" + data_dir,
                                     "--metrics_port=0",
                                     "--device=" + TestDevice(),
                                     "--host=127.0.0.1",
                                     "--min_free_disk_mb=32"};
    args.insert(args.end(), extra.begin(), extra.end());
    pid_ = ::fork();
    if (pid_ == 0) {
      std::freopen(log.c_str(), "a", stderr);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(server.c_str(), argv.data());
      std::_Exit(127);
    }
  }
  ~ServerProcess() {
    if (pid_ > 0 && !waited_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  int port() const { return port_; }
  pid_t pid() const { return pid_; }
  absl::StatusOr<std::unique_ptr<Client>> Connect() const {
    return Client::Connect(absl::StrCat("127.0.0.1:", port_), absl::Seconds(60));
  }
  void Signal(int sig) const { ::kill(pid_, sig); }
  // The exit status, or 128 + the signal that ended it.
  int Wait() {
    int status = 0;
    ::waitpid(pid_, &status, 0);
    waited_ = true;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

 private:
  int port_;
  pid_t pid_ = -1;
  bool waited_ = false;
};

}  // namespace tlserve::testing

#endif  // TLSERVE_TESTS_INTEGRATION_SERVER_PROCESS_H_
