// Hugging Face tokenizer.json (model BPE) re-implemented so that ids equal those of the `tokenizers` package.
// The pipeline mirrors tokenizers' encode_single_sequence step by step, because the exact id sequence depends on
// where each stage splits the text:
//   1. added tokens with normalized=false are cut out of the raw text (leftmost-longest, lstrip/rstrip/single_word);
//   2. every remaining piece is normalized, then added tokens with normalized=true are cut out of the result;
//   3. the pre-tokenizer splits each piece into words (ByteLevel, Split regex, Metaspace);
//   4. BPE merges each word (priority queue by merge rank, then leftmost position; byte fallback; unk fusing);
//   5. the post-processor adds BOS/EOS when add_special_tokens is set.
// Regexes go through PCRE2 (UTF + UCP) because the patterns in tokenizer.json files use \p{L}, \p{N} and
// look-ahead, which std::regex cannot express. Unicode normalization (NFC for Qwen2/Qwen3) and general categories
// come from utf8proc.
#include <fmt/format.h>
#include <utf8proc.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <shared_mutex>
#include <sstream>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "formats/error.h"
#include "formats/tokenizer.h"
#include "formats/unicode_alphabetic.h"

namespace oscar::fmt {
namespace {

using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------------------------
// UTF-8 helpers

// A Unicode scalar value, or -1 where the text holds no valid character (invalid UTF-8, end of text).
using CodePoint = utf8proc_int32_t;

// Byte length of the UTF-8 sequence starting with `lead`; the caller has validated the text.
size_t utf8_len(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead >> 5) == 0x6) return 2;
  if ((lead >> 4) == 0xE) return 3;
  return 4;
}

struct DecodedChar {
  CodePoint code_point;  // -1 for an invalid sequence
  size_t length;         // bytes consumed; for an invalid sequence, its maximal subpart (at least 1)
};

// Decodes the character at `pos` (< s.size()). utf8proc_iterate only says *that* a sequence is invalid, but
// from_utf8_lossy (and so the decoder's U+FFFD count) needs *how many* bytes one error spans: the maximal
// subpart, i.e. the longest prefix of a well-formed sequence (Unicode 15, table 3-7 and section 3.9 U+FFFD
// substitution). Hence the table walk: the lead byte fixes the allowed range of the second byte (which excludes
// overlongs, surrogates and code points above U+10FFFF), all later bytes are plain continuations.
DecodedChar decode_utf8(std::string_view s, size_t pos) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + pos;
  const size_t avail = s.size() - pos;
  const unsigned lead = p[0];
  if (lead < 0x80) return {static_cast<CodePoint>(lead), 1};
  size_t need;
  unsigned second_lo = 0x80, second_hi = 0xBF;
  CodePoint c;
  if (lead >= 0xC2 && lead <= 0xDF) {
    need = 2, c = lead & 0x1F;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    need = 3, c = lead & 0x0F;
    if (lead == 0xE0) second_lo = 0xA0;
    if (lead == 0xED) second_hi = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    need = 4, c = lead & 0x07;
    if (lead == 0xF0) second_lo = 0x90;
    if (lead == 0xF4) second_hi = 0x8F;
  } else {
    return {-1, 1};
  }
  for (size_t k = 1; k < need; ++k) {
    const bool ok = k < avail && p[k] >= (k == 1 ? second_lo : 0x80u) && p[k] <= (k == 1 ? second_hi : 0xBFu);
    if (!ok) return {-1, k};
    c = (c << 6) | (p[k] & 0x3F);
  }
  return {c, need};
}

// Returns the byte offset of the first invalid sequence, or npos when the text is valid UTF-8.
size_t first_invalid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const DecodedChar d = decode_utf8(s, i);
    if (d.code_point < 0) return i;
    i += d.length;
  }
  return std::string_view::npos;
}

CodePoint decode_at(std::string_view s, size_t pos) { return decode_utf8(s, pos).code_point; }

CodePoint last_char(std::string_view s) {
  if (s.empty()) return -1;
  size_t start = s.size() - 1;
  while (start > 0 && s.size() - start < 4 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
  const DecodedChar d = decode_utf8(s, start);
  return start + d.length == s.size() ? d.code_point : -1;
}

void append_utf8(std::string& out, CodePoint c) {
  utf8proc_uint8_t buf[4];
  const utf8proc_ssize_t len = utf8proc_encode_char(c, buf);
  out.append(reinterpret_cast<const char*>(buf), static_cast<size_t>(len));
}

// Rust's String::from_utf8_lossy: every maximal invalid subsequence becomes one U+FFFD, exactly the unit
// decode_utf8 reports per error.
std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t i = 0; i < bytes.size();) {
    const DecodedChar d = decode_utf8(bytes, i);
    if (d.code_point < 0)
      out += "\xEF\xBF\xBD";
    else
      out.append(bytes.substr(i, d.length));
    i += d.length;
  }
  return out;
}

// Rust char::is_whitespace is the Unicode White_Space property. utf8proc has no property lookup, but in Unicode
// 15 White_Space is exactly the separators (Zs, Zl, Zp) plus the controls TAB..CR and NEL.
bool is_rust_whitespace(CodePoint c) {
  if (c < 0) return false;
  if ((c >= 0x09 && c <= 0x0D) || c == 0x85) return true;
  const utf8proc_category_t cat = utf8proc_category(c);
  return cat == UTF8PROC_CATEGORY_ZS || cat == UTF8PROC_CATEGORY_ZL || cat == UTF8PROC_CATEGORY_ZP;
}

// Rust char::is_alphanumeric: Alphabetic or Numeric (Nd, Nl, No); tokenizers adds '_' for word boundaries.
// Alphabetic is the letters (L*), Nl and the Other_Alphabetic marks, which only a table can supply.
bool is_word_char(CodePoint c) {
  if (c < 0) return false;
  if (c == '_') return true;
  switch (utf8proc_category(c)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT: case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_NO:
      return true;
    default:
      break;
  }
  const auto& marks = unicode::kAlphabeticNonLetterNonNumber;
  const auto cp = static_cast<char32_t>(c);
  const auto it = std::upper_bound(marks.begin(), marks.end(), cp,
                                   [](char32_t value, const auto& range) { return value < range.first; });
  return it != marks.begin() && cp <= std::prev(it)->second;
}

std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
  if (from.empty()) return std::string(s);
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  while (true) {
    const size_t hit = s.find(from, pos);
    if (hit == std::string_view::npos) break;
    out.append(s.substr(pos, hit - pos));
    out.append(to);
    pos = hit + from.size();
  }
  out.append(s.substr(pos));
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// GPT-2 byte <-> unicode map: printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100.. in order,
// so that every byte becomes a visible character and BPE never sees whitespace or control characters.

