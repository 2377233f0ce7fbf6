// oscar — the command-line front end. Subcommands live in cmd_*.cpp and register themselves (command.h).
// Exit codes: 0 success, 1 runtime error (one line "oscar: error: <where>: <what>" on stderr), 2 usage error.
#include <algorithm>
#include <cstdio>
#include <exception>
#include <map>
#include <string>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "apps/oscar/command.h"
#include "apps/oscar/common.h"
#include "formats/error.h"
#include "oscar_version.h"

namespace {

// Error messages can carry newlines (a JSON parser's excerpt); the contract is one line per error.
std::string one_line(std::string s) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  std::replace(s.begin(), s.end(), '\r', ' ');
  return s;
}

int fail(const std::string& message, int code) {
  std::fflush(stdout);
  std::fprintf(stderr, "oscar: error: %s\n", one_line(message).c_str());
  return code;
}

std::string version_string() {
#ifdef OSCAR_HAVE_CUDA
  return std::string("oscar ") + OSCAR_VERSION_STRING + " (CUDA kernels built)";
#else
  return std::string("oscar ") + OSCAR_VERSION_STRING + " (CPU only build)";
#endif
}

}  // namespace

int main(int argc, char** argv) {
  oscar::app::set_command_line(argc, argv);
  CLI::App app{"OSCAR: 2-bit KV cache with attention-aware rotations.\nRun 'oscar <command> --help' for a command's options.",
               "oscar"};
  app.set_version_flag("--version", version_string());
  app.require_subcommand(1);
  app.fallthrough();  // --log-level may come after the subcommand too
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "stderr log level: trace, debug, info, warn, error, off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}))
      ->capture_default_str();

  auto& registry = oscar::app::command_registry();
  std::stable_sort(registry.begin(), registry.end(),
                   [](const auto& a, const auto& b) { return a.order < b.order || (a.order == b.order && a.name < b.name); });
  std::map<CLI::App*, oscar::app::RunCommand> runners;
  for (const auto& spec : registry) {
    CLI::App* sub = app.add_subcommand(spec.name, spec.description);
    runners[sub] = spec.setup(*sub);
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {
    return app.exit(e);  // --help, --version
  } catch (const CLI::ParseError& e) {
    return fail(std::string("usage: ") + e.what() + " (see 'oscar --help')", 2);
  }

  auto logger = spdlog::stderr_color_mt("oscar");
  logger->set_pattern("[%H:%M:%S.%e] [%^%l%$] %v");
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::from_str(log_level));

  try {
    for (CLI::App* sub : app.get_subcommands()) return runners.at(sub)();
    return fail("no command given (see 'oscar --help')", 2);
  } catch (const oscar::Error& e) {
    return fail(e.what(), 1);
  } catch (const std::exception& e) {
    return fail(e.what(), 1);
  } catch (...) {
    return fail("unknown internal error", 1);
  }
}
