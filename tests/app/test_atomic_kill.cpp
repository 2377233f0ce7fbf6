// Atomic outputs under SIGKILL: `oscar forward --dump` on the qwen3-tiny fixture (a ~14 MiB dump) is killed while
// its temp file is being written, at several points after the temp appears. Afterwards the target is either
// absent or byte-identical to an uninterrupted run's output — never partial.
//
// Policy (docs/abuse-inputs.md): a killed writer leaves its hidden temp ".<name>.tmp.XXXXXX" behind, since no
// code runs after SIGKILL. A later run does NOT delete such files: a temp of the same target may belong to a
// concurrent writer, and removing it would break that writer's commit. They are inert (hidden, never renamed) and
// safe to delete by hand.
#include <gtest/gtest.h>

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <fcntl.h>

#include <chrono>
#include <regex>
#include <set>
#include <cstdio>
#include <thread>

#include "formats/atomic_file.h"
#include "formats/safetensors.h"
#include "run_oscar.h"
#include "test_support.h"

namespace oscar::test {
namespace {

namespace fs = std::filesystem;

constexpr const char* kModel = "models/qwen3-tiny-trained";

std::string id_list(int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s += (i ? "," : "") + std::to_string(3 + (i * 37) % 4000);
  return s;
}

pid_t spawn_oscar(const std::vector<std::string>& args, const fs::path& log) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  const std::string bin = oscar_binary().string();
  std::vector<char*> argv{const_cast<char*>(bin.c_str())};
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, bin.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  return rc == 0 ? pid : -1;
}

std::set<std::string> temps_of(const fs::path& dir, const std::string& target_name) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().starts_with("." + target_name + ".tmp.")) out.insert(e.path().filename());
  return out;
}

TEST(AtomicKill, KilledDumpLeavesNoPartialTarget) {
  OSCAR_REQUIRE_FIXTURE(kModel);
  const fs::path dir = temp_dir_for_test();
  const std::string ids = id_list(512);
  const std::string model = (fixtures_dir() / kModel).string();

  // The dump's metadata records the command line, so the reference is written to the same path, then moved.
  const std::string name = "dump.safetensors";
  const fs::path target = dir / name;
  const fs::path reference = dir / "reference.safetensors";
  const RunResult ok = run_oscar({"forward", "--model", model, "--ids", ids, "--dump", target.string(), "--top", "1"});
  ASSERT_EQ(ok.exit_code, 0) << ok.err;
  // The uninterrupted run's temp was committed (renamed), so nothing else is left.
  EXPECT_TRUE(temps_of(dir, name).empty());
  fs::rename(target, reference);
  const std::string reference_sha = fmt::sha256_file(reference);
  int killed_mid_write = 0, completed = 0;
  for (int extra_ms : {0, 0, 1, 2, 5, 10, 20, 40, 80}) {
    fs::remove(target);
    // Earlier kills leave their temps; only a new one says that this run has started writing.
    const std::set<std::string> stale = temps_of(dir, name);
    const pid_t pid = spawn_oscar({"forward", "--model", model, "--ids", ids, "--dump", target.string(), "--top", "1"},
                                  dir / "log.txt");
    ASSERT_GT(pid, 0);
    // Wait (≤ 60 s) for the temp file: from then on the process is writing the dump.
    bool saw_temp = false;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    int status = 0;
    bool exited = false;
    while (std::chrono::steady_clock::now() < deadline) {
      if (temps_of(dir, name).size() > stale.size()) {
        saw_temp = true;
        break;
      }
      if (::waitpid(pid, &status, WNOHANG) == pid) {
        exited = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    if (saw_temp) std::this_thread::sleep_for(std::chrono::milliseconds(extra_ms));
    if (!exited) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
    }
    const bool was_killed = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
    if (fs::exists(target)) {
      // Renamed before the kill landed: it must be the complete dump.
      EXPECT_EQ(fmt::sha256_file(target), reference_sha) << "partial target after kill at +" << extra_ms << " ms";
      ++completed;
    } else {
      EXPECT_TRUE(was_killed) << "the run neither produced the dump nor was killed";
      killed_mid_write += saw_temp && was_killed;
    }
  }
  // The temp file appears before the dump is complete, so killing right then must hit mid-write at least once.
  std::printf("killed mid-write %d, completed before the kill %d\n", killed_mid_write, completed);
  EXPECT_GE(killed_mid_write, 1) << "completed " << completed;

  // Leftovers are exactly: the reference, possibly the completed target, the log, and hidden temps of the target.
  const std::regex temp_name(R"(\.dump\.safetensors\.tmp\.[A-Za-z0-9]{6})");
  int temps = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string f = e.path().filename().string();
    if (f == "reference.safetensors" || f == "log.txt" || f == name) continue;
    EXPECT_TRUE(std::regex_match(f, temp_name)) << "unexpected file " << f;
    ++temps;
  }
  EXPECT_EQ(temps, killed_mid_write);

  // A later run succeeds next to the stale temps and does not remove them (see the policy above).
  const RunResult again = run_oscar({"forward", "--model", model, "--ids", ids, "--dump", target.string(), "--top", "1"});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_EQ(fmt::sha256_file(target), reference_sha);
  int temps_after = 0;
  for (const auto& e : fs::directory_iterator(dir)) temps_after += std::regex_match(e.path().filename().string(), temp_name);
  EXPECT_EQ(temps_after, temps);
}

}  // namespace
}  // namespace oscar::test
