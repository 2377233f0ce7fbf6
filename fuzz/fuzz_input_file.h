#pragma once
// The parsers read files (safetensors is mmapped), so each input is written to one per-process scratch file.
// Contract under test: every rejection is an oscar::Error. Any other exception escapes LLVMFuzzerTestOneInput and
// aborts, which libFuzzer reports as a crash, exactly like a memory error.
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

namespace oscar::fuzz {

// Removes the per-process scratch directory when the fuzzer exits normally (a crash leaves it for inspection).
struct ScratchDir {
  std::filesystem::path path;
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

inline std::filesystem::path scratch_path(const std::string& name) {
  static const ScratchDir scratch{[] {
    // tmpfs when there is one: on a busy disk, rewriting the scratch file dominated the run time (14 exec/s).
    std::error_code ec;
    const auto base = std::filesystem::is_directory("/dev/shm", ec) ? std::filesystem::path("/dev/shm")
                                                                    : std::filesystem::temp_directory_path();
    // A fuzzer that is killed or leaves through _Exit (libFuzzer's timeout and signal paths) skips ScratchDir's
    // destructor: ~550 such directories had piled up in /dev/shm on the dev machine. Those of processes that no
    // longer exist are removed here.
    for (const auto& entry : std::filesystem::directory_iterator(base, ec)) {
      const std::string name = entry.path().filename().string();
      if (name.rfind("oscar-fuzz-", 0) != 0) continue;
      const long pid = std::strtol(name.c_str() + 11, nullptr, 10);
      if (pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) std::filesystem::remove_all(entry.path(), ec);
    }
    auto d = base / ("oscar-fuzz-" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d;
  }()};
  return scratch.path / name;
}

inline std::filesystem::path write_input(const std::string& name, const uint8_t* data, size_t size) {
  const auto path = scratch_path(name);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  return path;
}

}  // namespace oscar::fuzz
