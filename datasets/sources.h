#pragma once
// Data sources: which files a source spec names, what kind each file is, and how a file is cut into documents.
//
// A source spec is one of
//   - a file path (any extension; the kind comes from the extension, see SourceFormat::Auto),
//   - a directory: every regular file below it (recursively) whose extension is .txt .text .md .rst .jsonl .u32
//     or .bin; hidden entries (name starting with '.') are skipped,
//   - a glob pattern (contains *, ? or [): POSIX glob(3) matching, no "**"; only regular files are kept.
// The files of one spec are sorted by their path string (byte order, not locale collation), so the order never
// depends on the file system or the locale. Specs keep the order they were given in.
//
// Documents:
//   - text files: lines are read with CRLF normalized to LF and a leading UTF-8 BOM removed; a line that is not
//     valid UTF-8 is skipped and counted. TextSplit decides what a document is: the whole file, each block of
//     non-blank lines (paragraph, the default) or each non-blank line. A document's text is its kept lines joined
//     with '\n'.
//   - JSONL: each non-blank line is a JSON object whose `jsonl_field` is a string: one document. A line that is not
//     valid JSON (including invalid UTF-8), not an object, or lacks the string field is skipped, counted and
//     reported with its line number.
//   - token files (.u32/.bin, datasets/token_file.h): one verbatim stream of ids, no document structure.
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace oscar::data {

enum class SourceFormat { Auto, Text, Jsonl, Tokens };
enum class TextSplit { File, Paragraph, Line };

// Parse the CLI spelling ("auto", "text", "jsonl", "tokens" / "file", "paragraph", "line"); `where` names the flag.
SourceFormat parse_source_format(std::string_view s, const std::string& where);
TextSplit parse_text_split(std::string_view s, const std::string& where);
std::string_view source_format_name(SourceFormat f);

struct SourceOptions {
  SourceFormat format = SourceFormat::Auto;  // Auto: .jsonl -> Jsonl, .u32/.bin -> Tokens, anything else -> Text
  std::string jsonl_field = "text";
  TextSplit text_split = TextSplit::Paragraph;
};

// The kind a file is read as under `opt`.
SourceFormat resolve_format(const std::filesystem::path& file, const SourceOptions& opt);

// Expands specs into the ordered list of files. A missing path, a glob matching nothing, or a directory with no
// data files is an oscar::Error naming the spec.
std::vector<std::filesystem::path> expand_sources(const std::vector<std::string>& specs);

// Counters a reader fills while cutting a file into documents. Warnings carry "file:line: reason".
struct ReadCounters {
  int64_t lines = 0;
  int64_t documents = 0;
  int64_t invalid_utf8_lines = 0;
  int64_t bad_jsonl_lines = 0;
  std::vector<std::string> warnings;
};

// At most this many warning lines are kept (the counters keep counting), so a corrupt multi-GB file cannot
// exhaust memory with messages.
inline constexpr size_t kMaxWarnings = 1000;

// Calls on_document for every document of a text or JSONL file, in file order. on_document returns false to stop
// reading (the packer has enough tokens). Throws oscar::Error naming the file if it cannot be opened.
void read_documents(const std::filesystem::path& file, SourceFormat format, const SourceOptions& opt,
                    ReadCounters& counters, const std::function<bool(std::string_view)>& on_document);

}  // namespace oscar::data