struct ByteLevelAlphabet {
  std::array<std::string, 256> byte_to_utf8;
  std::unordered_map<CodePoint, uint8_t> char_to_byte;

  ByteLevelAlphabet() {
    std::array<bool, 256> printable{};
    for (int b = '!'; b <= '~'; ++b) printable[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) printable[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) printable[b] = true;
    int next_extra = 0;
    for (int b = 0; b < 256; ++b) {
      const CodePoint c = printable[b] ? b : 256 + next_extra++;
      append_utf8(byte_to_utf8[b], c);
      char_to_byte.emplace(c, static_cast<uint8_t>(b));
    }
  }
};

const ByteLevelAlphabet& byte_level_alphabet() {
  static const ByteLevelAlphabet alphabet;
  return alphabet;
}

// ---------------------------------------------------------------------------------------------------------------
// PCRE2 regex: compiled once, matched from many threads (match data is per call).

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) {
    int error_code = 0;
    PCRE2_SIZE error_offset = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP,
                          &error_code, &error_offset, nullptr);
    if (!code_) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error_code, message, sizeof(message));
      throw Error(where, "cannot compile regex '" + pattern + "' at offset " + std::to_string(error_offset) + ": " +
                             reinterpret_cast<const char*>(message));
    }
    // JIT makes splitting multi-MB texts several times faster; without JIT support PCRE2 interprets, same result.
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);
  }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  ~Regex() { pcre2_code_free(code_); }

  // Non-overlapping leftmost matches as [start, end) byte ranges; empty matches are dropped (tokenizers drops
  // empty splits) and the scan then moves on by one character. `s` must be valid UTF-8.
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view s) const {
    std::vector<std::pair<size_t, size_t>> out;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    size_t offset = 0;
    while (offset <= s.size()) {
      const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), offset,
                                 PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc < 0) break;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      const size_t start = ov[0], end = ov[1];
      if (end > start) {
        out.emplace_back(start, end);
        offset = end;
      } else {
        if (start >= s.size()) break;
        offset = start + utf8_len(static_cast<unsigned char>(s[start]));
      }
    }
    pcre2_match_data_free(md);
    return out;
  }

 private:
  pcre2_code* code_ = nullptr;
};

// The pattern of a Split pre-tokenizer or a Replace normalizer/decoder: {"String": "..."} or {"Regex": "..."}.
struct Pattern {
  std::string literal;
  std::shared_ptr<Regex> regex;

  std::vector<std::pair<size_t, size_t>> find_all(std::string_view s) const {
    if (regex) return regex->find_all(s);
    std::vector<std::pair<size_t, size_t>> out;
    if (literal.empty()) return out;
    for (size_t pos = s.find(literal); pos != std::string_view::npos; pos = s.find(literal, pos + literal.size()))
      out.emplace_back(pos, pos + literal.size());
    return out;
  }
  std::string replace(std::string_view s, std::string_view content) const {
    if (!regex) return replace_all(s, literal, content);
    std::string out;
    size_t pos = 0;
    for (auto [a, b] : regex->find_all(s)) {
      out.append(s.substr(pos, a - pos));
      out.append(content);
      pos = b;
    }
    out.append(s.substr(pos));
    return out;
  }
};

Pattern parse_pattern(const json& j, const std::string& where) {
  Pattern p;
  if (j.is_object() && j.contains("String")) {
    p.literal = j["String"].get<std::string>();
  } else if (j.is_object() && j.contains("Regex")) {
    p.regex = std::make_shared<Regex>(j["Regex"].get<std::string>(), where);
  } else if (j.is_string()) {
    p.literal = j.get<std::string>();
  } else {
    throw Error(where, "pattern must be {\"String\": ...} or {\"Regex\": ...}, got " + j.dump());
  }
  return p;
}

// ---------------------------------------------------------------------------------------------------------------
// Splitting a piece of text with match ranges, following tokenizers' SplitDelimiterBehavior.

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

SplitBehavior parse_behavior(const std::string& name, const std::string& where) {
  if (name == "Removed") return SplitBehavior::Removed;
  if (name == "Isolated") return SplitBehavior::Isolated;
  if (name == "MergedWithPrevious") return SplitBehavior::MergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::MergedWithNext;
  if (name == "Contiguous") return SplitBehavior::Contiguous;
  throw Error(where, "unknown split behavior '" + name + "'");
}

struct Span {
  size_t start, end;
  bool is_match;
};

std::vector<std::pair<size_t, size_t>> apply_split(size_t length, const std::vector<std::pair<size_t, size_t>>& hits,
                                                   SplitBehavior behavior, bool invert) {
  std::vector<Span> spans;
  size_t prev = 0;
  for (auto [a, b] : hits) {
    if (a > prev) spans.push_back({prev, a, false});
    spans.push_back({a, b, true});
    prev = b;
  }
  if (prev < length) spans.push_back({prev, length, false});
  if (invert)
    for (auto& s : spans) s.is_match = !s.is_match;

  std::vector<std::pair<size_t, size_t>> out;
  switch (behavior) {
    case SplitBehavior::Isolated:
      for (const auto& s : spans) out.emplace_back(s.start, s.end);
      break;
    case SplitBehavior::Removed:
      for (const auto& s : spans)
        if (!s.is_match) out.emplace_back(s.start, s.end);
      break;
    case SplitBehavior::MergedWithPrevious: {
      bool previous_match = false;
      for (const auto& s : spans) {
        if (s.is_match && !previous_match && !out.empty())
          out.back().second = s.end;
        else
          out.emplace_back(s.start, s.end);
        previous_match = s.is_match;
      }
      break;
    }
    case SplitBehavior::MergedWithNext: {
      bool previous_match = false;
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->is_match && !previous_match && !out.empty())
          out.back().first = it->start;
        else
          out.emplace_back(it->start, it->end);
        previous_match = it->is_match;
      }
      std::reverse(out.begin(), out.end());
      break;
    }
    case SplitBehavior::Contiguous: {
      bool previous_match = false;
      for (const auto& s : spans) {
        if (s.is_match == previous_match && !out.empty())
          out.back().second = s.end;
        else
          out.emplace_back(s.start, s.end);
        previous_match = s.is_match;
      }
      break;
    }
  }
  std::erase_if(out, [](const auto& r) { return r.first == r.second; });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Normalizers

// A piece of text on its way through the pipeline. `at_text_start` is tokenizers' "offsets_original().0 == 0",
// which Metaspace(prepend_scheme="first") consults.
struct Piece {
  std::string text;
  bool at_text_start = false;
};

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void apply(std::string& s) const = 0;
};

