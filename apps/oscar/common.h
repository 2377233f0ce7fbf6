#pragma once
// Helpers every subcommand shares: the common flags (--model, --device, --json), argument checks that report
// through oscar::Error (exit code 1, one line naming the file or flag), and the recorded command line.
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "formats/tokenizer.h"
#include "lib/model/cpu_model.h"

namespace oscar::app {

// The full command line as typed, recorded in the metadata of files we write (set once by main).
const std::string& command_line();
void set_command_line(int argc, char** argv);

// --model DIR (required). Existence is checked when the command runs (check_model_dir), not by CLI11, so a
// missing directory is a runtime error naming it (exit 1), not a usage error (exit 2).
CLI::Option* add_model_option(CLI::App& sub, std::string& model_dir);
// --device cpu|cuda, default cpu.
CLI::Option* add_device_option(CLI::App& sub, std::string& device);
// --json: machine-readable output on stdout.
CLI::Option* add_json_flag(CLI::App& sub, bool& json);

// Throws for --device cuda until the CUDA forward is wired into the CLI.
void require_cpu_device(const std::string& device);
// Throws oscar::Error(dir, ...) unless `dir` is a directory holding config.json.
void check_model_dir(const std::filesystem::path& dir);
std::unique_ptr<model::CpuModel> load_model(const std::filesystem::path& dir);
std::unique_ptr<fmt::Tokenizer> load_tokenizer(const std::filesystem::path& dir);

// "1,2, 3" -> {1, 2, 3}; every element must be an integer in [0, vocab_size). `flag` names the option in errors.
std::vector<int32_t> parse_id_list(const std::string& text, int64_t vocab_size, const std::string& flag);
// Tokenizes a prompt with the tokenizer's special tokens (BOS for Llama); empty results are an error naming `flag`.
std::vector<int32_t> encode_prompt(const fmt::Tokenizer& tok, const std::string& prompt, const std::string& flag);
// --ef-context of eval and generate: "auto" and "bundle" give 0, a positive count itself; anything else is an
// oscar::Error naming the flag.
int64_t parse_ef_context(const std::string& text);
// Throws oscar::Error(path, ...) when the directory a file would be written into does not exist.
void check_output_parent(const std::filesystem::path& path);

}  // namespace oscar::app
