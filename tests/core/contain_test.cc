#include "server/core/contain.h"

#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <new>
#include <stdexcept>
#include <string>

#include "absl/status/statusor.h"

namespace tlserve {
namespace {

// Finding 9 of the hardening issue: an exception thrown in a handler came
// back as UNIMPLEMENTED (gRPC's answer to a throwing handler), and one
// thrown on the job thread aborted the process. Every handler and job runs
// its body through Contain; this is what Contain makes of each kind.
TEST(ContainTest, TurnsEveryKindOfExceptionIntoAStatus) {
  auto c10_error = Contain("training failed", []() -> absl::Status {
    TORCH_CHECK(false, "Expected more than 1 value per channel when training\nbacktrace line 1");
    return absl::OkStatus();
  });
  EXPECT_EQ(c10_error.code(), absl::StatusCode::kInternal);
  EXPECT_NE(c10_error.message().find("training failed: Expected more than 1 value per channel"),
            absl::string_view::npos)
      << c10_error;
  EXPECT_EQ(c10_error.message().find("backtrace"), absl::string_view::npos)
      << "LibTorch's backtrace leaked into the message: " << c10_error;

  auto oom = Contain("Embed failed", []() -> absl::StatusOr<int> { throw std::bad_alloc(); });
  EXPECT_EQ(oom.status().code(), absl::StatusCode::kResourceExhausted) << oom.status();

  auto other = Contain("export failed",
                       []() -> absl::Status { throw std::runtime_error(std::string(10000, 'x')); });
  EXPECT_EQ(other.code(), absl::StatusCode::kInternal);
  EXPECT_LT(other.message().size(), 400u) << "an unbounded message came back";

  auto unknown = Contain("job failed", []() -> absl::Status { throw 42; });
  EXPECT_EQ(unknown.code(), absl::StatusCode::kInternal);

  auto fine = Contain("nothing", []() -> absl::StatusOr<int> { return 7; });
  ASSERT_TRUE(fine.ok());
  EXPECT_EQ(*fine, 7);
}

TEST(ContainTest, BoundedCutsAndCleansClientStrings) {
  EXPECT_EQ(Bounded("shirts"), "shirts");
  const std::string cut = Bounded(std::string(1 << 20, 'a'), 80);
  EXPECT_LT(cut.size(), 120u);
  EXPECT_NE(cut.find("(1048576 bytes)"), std::string::npos) << cut;
  EXPECT_EQ(Bounded("a\nb\x01"), "a?b?");
}

}  // namespace
}  // namespace tlserve
