#include "server/store/data_dir.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

namespace tlserve {
namespace {

std::string TempDir() {
  char tmpl[] = "/tmp/tlserve-store-XXXXXX";
  return ::mkdtemp(tmpl);
}

std::string Read(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(DataDirTest, CreatesNestedDirectories) {
  const std::string root = TempDir() + "/a/b/c";
  auto dir = DataDir::Open(root);
  ASSERT_TRUE(dir.ok()) << dir.status();
  struct stat st;
  EXPECT_EQ(::stat(root.c_str(), &st), 0);
  EXPECT_EQ(Read(root + "/FORMAT"), "tlserve-data 1\n");
}

TEST(DataDirTest, SecondOpenFailsWhileLockedAndSucceedsAfter) {
  const std::string root = TempDir();
  {
    auto first = DataDir::Open(root);
    ASSERT_TRUE(first.ok());
    auto second = DataDir::Open(root);
    EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(second.status().message().find("--data_dir"), absl::string_view::npos);
  }
  EXPECT_TRUE(DataDir::Open(root).ok());
}

TEST(DataDirTest, RefusesAPathThatIsAFile) {
  const std::string root = TempDir() + "/file";
  std::ofstream(root) << "x";
  EXPECT_FALSE(DataDir::Open(root).ok());
}

TEST(WriteFileAtomicallyTest, ReplacesTheWholeFileAndLeavesNoTemporary) {
  const std::string root = TempDir();
  ASSERT_TRUE(WriteFileAtomically(root + "/f", "first version").ok());
  ASSERT_TRUE(WriteFileAtomically(root + "/f", "second").ok());
  EXPECT_EQ(Read(root + "/f"), "second");
  struct stat st;
  EXPECT_NE(::stat((root + "/f.tmp").c_str(), &st), 0);
}

TEST(WriteFileAtomicallyTest, ReportsUnwritableDirectories) {
  auto s = WriteFileAtomically("/proc/tlserve-cannot-write", "x");
  EXPECT_FALSE(s.ok());
}

}  // namespace
}  // namespace tlserve