class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> steps) : steps_(std::move(steps)) {}
  void apply(std::string& s) const override {
    for (const auto& step : steps_) step->apply(s);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> steps_;
};

class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  void apply(std::string& s) const override {
    if (!s.empty()) s.insert(0, prefix_);
  }

 private:
  std::string prefix_;
};

class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(Pattern pattern, std::string content) : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void apply(std::string& s) const override { s = pattern_.replace(s, content_); }

 private:
  Pattern pattern_;
  std::string content_;
};

class StripNormalizer final : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  void apply(std::string& s) const override {
    size_t begin = 0, end = s.size();
    while (left_ && begin < end) {
      const CodePoint c = decode_at(s, begin);
      if (!is_rust_whitespace(c)) break;
      begin += utf8_len(static_cast<unsigned char>(s[begin]));
    }
    while (right_ && end > begin) {
      const CodePoint c = last_char(std::string_view(s).substr(begin, end - begin));
      if (!is_rust_whitespace(c)) break;
      std::string tmp;
      append_utf8(tmp, c);
      end -= tmp.size();
    }
    s = s.substr(begin, end - begin);
  }

 private:
  bool left_, right_;
};

// NFC/NFD/NFKC/NFKD through utf8proc_map with the options utf8proc_NFC & co. use, minus their NULLTERM: the text
// may hold NUL bytes, which must not end it. ASCII text is invariant under all four forms, which skips the copy
// for most of the input.
class UnicodeNormalizer final : public Normalizer {
 public:
  UnicodeNormalizer(const std::string& form, const std::string& where) {
    int options = UTF8PROC_STABLE;
    if (form == "NFC") options |= UTF8PROC_COMPOSE;
    else if (form == "NFD") options |= UTF8PROC_DECOMPOSE;
    else if (form == "NFKC") options |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
    else if (form == "NFKD") options |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
    else throw Error(where, "no Unicode normalization form " + form);
    options_ = static_cast<utf8proc_option_t>(options);
  }
  void apply(std::string& s) const override {
    if (std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; })) return;
    if (!(options_ & UTF8PROC_COMPOSE) || s.find(kHangulTBase) == std::string::npos) {
      s = map(s);
      return;
    }
    // utf8proc 2.8 composes an LV syllable with U+11A7 = TBase, deleting the U+11A7 (JuliaStrings/utf8proc#317,
    // fixed upstream in 2025), although the first trailing consonant is U+11A8. U+11A7 is a starter that composes
    // with nothing and no other character decomposes to it, so normalization never crosses it: normalizing the
    // pieces between U+11A7s and keeping those verbatim is exact NFC/NFKC.
    std::string out;
    size_t begin = 0;
    for (size_t hit; (hit = s.find(kHangulTBase, begin)) != std::string::npos; begin = hit + kHangulTBase.size()) {
      out += map(std::string_view(s).substr(begin, hit - begin));
      out += kHangulTBase;
    }
    out += map(std::string_view(s).substr(begin));
    s = std::move(out);
  }

 private:
  static constexpr std::string_view kHangulTBase = "\xE1\x86\xA7";  // U+11A7

  std::string map(std::string_view text) const {
    if (text.empty()) return {};
    utf8proc_uint8_t* normalized = nullptr;
    const utf8proc_ssize_t len = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                                              static_cast<utf8proc_ssize_t>(text.size()), &normalized, options_);
    const std::unique_ptr<utf8proc_uint8_t, decltype(&std::free)> owner(normalized, &std::free);
    if (len < 0) throw Error("tokenizer normalizer", std::string("utf8proc: ") + utf8proc_errmsg(len));
    return std::string(reinterpret_cast<const char*>(normalized), static_cast<size_t>(len));
  }

  utf8proc_option_t options_{};
};

std::unique_ptr<Normalizer> parse_normalizer(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string type = j.value("type", "");
  if (type == "Sequence") {
    std::vector<std::unique_ptr<Normalizer>> steps;
    for (const auto& n : j.at("normalizers"))
      if (auto step = parse_normalizer(n, where)) steps.push_back(std::move(step));
    return std::make_unique<SequenceNormalizer>(std::move(steps));
  }
  if (type == "Prepend") return std::make_unique<PrependNormalizer>(j.at("prepend").get<std::string>());
  if (type == "Replace")
    return std::make_unique<ReplaceNormalizer>(parse_pattern(j.at("pattern"), where), j.at("content").get<std::string>());
  if (type == "Strip") return std::make_unique<StripNormalizer>(j.value("strip_left", true), j.value("strip_right", true));
  if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD")
    return std::make_unique<UnicodeNormalizer>(type, where);
  throw Error(where, "normalizer '" + type +
                         "' is not supported (supported: Sequence, Prepend, Replace, Strip, NFC, NFD, NFKC, NFKD)");
}

// ---------------------------------------------------------------------------------------------------------------
// Pre-tokenizers: each refines a list of pieces into smaller pieces (tokenizers' PreTokenizedString::split).

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  virtual void apply(std::vector<Piece>& pieces) const = 0;
  virtual bool is_byte_level() const { return false; }
};

void split_pieces(std::vector<Piece>& pieces,
                  const std::function<std::vector<std::pair<size_t, size_t>>(std::string&, bool)>& splitter) {
  std::vector<Piece> out;
  out.reserve(pieces.size());
  for (auto& piece : pieces) {
    const bool original_start = piece.at_text_start;
    std::string text = std::move(piece.text);
    const size_t original_size = text.size();
    const auto ranges = splitter(text, original_start);
    // A prefix the splitter inserted (Metaspace, ByteLevel add_prefix_space) does not move the piece's origin.
    const size_t inserted = text.size() - original_size;
    for (auto [a, b] : ranges) out.push_back({text.substr(a, b - a), original_start && a <= inserted});
  }
  pieces = std::move(out);
}

class SequencePreTokenizer final : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> steps) : steps_(std::move(steps)) {}
  void apply(std::vector<Piece>& pieces) const override {
    for (const auto& step : steps_) step->apply(pieces);
  }
  bool is_byte_level() const override {
    return std::any_of(steps_.begin(), steps_.end(), [](const auto& s) { return s->is_byte_level(); });
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> steps_;
};

