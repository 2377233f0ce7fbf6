#include "apps/oscar/common.h"

#include <charconv>
#include <stdexcept>

#include "apps/oscar/command.h"
#include "formats/error.h"

namespace oscar::app {
namespace fs = std::filesystem;

std::vector<CommandSpec>& command_registry() {
  static std::vector<CommandSpec> registry;
  return registry;
}

namespace {
std::string& command_line_storage() {
  static std::string line;
  return line;
}
}  // namespace

const std::string& command_line() { return command_line_storage(); }

void set_command_line(int argc, char** argv) {
  std::string line;
  for (int i = 0; i < argc; ++i) {
    if (i) line += ' ';
    const std::string arg = argv[i];
    // Quote arguments with spaces or quotes so the recorded line can be pasted back into a shell.
    if (arg.empty() || arg.find_first_of(" \t\"'\\$") != std::string::npos) {
      line += '\'';
      for (char c : arg) line += c == '\'' ? std::string("'\\''") : std::string(1, c);
      line += '\'';
    } else {
      line += arg;
    }
  }
  command_line_storage() = line;
}

CLI::Option* add_model_option(CLI::App& sub, std::string& model_dir) {
  return sub.add_option("--model", model_dir, "Hugging Face model directory (config.json, *.safetensors, tokenizer)")
      ->required()
      ->type_name("DIR");
}

CLI::Option* add_device_option(CLI::App& sub, std::string& device) {
  return sub.add_option("--device", device, "where to run: cpu or cuda")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
}

CLI::Option* add_json_flag(CLI::App& sub, bool& json) {
  return sub.add_flag("--json", json, "machine-readable JSON on stdout");
}

void require_cpu_device(const std::string& device) {
  if (device == "cuda")
    throw Error("--device cuda", "CUDA forward not available in this build/yet; use --device cpu");
}

void check_model_dir(const fs::path& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) throw Error(dir.string(), "model directory not found");
  if (!fs::is_directory(dir, ec)) throw Error(dir.string(), "not a directory (--model takes the model folder)");
  if (!fs::exists(dir / "config.json", ec)) throw Error((dir / "config.json").string(), "not found");
}

std::unique_ptr<model::CpuModel> load_model(const fs::path& dir) {
  check_model_dir(dir);
  return model::CpuModel::load(dir);
}

std::unique_ptr<fmt::Tokenizer> load_tokenizer(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw Error(dir.string(), "model directory not found");
  return fmt::Tokenizer::load(dir);
}

std::vector<int32_t> parse_id_list(const std::string& text, int64_t vocab_size, const std::string& flag) {
  std::vector<int32_t> ids;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t end = text.find(',', pos);
    if (end == std::string::npos) end = text.size();
    std::string item = text.substr(pos, end - pos);
    const size_t b = item.find_first_not_of(" \t");
    const size_t e = item.find_last_not_of(" \t");
    item = b == std::string::npos ? "" : item.substr(b, e - b + 1);
    int64_t value = -1;
    const auto [ptr, err] = std::from_chars(item.data(), item.data() + item.size(), value);
    if (item.empty() || err != std::errc() || ptr != item.data() + item.size())
      throw Error(flag, "'" + item + "' is not a token id (expected comma-separated integers)");
    if (value < 0 || value >= vocab_size)
      throw Error(flag, "token id " + item + " is outside the vocabulary [0, " + std::to_string(vocab_size) + ")");
    ids.push_back(static_cast<int32_t>(value));
    pos = end + 1;
  }
  return ids;
}

std::vector<int32_t> encode_prompt(const fmt::Tokenizer& tok, const std::string& prompt, const std::string& flag) {
  std::vector<int32_t> ids = tok.encode(prompt, /*add_special_tokens=*/true);
  if (ids.empty()) throw Error(flag, "the prompt encodes to no tokens (this tokenizer adds no BOS; give some text)");
  return ids;
}

void check_output_parent(const fs::path& path) {
  const fs::path parent = path.has_parent_path() ? path.parent_path() : fs::path(".");
  std::error_code ec;
  if (!fs::is_directory(parent, ec))
    throw Error(path.string(), "cannot write: directory " + parent.string() + " does not exist");
  if (fs::is_directory(path, ec)) throw Error(path.string(), "is a directory, expected a file path");
}

int64_t parse_ef_context(const std::string& text) {
  if (text == "auto" || text == "bundle") return 0;
  try {
    size_t used = 0;
    const long long n = std::stoll(text, &used);
    if (used == text.size() && n > 0) return n;
  } catch (const std::exception&) {
  }
  throw Error("--ef-context", "'" + text + "' is not auto, bundle or a positive count");
}

}  // namespace oscar::app
