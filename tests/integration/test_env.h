// What every server-starting test shares: the device it runs the server on
// ($TLSERVE_TEST_DEVICE, default cpu; `TLSERVE_TEST_DEVICE=cuda ctest` runs
// the integration suite on the GPU) and free loopback ports.
#ifndef TLSERVE_TESTS_INTEGRATION_TEST_ENV_H_
#define TLSERVE_TESTS_INTEGRATION_TEST_ENV_H_

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <mutex>
#include <set>
#include <string>

namespace tlserve::testing {

// The --device of every server a test starts: $TLSERVE_TEST_DEVICE, or cpu.
inline std::string TestDevice() {
  const char* device = std::getenv("TLSERVE_TEST_DEVICE");
  return device != nullptr && *device != '\0' ? device : "cpu";
}

// A loopback port that was free a moment ago, for servers that must be given
// a concrete port (a process, or a metrics address: prometheus-cpp's exposer
// refused 127.0.0.1:0 on the GPU machine). Never the same port twice in one
// test process, so that two servers set up before either starts do not collide.
inline int FreePort() {
  static std::mutex mu;
  static std::set<int> given;
  std::lock_guard<std::mutex> lock(mu);
  for (int attempt = 0; attempt < 100; ++attempt) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) std::abort();
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
                    ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
    ::close(fd);
    if (!ok) std::abort();
    const int port = ntohs(addr.sin_port);
    if (given.insert(port).second) return port;
  }
  std::abort();
}

}  // namespace tlserve::testing

#endif  // TLSERVE_TESTS_INTEGRATION_TEST_ENV_H_