// GPT-2's split regex, the ByteLevel pre-tokenizer's default.
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, bool use_regex, const std::string& where)
      : add_prefix_space_(add_prefix_space) {
    if (use_regex) regex_ = std::make_unique<Regex>(kGpt2Pattern, where);
  }
  void apply(std::vector<Piece>& pieces) const override {
    split_pieces(pieces, [&](std::string& text, bool) {
      if (add_prefix_space_ && (text.empty() || text[0] != ' ')) text.insert(0, " ");
      if (!regex_) return std::vector<std::pair<size_t, size_t>>{{0, text.size()}};
      return apply_split(text.size(), regex_->find_all(text), SplitBehavior::Isolated, false);
    });
    const auto& alphabet = byte_level_alphabet();
    for (auto& piece : pieces) {
      std::string mapped;
      mapped.reserve(piece.text.size() * 2);
      for (unsigned char b : piece.text) mapped += alphabet.byte_to_utf8[b];
      piece.text = std::move(mapped);
    }
  }
  bool is_byte_level() const override { return true; }

 private:
  bool add_prefix_space_;
  std::unique_ptr<Regex> regex_;
};

class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(Pattern pattern, SplitBehavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  void apply(std::vector<Piece>& pieces) const override {
    split_pieces(pieces, [&](std::string& text, bool) {
      return apply_split(text.size(), pattern_.find_all(text), behavior_, invert_);
    });
  }

 private:
  Pattern pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

enum class PrependScheme { Always, First, Never };

class MetaspacePreTokenizer final : public PreTokenizer {
 public:
  MetaspacePreTokenizer(std::string replacement, PrependScheme scheme, bool split)
      : replacement_(std::move(replacement)), scheme_(scheme), split_(split) {}
  void apply(std::vector<Piece>& pieces) const override {
    split_pieces(pieces, [&](std::string& text, bool at_start) {
      text = replace_all(text, " ", replacement_);
      const bool needs_prefix = !text.starts_with(replacement_);
      if (needs_prefix && (scheme_ == PrependScheme::Always || (scheme_ == PrependScheme::First && at_start)))
        text.insert(0, replacement_);
      if (!split_) return std::vector<std::pair<size_t, size_t>>{{0, text.size()}};
      Pattern p;
      p.literal = replacement_;
      return apply_split(text.size(), p.find_all(text), SplitBehavior::MergedWithNext, false);
    });
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
  bool split_;
};

PrependScheme parse_prepend_scheme(const json& j, const std::string& where) {
  if (j.contains("prepend_scheme")) {
    const auto s = j["prepend_scheme"].get<std::string>();
    if (s == "always") return PrependScheme::Always;
    if (s == "first") return PrependScheme::First;
    if (s == "never") return PrependScheme::Never;
    throw Error(where, "unknown Metaspace prepend_scheme '" + s + "'");
  }
  // Files written before prepend_scheme existed carry add_prefix_space, which meant "always".
  return j.value("add_prefix_space", true) ? PrependScheme::Always : PrependScheme::Never;
}

std::string metaspace_replacement(const json& j) {
  if (j.contains("replacement")) return j["replacement"].get<std::string>();
  if (j.contains("str_rep")) return j["str_rep"].get<std::string>();
  return "\u2581";
}

std::unique_ptr<PreTokenizer> parse_pre_tokenizer(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string type = j.value("type", "");
  if (type == "Sequence") {
    std::vector<std::unique_ptr<PreTokenizer>> steps;
    for (const auto& p : j.at("pretokenizers"))
      if (auto step = parse_pre_tokenizer(p, where)) steps.push_back(std::move(step));
    return std::make_unique<SequencePreTokenizer>(std::move(steps));
  }
  if (type == "ByteLevel")
    return std::make_unique<ByteLevelPreTokenizer>(j.value("add_prefix_space", true), j.value("use_regex", true),
                                                   where);
  if (type == "Split")
    return std::make_unique<SplitPreTokenizer>(parse_pattern(j.at("pattern"), where),
                                               parse_behavior(j.at("behavior").get<std::string>(), where),
                                               j.value("invert", false));
  if (type == "Metaspace")
    return std::make_unique<MetaspacePreTokenizer>(metaspace_replacement(j), parse_prepend_scheme(j, where),
                                                   j.value("split", true));
  throw Error(where, "pre_tokenizer '" + type + "' is not supported (supported: Sequence, ByteLevel, Split, Metaspace)");
}

// ---------------------------------------------------------------------------------------------------------------
// Decoders: each maps the list of token strings to a new list (tokenizers' decode_chain); the results are joined.

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual std::vector<std::string> apply(std::vector<std::string> tokens) const = 0;
};

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> steps) : steps_(std::move(steps)) {}
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    for (const auto& step : steps_) tokens = step->apply(std::move(tokens));
    return tokens;
  }

 private:
  std::vector<std::unique_ptr<Decoder>> steps_;
};

class ByteLevelDecoder final : public Decoder {
 public:
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    const auto& alphabet = byte_level_alphabet();
    std::string bytes;
    for (const auto& token : tokens) {
      // A token with any character outside the byte alphabet (an added token such as "<|im_start|> ") is kept
      // as its UTF-8 bytes, exactly like tokenizers.
      std::string mapped;
      bool all_mapped = true;
      for (size_t i = 0; i < token.size();) {
        const CodePoint c = decode_at(token, i);
        const auto it = alphabet.char_to_byte.find(c);
        if (it == alphabet.char_to_byte.end()) {
          all_mapped = false;
          break;
        }
        mapped.push_back(static_cast<char>(it->second));
        i += utf8_len(static_cast<unsigned char>(token[i]));
      }
      bytes += all_mapped ? mapped : token;
    }
    return {utf8_lossy(bytes)};
  }
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(Pattern pattern, std::string content) : pattern_(std::move(pattern)), content_(std::move(content)) {}
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    for (auto& t : tokens) t = pattern_.replace(t, content_);
    return tokens;
  }

 private:
  Pattern pattern_;
  std::string content_;
};

// "<0xNN>" tokens become bytes; a run of them that is not valid UTF-8 becomes one U+FFFD per byte.
class ByteFallbackDecoder final : public Decoder {
 public:
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    std::vector<std::string> out;
    std::string pending;
    size_t pending_count = 0;
    auto flush = [&] {
      if (pending_count == 0) return;
      if (first_invalid_utf8(pending) == std::string_view::npos) {
        out.push_back(pending);
      } else {
        for (size_t i = 0; i < pending_count; ++i) out.emplace_back("\xEF\xBF\xBD");
      }
      pending.clear();
      pending_count = 0;
    };
    for (auto& t : tokens) {
      int byte = -1;
      if (t.size() == 6 && t.starts_with("<0x") && t.back() == '>') {
        char* end = nullptr;
        const std::string hex = t.substr(3, 2);
        const long v = std::strtol(hex.c_str(), &end, 16);
        if (end == hex.c_str() + 2) byte = static_cast<int>(v);
      }
      if (byte >= 0) {
        pending.push_back(static_cast<char>(byte));
        ++pending_count;
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    return out;
  }
};

class FuseDecoder final : public Decoder {
 public:
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    std::string joined;
    for (const auto& t : tokens) joined += t;
    return {joined};
  }
};

