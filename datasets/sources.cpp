#include "datasets/sources.h"

#include <glob.h>

#include <algorithm>
#include <array>
#include <fstream>

#include <nlohmann/json.hpp>

#include "datasets/utf8.h"
#include "formats/error.h"

namespace oscar::data {
namespace fs = std::filesystem;

SourceFormat parse_source_format(std::string_view s, const std::string& where) {
  if (s == "auto") return SourceFormat::Auto;
  if (s == "text") return SourceFormat::Text;
  if (s == "jsonl") return SourceFormat::Jsonl;
  if (s == "tokens") return SourceFormat::Tokens;
  throw Error(where, "unknown source format '" + std::string(s) + "' (expected auto, text, jsonl or tokens)");
}

TextSplit parse_text_split(std::string_view s, const std::string& where) {
  if (s == "file") return TextSplit::File;
  if (s == "paragraph") return TextSplit::Paragraph;
  if (s == "line") return TextSplit::Line;
  throw Error(where, "unknown document split '" + std::string(s) + "' (expected file, paragraph or line)");
}

std::string_view source_format_name(SourceFormat f) {
  switch (f) {
    case SourceFormat::Auto: return "auto";
    case SourceFormat::Text: return "text";
    case SourceFormat::Jsonl: return "jsonl";
    case SourceFormat::Tokens: return "tokens";
  }
  return "?";
}

SourceFormat resolve_format(const fs::path& file, const SourceOptions& opt) {
  if (opt.format != SourceFormat::Auto) return opt.format;
  const std::string ext = file.extension().string();
  if (ext == ".jsonl") return SourceFormat::Jsonl;
  if (ext == ".u32" || ext == ".bin") return SourceFormat::Tokens;
  return SourceFormat::Text;
}

namespace {

bool is_data_extension(const fs::path& p) {
  static const std::array<std::string_view, 7> kExts = {".txt", ".text", ".md", ".rst", ".jsonl", ".u32", ".bin"};
  const std::string ext = p.extension().string();
  return std::find(kExts.begin(), kExts.end(), ext) != kExts.end();
}

bool is_glob(const std::string& s) { return s.find_first_of("*?[") != std::string::npos; }

void sort_by_path_bytes(std::vector<fs::path>& files) {
  std::sort(files.begin(), files.end(), [](const fs::path& a, const fs::path& b) { return a.string() < b.string(); });
}

std::vector<fs::path> expand_directory(const fs::path& dir) {
  std::vector<fs::path> files;
  std::error_code ec;
  fs::recursive_directory_iterator it(dir, fs::directory_options::none, ec);
  if (ec) throw Error(dir.string(), "cannot list directory: " + ec.message());
  for (; it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (ec) throw Error(dir.string(), "cannot list directory: " + ec.message());
    const std::string name = it->path().filename().string();
    if (!name.empty() && name[0] == '.') {
      if (it->is_directory()) it.disable_recursion_pending();
      continue;
    }
    if (it->is_regular_file() && is_data_extension(it->path())) files.push_back(it->path());
  }
  if (files.empty()) throw Error(dir.string(), "directory holds no data files (.txt .text .md .rst .jsonl .u32 .bin)");
  sort_by_path_bytes(files);
  return files;
}

std::vector<fs::path> expand_glob(const std::string& pattern) {
  glob_t g{};
  const int rc = ::glob(pattern.c_str(), GLOB_ERR, nullptr, &g);
  std::vector<fs::path> files;
  if (rc == 0) {
    for (size_t i = 0; i < g.gl_pathc; ++i)
      if (fs::is_regular_file(g.gl_pathv[i])) files.emplace_back(g.gl_pathv[i]);
  }
  globfree(&g);
  if (rc == GLOB_ABORTED) throw Error(pattern, "a directory of the pattern cannot be read");
  if (rc == GLOB_NOSPACE) throw Error(pattern, "out of memory while matching");
  if (files.empty()) throw Error(pattern, "pattern matches no file");
  sort_by_path_bytes(files);
  return files;
}

}  // namespace

std::vector<fs::path> expand_sources(const std::vector<std::string>& specs) {
  if (specs.empty()) throw Error("--data", "no data source given");
  std::vector<fs::path> out;
  for (const auto& spec : specs) {
    std::error_code ec;
    if (fs::is_directory(spec, ec)) {
      auto files = expand_directory(spec);
      out.insert(out.end(), files.begin(), files.end());
    } else if (fs::exists(spec, ec)) {
      if (!fs::is_regular_file(spec, ec)) throw Error(spec, "not a regular file");
      out.emplace_back(spec);
    } else if (is_glob(spec)) {
      auto files = expand_glob(spec);
      out.insert(out.end(), files.begin(), files.end());
    } else {
      throw Error(spec, "data file not found");
    }
  }
  return out;
}

namespace {

void warn(ReadCounters& c, const fs::path& file, int64_t line, const std::string& reason) {
  if (c.warnings.size() < kMaxWarnings) c.warnings.push_back(file.string() + ":" + std::to_string(line) + ": " + reason);
}

bool is_blank(std::string_view s) { return s.find_first_not_of(" \t\r\n\f\v") == std::string_view::npos; }

void read_text(const fs::path& file, std::ifstream& in, const SourceOptions& opt, ReadCounters& c,
               const std::function<bool(std::string_view)>& on_document) {
  std::string line;
  std::string doc;
  bool doc_open = false;
  int64_t line_no = 0;
  auto flush = [&]() -> bool {
    if (!doc_open) return true;
    doc_open = false;
    ++c.documents;
    const bool go_on = on_document(doc);
    doc.clear();
    return go_on;
  };
  while (std::getline(in, line)) {
    ++line_no;
    ++c.lines;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line_no == 1 && line.starts_with("\xEF\xBB\xBF")) line.erase(0, 3);
    if (!is_valid_utf8(line)) {
      ++c.invalid_utf8_lines;
      warn(c, file, line_no, "invalid UTF-8, line skipped");
      continue;
    }
    if (opt.text_split != TextSplit::File && is_blank(line)) {
      if (!flush()) return;
      continue;
    }
    if (doc_open) doc.push_back('\n');
    doc += line;
    doc_open = true;
    if (opt.text_split == TextSplit::Line && !flush()) return;
  }
  flush();
}

void read_jsonl(const fs::path& file, std::ifstream& in, const SourceOptions& opt, ReadCounters& c,
                const std::function<bool(std::string_view)>& on_document) {
  std::string line;
  int64_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    ++c.lines;
    if (is_blank(line)) continue;
    // nlohmann rejects ill-formed UTF-8 inside strings, so invalid bytes surface as a parse error here.
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    std::string reason;
    if (j.is_discarded()) {
      reason = "not valid JSON";
    } else if (!j.is_object()) {
      reason = "not a JSON object";
    } else if (!j.contains(opt.jsonl_field)) {
      reason = "no field \"" + opt.jsonl_field + "\"";
    } else if (!j[opt.jsonl_field].is_string()) {
      reason = "field \"" + opt.jsonl_field + "\" is not a string";
    }
    if (!reason.empty()) {
      ++c.bad_jsonl_lines;
      warn(c, file, line_no, reason + ", line skipped");
      continue;
    }
    ++c.documents;
    if (!on_document(j[opt.jsonl_field].get_ref<const std::string&>())) return;
  }
}

}  // namespace

void read_documents(const fs::path& file, SourceFormat format, const SourceOptions& opt, ReadCounters& counters,
                    const std::function<bool(std::string_view)>& on_document) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw Error(file.string(), "cannot open data file");
  if (format == SourceFormat::Jsonl) {
    read_jsonl(file, in, opt, counters, on_document);
  } else if (format == SourceFormat::Text) {
    read_text(file, in, opt, counters, on_document);
  } else {
    throw Error(file.string(), "read_documents handles text and JSONL files only");
  }
  if (in.bad()) throw Error(file.string(), "read error");
}

}  // namespace oscar::data
