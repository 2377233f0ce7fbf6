#pragma once
// A tokenizer whose ids are known by construction (id = byte + 3; 0 pad, 1 BOS, 2 EOS), so packing tests can
// state the exact expected token stream without depending on a real vocabulary.
#include <optional>
#include <string>
#include <vector>

#include "formats/tokenizer.h"

namespace oscar::test {

class ByteTokenizer : public fmt::Tokenizer {
 public:
  explicit ByteTokenizer(std::optional<int32_t> bos = 1, std::optional<int32_t> eos = 2) : bos_(bos), eos_(eos) {}
  static int32_t id(char c) { return static_cast<int32_t>(static_cast<unsigned char>(c)) + 3; }
  static std::vector<int32_t> ids(std::string_view s) {
    std::vector<int32_t> out;
    for (char c : s) out.push_back(id(c));
    return out;
  }

  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const override {
    std::vector<int32_t> out;
    if (add_special_tokens && bos_) out.push_back(*bos_);
    for (char c : text) out.push_back(id(c));
    return out;
  }
  std::string decode(std::span<const int32_t> ids, bool) const override {
    std::string s;
    for (int32_t i : ids)
      if (i >= 3) s.push_back(static_cast<char>(i - 3));
    return s;
  }
  int64_t vocab_size() const override { return 259; }
  std::optional<int32_t> token_to_id(std::string_view) const override { return std::nullopt; }
  std::string id_to_token(int32_t id) const override { return std::to_string(id); }
  std::optional<int32_t> bos_id() const override { return bos_; }
  std::optional<int32_t> eos_id() const override { return eos_; }
  std::string kind() const override { return "test bytes"; }

 private:
  std::optional<int32_t> bos_, eos_;
};

}  // namespace oscar::test