class StripDecoder final : public Decoder {
 public:
  StripDecoder(CodePoint content, size_t start, size_t stop) : content_(content), start_(start), stop_(stop) {}
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    for (auto& t : tokens) {
      std::vector<std::pair<size_t, CodePoint>> chars;  // (byte offset, code point)
      for (size_t i = 0; i < t.size(); i += utf8_len(static_cast<unsigned char>(t[i])))
        chars.emplace_back(i, decode_at(t, i));
      size_t start_cut = 0;
      for (size_t i = 0; i < std::min(start_, chars.size()) && chars[i].second == content_; ++i) start_cut = i + 1;
      size_t stop_cut = chars.size();
      for (size_t i = 0; i < stop_ && i < chars.size(); ++i) {
        const size_t index = chars.size() - i - 1;
        if (chars[index].second != content_) break;
        stop_cut = index;
      }
      if (stop_cut <= start_cut) {
        t.clear();
        continue;
      }
      const size_t a = chars[start_cut].first;
      const size_t b = stop_cut < chars.size() ? chars[stop_cut].first : t.size();
      t = t.substr(a, b - a);
    }
    return tokens;
  }

 private:
  CodePoint content_;
  size_t start_, stop_;
};

class MetaspaceDecoder final : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, PrependScheme scheme)
      : replacement_(std::move(replacement)), scheme_(scheme) {}
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    for (size_t i = 0; i < tokens.size(); ++i)
      tokens[i] = replace_all(tokens[i], replacement_, (i == 0 && scheme_ != PrependScheme::Never) ? "" : " ");
    return tokens;
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
};

// nlohmann's get<int32_t>() of a float or an out-of-range number is undefined behaviour, not an exception: integer
// fields of tokenizer.json go through this, which throws a json type_error (turned into oscar::Error by callers).
int32_t json_i32(const json& v) {
  if (!v.is_number_integer() || v.get<int64_t>() < INT32_MIN || v.get<int64_t>() > INT32_MAX)
    throw json::type_error::create(302, "expected a 32-bit integer", &v);
  return static_cast<int32_t>(v.get<int64_t>());
}

std::unique_ptr<Decoder> parse_decoder(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string type = j.value("type", "");
  if (type == "Sequence") {
    std::vector<std::unique_ptr<Decoder>> steps;
    for (const auto& d : j.at("decoders"))
      if (auto step = parse_decoder(d, where)) steps.push_back(std::move(step));
    return std::make_unique<SequenceDecoder>(std::move(steps));
  }
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Replace")
    return std::make_unique<ReplaceDecoder>(parse_pattern(j.at("pattern"), where), j.at("content").get<std::string>());
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Strip") {
    const auto content = j.at("content").get<std::string>();
    return std::make_unique<StripDecoder>(content.empty() ? -1 : decode_at(content, 0), j.contains("start") ? json_i32(j["start"]) : 0,
                                          j.contains("stop") ? json_i32(j["stop"]) : 0);
  }
  if (type == "Metaspace")
    return std::make_unique<MetaspaceDecoder>(metaspace_replacement(j), parse_prepend_scheme(j, where));
  throw Error(where, "decoder '" + type +
                         "' is not supported (supported: Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip, "
                         "Metaspace)");
}

// ---------------------------------------------------------------------------------------------------------------
// Post-processor: the special ids placed around the sequence when add_special_tokens is set.

struct PostProcessor {
  std::vector<int32_t> before;  // e.g. BOS
  std::vector<int32_t> after;   // e.g. EOS
};

void parse_post_processor(const json& j, const std::string& where, PostProcessor& pp) {
  if (j.is_null()) return;
  const std::string type = j.value("type", "");
  if (type == "Sequence") {
    for (const auto& p : j.at("processors")) parse_post_processor(p, where, pp);
    return;
  }
  if (type == "ByteLevel") return;  // only trims offsets; ids are unchanged
  if (type == "TemplateProcessing") {
    const auto& specials = j.at("special_tokens");
    bool seen_sequence = false;
    for (const auto& item : j.at("single")) {
      if (item.contains("Sequence")) {
        if (item["Sequence"].value("id", "A") != "A")
          throw Error(where, "post_processor template 'single' refers to sequence B");
        seen_sequence = true;
      } else if (item.contains("SpecialToken")) {
        const auto name = item["SpecialToken"].at("id").get<std::string>();
        if (!specials.contains(name)) throw Error(where, "post_processor template names unknown special token '" + name + "'");
        for (const auto& id : specials[name].at("ids")) (seen_sequence ? pp.after : pp.before).push_back(json_i32(id));
      } else {
        throw Error(where, "post_processor template item " + item.dump() + " is neither Sequence nor SpecialToken");
      }
    }
    return;
  }
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    pp.before.push_back(json_i32(j.at("cls").at(1)));
    pp.after.push_back(json_i32(j.at("sep").at(1)));
    return;
  }
  throw Error(where, "post_processor '" + type +
                         "' is not supported (supported: TemplateProcessing, ByteLevel, RobertaProcessing, "
                         "BertProcessing, Sequence)");
}

// ---------------------------------------------------------------------------------------------------------------
// BPE model

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};
using Vocab = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

class BpeModel {
 public:
  BpeModel(const json& model, const std::string& where) {
    for (const auto& [token, id] : model.at("vocab").items()) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
        throw Error(where, "model.vocab['" + token + "'] is not a non-negative integer id");
      vocab_.emplace(token, id.get<int32_t>());
    }
    if (model.contains("unk_token") && model["unk_token"].is_string()) {
      unk_token_ = model["unk_token"].get<std::string>();
    }
    fuse_unk_ = model.value("fuse_unk", false);
    byte_fallback_ = model.value("byte_fallback", false);
    ignore_merges_ = model.value("ignore_merges", false);
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (model.contains(key) && model[key].is_string() && !model[key].get<std::string>().empty())
        throw Error(where, std::string("model.") + key + " is not supported (only byte-level and SentencePiece-style "
                           "BPE tokenizers are)");
    if (model.contains("dropout") && model["dropout"].is_number() && model["dropout"].get<double>() > 0.0)
      throw Error(where, "model.dropout > 0 makes BPE non-deterministic and is not supported");

