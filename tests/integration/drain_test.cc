// Runs the real tlserve binary and stops it with SIGTERM while a call is in
// flight: the call must finish, health must leave SERVING, the exit code is 0.
#include <gtest/gtest.h>

#include <thread>

#include "absl/strings/str_cat.h"
#include "client/lib/client.h"
#include "tests/integration/server_process.h"
#include "tests/test_util.h"

namespace tlserve {
namespace {

using ::tlserve::testing::Fixture;
using ::tlserve::testing::ReadBytes;
using ::tlserve::testing::ServerProcess;

TEST(DrainTest, SigtermFinishesInFlightCallsAndExitsZero) {
  char dir[] = "/tmp/tlserve-drain-XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  const std::string log = std::string(dir) + "/server.log";
  // A long grace: under ASan on a busy machine the 24 images took over the
  // default 20 s (seen once), and the point here is that the call finishes.
  ServerProcess server(Fixture("r50.pt"), std::string(dir) + "/data", log,
                       {"--max_batch_size=4", "--drain_seconds=300"});
  auto client = server.Connect();
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
  server.Signal(SIGTERM);
  // While draining, health is no longer SERVING (or the port is closed).
  absl::SleepFor(absl::Milliseconds(100));
  auto health = (*client)->Health();
  EXPECT_TRUE(!health.ok() || *health == "NOT_SERVING") << *health;
  call.join();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->embeddings_size(), 24);

  EXPECT_EQ(server.Wait(), 0) << ReadBytes(log);
  const std::string text = ReadBytes(log);
  EXPECT_NE(text.find("received SIGTERM"), std::string::npos) << text;
  EXPECT_NE(text.find("stopped"), std::string::npos) << text;
}

}  // namespace
}  // namespace tlserve
