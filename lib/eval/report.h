#pragma once
// The results of one `oscar eval` run and their renderings: a terminal table, report.json, report.md and a
// self-contained report.html whose SVG charts (KL and perplexity vs context per mode, retrieval heat maps) are drawn
// here, with no scripts or external resources. All files are written atomically; the output is a function of the
// report alone (no timestamps unless the report carries one, i.e. the caller asked for it).
#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "lib/eval/metrics.h"

namespace oscar::eval {

// One cache mode at one context length.
struct ModeResult {
  std::string mode;
  int64_t context = 0;
  int64_t sequences = 0;
  MetricSummary all;     // every position of every sequence
  MetricSummary beyond;  // positions t >= sink + recent: the queries that read quantized K/V
  // Greedy agreement with BF16: prompts of (context - greedy_tokens) tokens, greedy_tokens new tokens.
  int64_t greedy_prompts = 0;
  int64_t greedy_tokens = 0;
  double greedy_mean_agreement = 0;  // mean tokens until the first divergence
  int64_t greedy_full_matches = 0;   // prompts whose whole continuation equals BF16's
  KvFootprint footprint;
};

// Retrieval success of one mode, task, length and depth.
struct RetrievalCell {
  std::string mode;
  std::string task;  // "passkey", "needle"
  int64_t length = 0;
  double depth = 0;  // [0, 1]
  int64_t trials = 0;
  int64_t successes = 0;
};

struct EvalReport {
  std::string model;   // --model as given
  std::string bundle;  // --bundle as given, or empty
  std::vector<std::pair<std::string, std::string>> settings;  // every option, as text, in a fixed order
  std::vector<std::pair<std::string, std::string>> data_files;  // path, sha256
  std::vector<ModeResult> results;
  std::vector<RetrievalCell> retrieval;
  std::vector<std::string> warnings;
  std::string generated_at;  // empty unless asked for (--timestamp)
};

std::string format_table(const EvalReport& report);  // fixed-width text for the terminal
std::string to_json_text(const EvalReport& report);   // NaN statistics are written as null
std::string to_markdown(const EvalReport& report);
std::string to_html(const EvalReport& report);
// Writes dir/report.json, dir/report.md and dir/report.html (each atomically). Throws oscar::Error naming the
// directory when it does not exist.
void write_report(const std::filesystem::path& dir, const EvalReport& report);

}  // namespace oscar::eval
