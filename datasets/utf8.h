#pragma once
// Strict UTF-8 validation (RFC 3629): rejects overlong forms, UTF-16 surrogates, code points above U+10FFFF and
// truncated sequences. Text sources use it to skip (and count) lines a tokenizer would otherwise mangle.
#include <string_view>

namespace oscar::data {

bool is_valid_utf8(std::string_view bytes);

}  // namespace oscar::data
