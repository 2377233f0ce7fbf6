#pragma once
// Tokenizers: Hugging Face tokenizer.json (BPE; byte-level with the GPT-2/Llama-3/Qwen2 split regex through PCRE2,
// or SentencePiece-style with ▁ and byte fallback as in Llama-2/Mistral; added/special tokens; the post-processor
// template for BOS/EOS) and SentencePiece tokenizer.model through libsentencepiece. ids match the `tokenizers`
// package exactly.
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace oscar::fmt {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // add_special_tokens=true applies the post-processor (e.g. BOS for Llama-2/3), as `tokenizers`' encode does by
  // default. Special/added tokens written in the text are matched as single tokens.
  virtual std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = true) const = 0;
  // skip_special_tokens drops ids of special tokens (BOS/EOS/...), like `tokenizers`' decode.
  virtual std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = true) const = 0;

  virtual int64_t vocab_size() const = 0;  // including added tokens
  virtual std::optional<int32_t> token_to_id(std::string_view token) const = 0;
  virtual std::string id_to_token(int32_t id) const = 0;
  virtual std::optional<int32_t> bos_id() const = 0;
  virtual std::optional<int32_t> eos_id() const = 0;
  virtual std::string kind() const = 0;  // "tokenizer.json (byte-level BPE)", "sentencepiece", ...

  // tokenizer.json preferred, else tokenizer.model; throws oscar::Error naming the directory when neither exists.
  static std::unique_ptr<Tokenizer> load(const std::filesystem::path& model_dir);
  static std::unique_ptr<Tokenizer> from_tokenizer_json(const std::filesystem::path& file);
  static std::unique_ptr<Tokenizer> from_sentencepiece(const std::filesystem::path& file);
};

}  // namespace oscar::fmt
