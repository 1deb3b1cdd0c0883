// Runs the real tlserve binary and stops it with SIGTERM while a call is in
// flight: the call must finish, health must leave SERVING, the exit code is 0.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "client/lib/client.h"
#include "tests/test_util.h"

namespace tlserve {
namespace {

using ::tlserve::testing::Fixture;
using ::tlserve::testing::ReadBytes;

int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

TEST(DrainTest, SigtermFinishesInFlightCallsAndExitsZero) {
  const char* bin = std::getenv("TLSERVE_BIN");
  ASSERT_NE(bin, nullptr) << "TLSERVE_BIN must name the directory of the tlserve binary";
  const int port = FreePort();
  char dir[] = "/tmp/tlserve-drain-XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  const std::string log = std::string(dir) + "/server.log";
  const pid_t pid = ::fork();
  if (pid == 0) {
    const std::string server = std::string(bin) + "/tlserve";
    const std::string backbone = "--backbone=" + Fixture("r50.pt");
    const std::string port_flag = absl::StrCat("--port=", port);
    const std::string data = absl::StrCat("--data_dir=", dir, "/data");
    std::freopen(log.c_str(), "w", stderr);
    ::execl(server.c_str(), server.c_str(), backbone.c_str(), port_flag.c_str(), data.c_str(),
            "--metrics_port=0", "--device=cpu", "--host=127.0.0.1", "--max_batch_size=4",
            static_cast<char*>(nullptr));
    std::_Exit(127);
  }
  ASSERT_GT(pid, 0);
  auto client = Client::Connect(absl::StrCat("127.0.0.1:", port), absl::Seconds(60));
  ASSERT_TRUE(client.ok()) << client.status() << "\n" << ReadBytes(log);
  ASSERT_EQ(*(*client)->Health(), "SERVING");

  // 24 ResNet-50 images take seconds on this CPU: SIGTERM lands mid-call.
  v1::EmbedRequest req;
  for (int i = 0; i < 24; ++i) {
    v1::Image* img = req.add_images();
    img->set_name(absl::StrCat("img", i));
    img->set_encoded(ReadBytes(Fixture("rgb_jpg.jpg")));
  }
  absl::StatusOr<v1::EmbedResponse> result;
  std::thread call([&] { result = (*client)->Embed(req); });
  absl::SleepFor(absl::Milliseconds(500));
  ASSERT_EQ(::kill(pid, SIGTERM), 0);
  // While draining, health is no longer SERVING (or the port is closed).
  absl::SleepFor(absl::Milliseconds(100));
  auto health = (*client)->Health();
  EXPECT_TRUE(!health.ok() || *health == "NOT_SERVING") << *health;
  call.join();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->embeddings_size(), 24);

  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0) << ReadBytes(log);
  const std::string text = ReadBytes(log);
  EXPECT_NE(text.find("received SIGTERM"), std::string::npos) << text;
  EXPECT_NE(text.find("stopped"), std::string::npos) << text;
}

}  // namespace
}  // namespace tlserve
