// The Unicode parts of the tokenizer.json pipeline (normalizers, White_Space for Strip/lstrip/rstrip, Rust's
// is_alphanumeric for single_word) against expected bytes worked out by hand from the Unicode Character Database
// and UAX #15. The probe is a byte-level tokenizer without merges whose vocabulary gives every byte its own value
// as id, so encode() returns the UTF-8 bytes of the normalized text and the bytes can be compared directly.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "formats/tokenizer.h"
#include "test_support.h"

namespace oscar::fmt {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Ids = std::vector<int32_t>;

constexpr int32_t kAddedTokenId = 300;

std::string utf8(char32_t c) {
  std::string out;
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
  return out;
}

// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 for U+0100.. in order.
json byte_vocab() {
  json vocab = json::object();
  int next_extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    vocab[utf8(printable ? b : 256 + next_extra++)] = b;
  }
  vocab["<w>"] = kAddedTokenId;
  return vocab;
}

std::unique_ptr<Tokenizer> byte_probe(const fs::path& dir, const json& normalizer, const json& added = json::array()) {
  const json j = {{"added_tokens", added},
                  {"normalizer", normalizer},
                  {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}},
                  {"decoder", {{"type", "ByteLevel"}}},
                  {"model", {{"type", "BPE"}, {"vocab", byte_vocab()}, {"merges", json::array()}}}};
  fs::create_directories(dir);
  std::ofstream(dir / "tokenizer.json") << j.dump();
  return Tokenizer::from_tokenizer_json(dir / "tokenizer.json");
}

struct Case {
  std::string text;
  Ids bytes;  // expected UTF-8 bytes of the normalized text
};

void expect_bytes(const Tokenizer& tok, const std::string& form, const std::vector<Case>& cases) {
  for (const auto& c : cases) {
    Ids text_bytes(c.text.begin(), c.text.end());
    for (auto& b : text_bytes) b &= 0xFF;
    EXPECT_EQ(tok.encode(c.text, false), c.bytes) << form << " of bytes " << ::testing::PrintToString(text_bytes);
  }
}

TEST(TokenizerUnicode, NfcComposesReordersAndKeepsCompatibilityCharacters) {
  const auto tok = byte_probe(test::temp_dir_for_test(), {{"type", "NFC"}});
  expect_bytes(*tok, "NFC",
               {
                   {"e\u0301", {0xC3, 0xA9}},                                     // e + acute -> U+00E9
                   {"\u212B", {0xC3, 0x85}},                                      // ANGSTROM SIGN -> U+00C5
                   {"\u0958", {0xE0, 0xA4, 0x95, 0xE0, 0xA4, 0xBC}},              // exclusion: stays KA + NUKTA
                   {"\uFB01", {0xEF, 0xAC, 0x81}},                                // ligature fi kept by NFC
                   {"a\u0307\u0323", {0xE1, 0xBA, 0xA1, 0xCC, 0x87}},             // dot below (220) before dot above
                   {"\u1E9B\u0323", {0xE1, 0xBA, 0x9B, 0xCC, 0xA3}},              // UAX #15 figure 6
                   {"\u1100\u1161", {0xEA, 0xB0, 0x80}},                          // jamo L+V -> U+AC00
                   {"\u1100\u1161\u11A8", {0xEA, 0xB0, 0x81}},                    // L+V+T -> U+AC01
                   {"\uAC00\u11A8", {0xEA, 0xB0, 0x81}},                          // LV+T -> U+AC01
                   {"\uAC00\u11A7", {0xEA, 0xB0, 0x80, 0xE1, 0x86, 0xA7}},        // U+11A7 is TBase, not a T
                   {"\u1100\u1161\u11A7", {0xEA, 0xB0, 0x80, 0xE1, 0x86, 0xA7}},  // same after composing L+V
                   {std::string("e\u0301\0e\u0301", 7), {0xC3, 0xA9, 0x00, 0xC3, 0xA9}},  // NUL does not end the text
               });
}

TEST(TokenizerUnicode, NfkcFoldsCompatibilityCharacters) {
  const auto tok = byte_probe(test::temp_dir_for_test(), {{"type", "NFKC"}});
  expect_bytes(*tok, "NFKC",
               {
                   {"\uFB01", {'f', 'i'}},                                 // LATIN SMALL LIGATURE FI
                   {"\u2460", {'1'}},                                      // CIRCLED DIGIT ONE
                   {"x\u00B2", {'x', '2'}},                                // SUPERSCRIPT TWO
                   {"\uFF76\uFF9E", {0xE3, 0x82, 0xAC}},                   // halfwidth KA + voiced mark -> U+30AC
                   {"\u1E9B\u0323", {0xE1, 0xB9, 0xA9}},                   // UAX #15 figure 6 -> U+1E69
                   {"\u1100\u1161\u11A7", {0xEA, 0xB0, 0x80, 0xE1, 0x86, 0xA7}},
               });
}