    if (byte_fallback_)
      for (int b = 0; b < 256; ++b) {
        char name[8];
        std::snprintf(name, sizeof(name), "<0x%02X>", b);
        const auto it = vocab_.find(std::string_view(name));
        byte_ids_[b] = it == vocab_.end() ? -1 : it->second;
      }

    const json& merges = model.at("merges");
    merges_.reserve(merges.size());
    int32_t rank = 0;
    for (const auto& m : merges) {
      std::string left, right;
      if (m.is_string()) {
        const auto s = m.get<std::string>();
        const size_t space = s.find(' ');
        if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos)
          throw Error(where, "model.merges[" + std::to_string(rank) + "] '" + s + "' is not two tokens separated by one space");
        left = s.substr(0, space);
        right = s.substr(space + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        left = m[0].get<std::string>();
        right = m[1].get<std::string>();
      } else {
        throw Error(where, "model.merges[" + std::to_string(rank) + "] is neither \"a b\" nor [\"a\", \"b\"]");
      }
      const auto a = vocab_.find(left), b = vocab_.find(right), merged = vocab_.find(left + right);
      for (const auto& [it, tok] : {std::pair{a, left}, std::pair{b, right}, std::pair{merged, left + right}})
        if (it == vocab_.end())
          throw Error(where, "model.merges[" + std::to_string(rank) + "] uses token '" + tok + "' that is not in the vocab");
      // Later duplicates of a pair must not override the earlier (better) rank, as in tokenizers' HashMap build.
      merges_.emplace(pair_key(a->second, b->second), MergeInfo{rank, merged->second});
      ++rank;
    }
    if (unk_token_) {
      const auto it = vocab_.find(*unk_token_);
      if (it == vocab_.end()) throw Error(where, "model.unk_token '" + *unk_token_ + "' is not in the vocab");
      unk_token_id_ = it->second;
    }
  }

  const Vocab& vocab() const { return vocab_; }

  // Appends the ids of one pre-tokenized word.
  void tokenize(std::string_view word, std::vector<int32_t>& out) const {
    if (word.empty()) return;
    if (ignore_merges_) {
      if (const auto it = vocab_.find(word); it != vocab_.end()) {
        out.push_back(it->second);
        return;
      }
    }
    {
      std::shared_lock lock(cache_mutex_);
      if (const auto it = cache_.find(word); it != cache_.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int32_t> ids = merge_word(word);
    out.insert(out.end(), ids.begin(), ids.end());
    if (word.size() < kMaxCachedWordBytes) {
      std::unique_lock lock(cache_mutex_);
      if (cache_.size() < kCacheCapacity) cache_.emplace(std::string(word), std::move(ids));
    }
  }

 private:
  struct MergeInfo {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  const MergeInfo* find_merge(int32_t a, int32_t b) const {
    const auto it = merges_.find(pair_key(a, b));
    return it == merges_.end() ? nullptr : &it->second;
  }

  // tokenizers' Word: a doubly linked list of symbols so merges are O(1), with a min-heap of candidate merges
  // keyed by (rank, position). Stale heap entries are detected by re-checking the pair, exactly as upstream does,
  // which makes the merge order (and so the ids) identical.
  std::vector<int32_t> merge_word(std::string_view w) const {
    struct Symbol {
      int32_t id;
      int32_t prev, next;
      size_t len;
    };
    std::vector<Symbol> symbols;
    symbols.reserve(w.size());
    auto add = [&](int32_t id, size_t len) {
      const auto index = static_cast<int32_t>(symbols.size());
      if (index > 0) symbols.back().next = index;
      symbols.push_back({id, index - 1, -1, len});
    };

    // A pending unk (id, byte length), fused with following unknown characters when fuse_unk is set.
    bool unk_pending = false;
    int32_t unk_id = -1;
    size_t unk_len = 0;
    for (size_t i = 0; i < w.size();) {
      const size_t len = std::min(utf8_len(static_cast<unsigned char>(w[i])), w.size() - i);
      const std::string_view ch = w.substr(i, len);
      i += len;
      if (const auto it = vocab_.find(ch); it != vocab_.end()) {
        if (unk_pending) {
          add(unk_id, unk_len);
          unk_pending = false;
        }
        add(it->second, len);
        continue;
      }
      if (byte_fallback_) {
        const bool all_bytes = std::all_of(ch.begin(), ch.end(), [&](char c) { return byte_ids_[static_cast<unsigned char>(c)] >= 0; });
        if (all_bytes) {
          // Upstream does not flush a pending unk here, so it lands after the byte tokens; kept for identical ids.
          for (char c : ch) add(byte_ids_[static_cast<unsigned char>(c)], 1);
          continue;
        }
      }
      if (unk_token_) {
        if (unk_pending && fuse_unk_) {
          unk_len += len;
        } else {
          if (unk_pending) add(unk_id, unk_len);
          unk_pending = true;
          unk_id = unk_token_id_;
          unk_len = len;
        }
      }
    }
    if (unk_pending) add(unk_id, unk_len);

    struct Candidate {
      int32_t rank;
      int32_t pos;
      int32_t new_id;
      bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
    for (size_t i = 0; i + 1 < symbols.size(); ++i)
      if (const auto* m = find_merge(symbols[i].id, symbols[i + 1].id))
        queue.push({m->rank, static_cast<int32_t>(i), m->new_id});

    while (!queue.empty()) {
      const Candidate top = queue.top();
      queue.pop();
      Symbol& current = symbols[top.pos];
      if (current.len == 0 || current.next == -1) continue;
      const int32_t next_pos = current.next;
      const Symbol right = symbols[next_pos];
      const auto* m = find_merge(current.id, right.id);
      if (!m || m->new_id != top.new_id) continue;

      current.id = top.new_id;
      current.len += right.len;
      current.next = right.next;
      symbols[next_pos].len = 0;
      if (right.next >= 0) symbols[right.next].prev = top.pos;

      if (current.prev >= 0)
        if (const auto* pm = find_merge(symbols[current.prev].id, current.id))
          queue.push({pm->rank, current.prev, pm->new_id});
      if (current.next >= 0)
        if (const auto* nm = find_merge(current.id, symbols[current.next].id))
          queue.push({nm->rank, top.pos, nm->new_id});
    }

    std::vector<int32_t> ids;
    for (const auto& s : symbols)
      if (s.len != 0) ids.push_back(s.id);
    return ids;
  }

  // Same limit as tokenizers' cache: long words (minified code, base64) are rare and would only bloat it.
  static constexpr size_t kMaxCachedWordBytes = 256;
  static constexpr size_t kCacheCapacity = 200000;

  Vocab vocab_;
  std::unordered_map<uint64_t, MergeInfo> merges_;
  std::optional<std::string> unk_token_;
  int32_t unk_token_id_ = -1;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  std::array<int32_t, 256> byte_ids_{};

  mutable std::shared_mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> cache_;
};

// ---------------------------------------------------------------------------------------------------------------
// Added tokens

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool single_word = false, lstrip = false, rstrip = false, normalized = false, special = false;
};

// Leftmost-longest matcher over a set of added tokens (tokenizers uses Aho-Corasick with the same match kind).
// Added-token sets are small (tens to a few hundred) and almost all start with '<', so candidates are bucketed by
// first byte and tried longest first.
class AddedTokenMatcher {
 public:
  void add(const AddedToken* token, std::string pattern) {
    if (pattern.empty()) return;
    buckets_[static_cast<unsigned char>(pattern[0])].push_back({std::move(pattern), token});
    for (auto& bucket : buckets_)
      std::stable_sort(bucket.begin(), bucket.end(),
                       [](const auto& a, const auto& b) { return a.pattern.size() > b.pattern.size(); });
  }
  bool empty() const {
    return std::all_of(buckets_.begin(), buckets_.end(), [](const auto& b) { return b.empty(); });
  }

  struct Segment {
    size_t start, end;
    const AddedToken* token;  // nullptr for ordinary text
  };

  // tokenizers' AddedVocabulary::find_matches, including the single_word/lstrip/rstrip adjustments.
  std::vector<Segment> split(std::string_view s) const {
    std::vector<Segment> out;
    size_t start_offset = 0;
    size_t pos = 0;
    while (pos < s.size()) {
      const Candidate* hit = nullptr;
      for (const auto& c : buckets_[static_cast<unsigned char>(s[pos])])
        if (s.compare(pos, c.pattern.size(), c.pattern) == 0) {
          hit = &c;
          break;
        }
      if (!hit) {
        ++pos;
        continue;
      }
      size_t start = pos, stop = pos + hit->pattern.size();
      pos = stop;  // the automaton resumes after the raw match, before any rstrip extension
      const AddedToken& token = *hit->token;
      if (start < start_offset) continue;
      if (token.single_word) {
        const bool start_space = start == 0 || !is_word_char(last_char(s.substr(0, start)));
        const bool stop_space = stop == s.size() || !is_word_char(decode_at(s, stop));
        if (!start_space || !stop_space) continue;
      }
      if (token.lstrip) {
        size_t new_start = start;
        while (new_start > 0) {
          const CodePoint c = last_char(s.substr(0, new_start));
          if (!is_rust_whitespace(c)) break;
          std::string tmp;
          append_utf8(tmp, c);
          new_start -= tmp.size();
        }
        start = std::max(new_start, start_offset);
      }
      if (token.rstrip) {
        while (stop < s.size()) {
          const CodePoint c = decode_at(s, stop);
          if (!is_rust_whitespace(c)) break;
          stop += utf8_len(static_cast<unsigned char>(s[stop]));
        }
      }
      if (start > start_offset) out.push_back({start_offset, start, nullptr});
      out.push_back({start, stop, &token});
      start_offset = stop;
      pos = std::max(pos, stop);
    }
    if (start_offset < s.size()) out.push_back({start_offset, s.size(), nullptr});
    return out;
  }

 private:
  struct Candidate {
    std::string pattern;
    const AddedToken* token;
  };
  std::array<std::vector<Candidate>, 256> buckets_;
};

// ---------------------------------------------------------------------------------------------------------------
// The tokenizer

std::optional<std::string> special_token_string(const json& config, const char* key) {
  if (!config.contains(key)) return std::nullopt;
  const json& v = config[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return std::nullopt;
}

class JsonTokenizer final : public Tokenizer {
 public:
  explicit JsonTokenizer(const std::filesystem::path& file) {
    const std::string where = file.string();
    std::ifstream in(file, std::ios::binary);
    if (!in) throw Error(where, "cannot open tokenizer.json");
    json j;
    try {
      j = json::parse(in);
    } catch (const json::exception& e) {
      throw Error(where, std::string("malformed JSON: ") + e.what());
    }
    if (!j.is_object()) throw Error(where, "top level is not a JSON object");
    if (!j.contains("model") || !j["model"].is_object()) throw Error(where, "no 'model' object");
    const json& model_json = j["model"];
    if (model_json.contains("type") && !model_json["type"].is_string())
      throw Error(where, "'model.type' is not a string");
    const std::string model_type = model_json.value("type", "");
    if (model_type != "BPE" && !(model_type.empty() && j["model"].contains("merges")))
      throw Error(where, "model type '" + model_type + "' is not supported (only BPE)");

    try {
      model_ = std::make_unique<BpeModel>(j["model"], where);
      if (j.contains("normalizer")) normalizer_ = parse_normalizer(j["normalizer"], where);
      if (j.contains("pre_tokenizer")) pre_tokenizer_ = parse_pre_tokenizer(j["pre_tokenizer"], where);
      if (j.contains("decoder")) decoder_ = parse_decoder(j["decoder"], where);
      if (j.contains("post_processor")) parse_post_processor(j["post_processor"], where, post_processor_);
      if (j.contains("added_tokens") && !j["added_tokens"].is_null()) parse_added_tokens(j["added_tokens"], where);
    } catch (const json::exception& e) {
      throw Error(where, std::string("unexpected structure: ") + e.what());
    }

    // Ids index a dense table (id -> token), so a forged id like 2e9 would ask for tens of GB. Real files number
    // their tokens 0..N-1 with at most small holes (Qwen3: 151643 vocab + 26 added, ids up to 151668), so ids
    // beyond twice the defined count (+64K slack) are refused rather than allocated.
    const int64_t defined = static_cast<int64_t>(model_->vocab().size() + added_.size());
    const int64_t id_limit = 2 * defined + 65536;
    auto check_id = [&](int32_t id, const std::string& token, const char* field) {
      if (id >= id_limit)
        throw Error(where, ::fmt::format("{} id {} of token '{}' is far beyond the {} tokens the file defines "
                                         "(ids must be dense, at most {})",
                                         field, id, token.substr(0, 64), defined, id_limit - 1));
    };
    for (const auto& [token, id] : model_->vocab()) check_id(id, token, "model.vocab");
    for (const auto& t : added_) check_id(t.id, t.content, "added_tokens");
    for (const auto& [token, id] : model_->vocab()) set_token(id, token);
    for (const auto& t : added_) set_token(t.id, t.content);
    resolve_bos_eos(file);
    kind_ = pre_tokenizer_ && pre_tokenizer_->is_byte_level() ? "tokenizer.json (byte-level BPE)"
                                                                : "tokenizer.json (BPE)";
  }

  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const override {
    if (const size_t bad = first_invalid_utf8(text); bad != std::string_view::npos)
      throw Error("tokenizer.encode", "text is not valid UTF-8 at byte " + std::to_string(bad));
    std::vector<int32_t> ids;
    if (add_special_tokens) ids = post_processor_.before;

    // Stage 1: added tokens matched on the raw text; stage 2: normalize what is left, then match the
    // normalized=true added tokens on the normalized text.
    for (const auto& raw : raw_matcher_.split(text)) {
      if (raw.token) {
        ids.push_back(raw.token->id);
        continue;
      }
      std::string normalized(text.substr(raw.start, raw.end - raw.start));
      if (normalizer_) normalizer_->apply(normalized);
      for (const auto& seg : normalized_matcher_.split(normalized)) {
        if (seg.token) {
          ids.push_back(seg.token->id);
          continue;
        }
        std::vector<Piece> pieces{{normalized.substr(seg.start, seg.end - seg.start), raw.start == 0 && seg.start == 0}};
        if (pre_tokenizer_) pre_tokenizer_->apply(pieces);
        for (const auto& piece : pieces) model_->tokenize(piece.text, ids);
      }
    }
    if (add_special_tokens) ids.insert(ids.end(), post_processor_.after.begin(), post_processor_.after.end());
    return ids;
  }

  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens) const override {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (int32_t id : ids) {
      if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || !has_token_[id]) continue;
      if (skip_special_tokens && special_ids_.contains(id)) continue;
      tokens.push_back(id_to_token_[id]);
    }
    if (!decoder_) {
      std::string joined;
      for (size_t i = 0; i < tokens.size(); ++i) {
        if (i) joined += ' ';
        joined += tokens[i];
      }
      return joined;
    }
    std::string out;
    for (const auto& piece : decoder_->apply(std::move(tokens))) out += piece;
    return out;
  }

  // The largest id + 1, so that every id the tokenizer can produce indexes an embedding table of this size.
  int64_t vocab_size() const override { return static_cast<int64_t>(id_to_token_.size()); }

  std::optional<int32_t> token_to_id(std::string_view token) const override {
    for (const auto& t : added_)
      if (t.content == token) return t.id;
    if (const auto it = model_->vocab().find(token); it != model_->vocab().end()) return it->second;
    return std::nullopt;
  }
  std::string id_to_token(int32_t id) const override {
    if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || !has_token_[id])
      throw Error("tokenizer", "id " + std::to_string(id) + " is not in the vocabulary");
    return id_to_token_[id];
  }
  std::optional<int32_t> bos_id() const override { return bos_id_; }
  std::optional<int32_t> eos_id() const override { return eos_id_; }
  std::string kind() const override { return kind_; }

 private:
  void parse_added_tokens(const json& list, const std::string& where) {
    added_.reserve(list.size());  // matchers keep pointers into added_
    for (const auto& t : list) {
      AddedToken a;
      // get<int32_t>() of a float or an out-of-range integer is undefined behaviour, not an exception.
      const json& id = t.at("id");
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
        throw Error(where, "added_tokens: 'id' is not an integer in [0, 2^31)");
      a.id = static_cast<int32_t>(id.get<int64_t>());
      a.content = t.at("content").get<std::string>();
      a.single_word = t.value("single_word", false);
      a.lstrip = t.value("lstrip", false);
      a.rstrip = t.value("rstrip", false);
      a.normalized = t.value("normalized", !t.value("special", false));
      a.special = t.value("special", false);
      added_.push_back(std::move(a));
    }
    for (const auto& a : added_) {
      if (a.special) special_ids_.insert(a.id);
      if (a.normalized) {
        // tokenizers matches normalized added tokens by their normalized content.
        std::string pattern = a.content;
        if (normalizer_) normalizer_->apply(pattern);
        normalized_matcher_.add(&a, std::move(pattern));
      } else {
        raw_matcher_.add(&a, a.content);
      }
    }
  }

  void set_token(int32_t id, const std::string& token) {
    if (static_cast<size_t>(id) >= id_to_token_.size()) {
      id_to_token_.resize(static_cast<size_t>(id) + 1);
      has_token_.resize(static_cast<size_t>(id) + 1, false);
    }
    id_to_token_[id] = token;
    has_token_[id] = true;
  }

  // tokenizer_config.json beside the file is authoritative (it is what transformers uses); without it the
  // template's leading/trailing special tokens, then conventional names, are the best evidence.
  void resolve_bos_eos(const std::filesystem::path& file) {
    const auto config_path = file.parent_path() / "tokenizer_config.json";
    if (std::filesystem::exists(config_path)) {
      std::ifstream in(config_path, std::ios::binary);
      json config;
      try {
        config = json::parse(in);
      } catch (const json::exception& e) {
        throw Error(config_path.string(), std::string("malformed JSON: ") + e.what());
      }
      if (config.is_object() && (config.contains("bos_token") || config.contains("eos_token"))) {
        if (auto s = special_token_string(config, "bos_token")) bos_id_ = token_to_id(*s);
        if (auto s = special_token_string(config, "eos_token")) eos_id_ = token_to_id(*s);
        return;
      }
    }
    if (!post_processor_.before.empty()) bos_id_ = post_processor_.before.front();
    if (!post_processor_.after.empty()) eos_id_ = post_processor_.after.back();
    for (const char* name : {"<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"})
      if (!bos_id_) bos_id_ = token_to_id(name);
    for (const char* name : {"</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"})
      if (!eos_id_) eos_id_ = token_to_id(name);
  }

  std::unique_ptr<BpeModel> model_;
  std::unique_ptr<Normalizer> normalizer_;
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
  std::unique_ptr<Decoder> decoder_;
  PostProcessor post_processor_;
  std::vector<AddedToken> added_;
  AddedTokenMatcher raw_matcher_, normalized_matcher_;
  std::unordered_set<int32_t> special_ids_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> has_token_;
  std::optional<int32_t> bos_id_, eos_id_;
  std::string kind_;
};

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::from_tokenizer_json(const std::filesystem::path& file) {
  return std::make_unique<JsonTokenizer>(file);
}

std::unique_ptr<Tokenizer> Tokenizer::load(const std::filesystem::path& model_dir) {
  if (std::filesystem::exists(model_dir / "tokenizer.json")) return from_tokenizer_json(model_dir / "tokenizer.json");
  if (std::filesystem::exists(model_dir / "tokenizer.model")) return from_sentencepiece(model_dir / "tokenizer.model");
  throw Error(model_dir.string(), "no tokenizer.json or tokenizer.model in this directory");
}

}  // namespace oscar::fmt
