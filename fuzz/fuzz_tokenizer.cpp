// tokenizer.json: model/vocab/merges, normalizers, pre-tokenizers (PCRE2 patterns from the file), added tokens,
// post-processor templates, decoders; then encode/decode of fixed texts and of the input's own bytes.
#include <algorithm>
#include <string_view>

#include "formats/error.h"
#include "formats/tokenizer.h"
#include "fuzz/fuzz_input_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = oscar::fuzz::write_input("tokenizer.json", data, size);
  try {
    const auto tok = oscar::fmt::Tokenizer::from_tokenizer_json(path);
    const std::string_view own(reinterpret_cast<const char*>(data), std::min<size_t>(size, 256));
    for (std::string_view text : {std::string_view("Hello, world! 123"), std::string_view(" \xc3\xa9\xe2\x96\x81x\n"),
                                  std::string_view(""), own}) {
      for (bool special : {true, false}) {
        const auto ids = tok->encode(text, special);
        (void)tok->decode(ids, true);
        (void)tok->decode(ids, false);
      }
    }
    const int64_t n = tok->vocab_size();
    for (int32_t id : {0, 1, static_cast<int32_t>(n > 0 ? n - 1 : 0)})
      if (id < n) (void)tok->id_to_token(id);
    (void)tok->token_to_id("a");
  } catch (const oscar::Error&) {
  }
  return 0;
}
