#pragma once
// Runs the built `oscar` binary as a child process (posix_spawn, no shell) and captures its exit code, stdout and
// stderr through files, so large outputs cannot dead-lock on a pipe.
#include <spawn.h>
#include <sys/wait.h>

#include <fcntl.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "test_support.h"

extern char** environ;

namespace oscar::test {

struct RunResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};

// The `oscar` next to the running test binary when there is one (a packed build carried to a GPU host puts both in
// one bin/ folder, away from the build tree the tests were configured in), else the build tree's.
inline std::filesystem::path oscar_binary() {
  std::error_code ec;
  const auto beside = std::filesystem::read_symlink("/proc/self/exe", ec).parent_path() / "oscar";
  if (!ec && std::filesystem::is_regular_file(beside, ec)) return beside;
  return binary_dir() / "bin/oscar";
}

inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline RunResult run_oscar(const std::vector<std::string>& args) {
  const auto dir = std::filesystem::temp_directory_path() / "oscar-tests" / "spawn";
  std::filesystem::create_directories(dir);
  const auto out_path = dir / ("out." + std::to_string(::getpid()));
  const auto err_path = dir / ("err." + std::to_string(::getpid()));
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  const std::string bin = oscar_binary().string();
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(bin.c_str()));
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = 0;
  RunResult r;
  const int rc = posix_spawn(&pid, bin.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    r.err = "posix_spawn failed: " + std::to_string(rc);
    return r;
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = slurp(out_path);
  r.err = slurp(err_path);
  return r;
}

// The stderr contract for failures: exactly one line, "oscar: error: ...".
inline bool is_one_error_line(const std::string& err) {
  return err.rfind("oscar: error: ", 0) == 0 && err.find('\n') == err.size() - 1;
}

// The first interpreter that imports `module` (a pyenv python3 on PATH may lack Debian's python3-numpy), or "" for
// none, so the tests that run the repo's Python tools skip rather than fail where no such interpreter is.
inline std::string python_with(const std::string& module) {
  for (const char* candidate : {"python3", "/usr/bin/python3"})
    if (std::system((std::string(candidate) + " -c 'import " + module + "' >/dev/null 2>&1").c_str()) == 0)
      return candidate;
  return "";
}

}  // namespace oscar::test
