#pragma once
// How subcommands plug into `oscar`: each cmd_*.cpp registers itself with a static OSCAR_REGISTER_COMMAND, so
// adding a subcommand is adding one file (the sources are globbed, and being linked straight into the
// executable, their static registrars always run). `order` fixes the position in --help.
#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace oscar::app {

// Declares the subcommand's options on `sub` and returns what runs it (exit code) once parsing succeeded.
// Options should live in a std::shared_ptr captured by the returned function.
using RunCommand = std::function<int()>;
using SetupCommand = std::function<RunCommand(CLI::App& sub)>;

struct CommandSpec {
  std::string name;
  std::string description;
  int order = 100;
  SetupCommand setup;
};

std::vector<CommandSpec>& command_registry();

struct CommandRegistrar {
  explicit CommandRegistrar(CommandSpec spec) { command_registry().push_back(std::move(spec)); }
};

#define OSCAR_REGISTER_COMMAND_CAT2(a, b) a##b
#define OSCAR_REGISTER_COMMAND_CAT(a, b) OSCAR_REGISTER_COMMAND_CAT2(a, b)
#define OSCAR_REGISTER_COMMAND(...) \
  static ::oscar::app::CommandRegistrar OSCAR_REGISTER_COMMAND_CAT(oscar_command_registrar_, __LINE__)({__VA_ARGS__})

}  // namespace oscar::app