TEST(TokenizerUnicode, NfdAndNfkdDecompose) {
  const fs::path dir = test::temp_dir_for_test();
  const auto nfd = byte_probe(dir / "nfd", {{"type", "NFD"}});
  expect_bytes(*nfd, "NFD",
               {
                   {"\u00E9", {'e', 0xCC, 0x81}},
                   {"\uAC01", {0xE1, 0x84, 0x80, 0xE1, 0x85, 0xA1, 0xE1, 0x86, 0xA8}},  // U+1100 U+1161 U+11A8
                   {"\uFB01", {0xEF, 0xAC, 0x81}},
               });
  const auto nfkd = byte_probe(dir / "nfkd", {{"type", "NFKD"}});
  expect_bytes(*nfkd, "NFKD",
               {
                   {"\uFB01", {'f', 'i'}},
                   {"\u1E9B\u0323", {'s', 0xCC, 0xA3, 0xCC, 0x87}},  // UAX #15 figure 6: s + dot below + dot above
               });
}

// Rust's char::is_whitespace is White_Space: Zs/Zl/Zp and TAB..CR, NEL; not ZWSP (Cf) nor, since Unicode 6.3,
// U+180E MONGOLIAN VOWEL SEPARATOR.
TEST(TokenizerUnicode, StripRemovesExactlyWhiteSpace) {
  const auto tok = byte_probe(test::temp_dir_for_test(), {{"type", "Strip"}, {"strip_left", true}, {"strip_right", true}});
  expect_bytes(*tok, "Strip",
               {
                   {"\u3000\u2028a\u0085\u00A0", {'a'}},
                   {"\t\u2029a\u202F\u205F", {'a'}},
                   {"\u200Ba\u180E", {0xE2, 0x80, 0x8B, 'a', 0xE1, 0xA0, 0x8E}},
               });
}

// single_word: the added token matches only where neither neighbour is alphanumeric (Rust's is_alphanumeric:
// Alphabetic or Nd/Nl/No) or '_'. Alphabetic includes Other_Alphabetic marks and the circled letters, which no
// general category alone identifies.
TEST(TokenizerUnicode, SingleWordBoundaryUsesRustAlphanumeric) {
  const json added = json::array({{{"id", kAddedTokenId}, {"content", "<w>"}, {"single_word", true},
                                   {"lstrip", false}, {"rstrip", false}, {"normalized", false}, {"special", true}}});
  const auto tok = byte_probe(test::temp_dir_for_test(), nullptr, added);
  const Ids w_bytes = {'<', 'w', '>'};
  auto joined = [](Ids a, const Ids& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  struct WordCase {
    std::string before;
    Ids before_bytes;
    bool word;  // is the character before "<w>" alphanumeric?
  };
  const std::vector<WordCase> cases = {
      {"!", {'!'}, false},
      {"_", {'_'}, true},
      {"\u00E9", {0xC3, 0xA9}, true},                    // Ll
      {"\u0301", {0xCC, 0x81}, false},                   // Mn, not Alphabetic
      {"\u0345", {0xCD, 0x85}, true},                    // Mn with Other_Alphabetic
      {"\u093E", {0xE0, 0xA4, 0xBE}, true},              // Mc with Other_Alphabetic
      {"\u24B6", {0xE2, 0x92, 0xB6}, true},              // CIRCLED LATIN CAPITAL LETTER A: So, Alphabetic
      {"\u2460", {0xE2, 0x91, 0xA0}, true},              // CIRCLED DIGIT ONE: No
      {"\u2160", {0xE2, 0x85, 0xA0}, true},              // ROMAN NUMERAL ONE: Nl
      {"\U0001F600", {0xF0, 0x9F, 0x98, 0x80}, false},   // emoji: So, not Alphabetic
  };
  for (const auto& c : cases) {
    const Ids expected = c.word ? joined(c.before_bytes, w_bytes) : joined(c.before_bytes, {kAddedTokenId});
    EXPECT_EQ(tok->encode(c.before + "<w>", false), expected) << "before: " << ::testing::PrintToString(c.before_bytes);
    const Ids after_expected = c.word ? joined(w_bytes, c.before_bytes) : joined({kAddedTokenId}, c.before_bytes);
    EXPECT_EQ(tok->encode("<w>" + c.before, false), after_expected)
        << "after: " << ::testing::PrintToString(c.before_bytes);
  }
}

}  // namespace
}  // namespace oscar::fmt
