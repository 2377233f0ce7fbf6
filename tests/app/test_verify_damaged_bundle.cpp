// `oscar verify` on the bundle that once hung it (libhdf5's H5Lvisit recursing forever into a self-linked group;
// fuzz/regressions/bundle/h5lvisit_self_linked_group.oscar): the CLI must fail like on every other damaged file,
// one FAIL line naming the cycle and exit 1, in bounded time. The child is killed after kLimit so a regression is
// a failed test rather than a hung CI job, whatever ctest's timeout.
#include <gtest/gtest.h>

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "run_oscar.h"
#include "test_support.h"

namespace oscar::test {
namespace {

namespace fs = std::filesystem;

constexpr auto kLimit = std::chrono::seconds(30);

struct TimedRun {
  RunResult r;
  bool killed = false;
};

TimedRun run_oscar_with_limit(const std::vector<std::string>& args) {
  const fs::path dir = temp_dir_for_test();
  const fs::path out_path = dir / "out", err_path = dir / "err";
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  const std::string bin = oscar_binary().string();
  std::vector<char*> argv{const_cast<char*>(bin.c_str())};
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  TimedRun t;
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, bin.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    t.r.err = "posix_spawn failed: " + std::to_string(rc);
    return t;
  }
  int status = 0;
  const auto deadline = std::chrono::steady_clock::now() + kLimit;
  while (::waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      t.killed = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  t.r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  t.r.out = slurp(out_path);
  t.r.err = slurp(err_path);
  return t;
}

fs::path regression(const char* name) {
  return test_data_dir().parent_path().parent_path() / "fuzz/regressions/bundle" / name;
}

void expect_verify_fails(const fs::path& input, const std::string& detail) {
  for (const bool json : {false, true}) {
    std::vector<std::string> args{"verify", input.string()};
    if (json) args.push_back("--json");
    const TimedRun t = run_oscar_with_limit(args);
    ASSERT_FALSE(t.killed) << "oscar verify did not finish within " << kLimit.count() << " s on " << input;
    EXPECT_EQ(t.r.exit_code, 1) << t.r.out << t.r.err;
    if (json) {
      EXPECT_NE(t.r.out.find("\"check\": \"hdf5\""), std::string::npos) << t.r.out;
      EXPECT_NE(t.r.out.find(detail), std::string::npos) << t.r.out;
      EXPECT_NE(t.r.out.find("\"ok\": false"), std::string::npos) << t.r.out;
    } else {
      EXPECT_NE(t.r.out.find("FAIL  hdf5"), std::string::npos) << t.r.out;
      EXPECT_NE(t.r.out.find(detail), std::string::npos) << t.r.out;
      EXPECT_NE(t.r.out.find("verify: 1 checks, 1 failed: FAILED"), std::string::npos) << t.r.out;
    }
  }
}

// The fuzzer's input: /calibration's header no longer opens once its symbol table is the root's.
TEST(VerifyDamagedBundle, FuzzedSelfLinkedGroupFailsInBoundedTime) {
  const fs::path input = regression("h5lvisit_self_linked_group.oscar");
  if (!fs::exists(input)) GTEST_SKIP() << input;
  expect_verify_fails(input, "cannot walk the HDF5 object tree at /calibration: cannot open the object (corrupt file)");
  // inspect reads by name and already failed cleanly; keep it that way.
  const TimedRun i = run_oscar_with_limit({"inspect", input.string()});
  ASSERT_FALSE(i.killed);
  EXPECT_EQ(i.r.exit_code, 1) << i.r.out << i.r.err;
  EXPECT_TRUE(is_one_error_line(i.r.err)) << i.r.err;
  EXPECT_NE(i.r.err.find(input.string()), std::string::npos) << i.r.err;
}

// The same damage made cleanly (16 bytes of the seed bundle): everything opens and only the cycle is wrong.
TEST(VerifyDamagedBundle, CleanSelfLinkedGroupFailsInBoundedTime) {
  const fs::path input = regression("group_stab_message_names_root.oscar");
  if (!fs::exists(input)) GTEST_SKIP() << input;
  expect_verify_fails(input,
                      "cannot walk the HDF5 object tree at /calibration/calibration: it links back to its ancestor "
                      "/calibration (a cycle in the group index) (corrupt file)");
}

}  // namespace
}  // namespace oscar::test
