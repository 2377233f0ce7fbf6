#pragma once
// Element types that appear in checkpoints and dumps, and exact scalar conversions between them.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace oscar::fmt {

enum class DType : uint8_t { F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U64, U32, U16, U8, BOOL };

// Size of one element in bytes.
size_t dtype_size(DType t);
// The safetensors spelling ("F32", "BF16", ...).
std::string_view dtype_name(DType t);
// Parses the safetensors spelling; throws oscar::Error(where, ...) on an unknown name.
DType parse_dtype(std::string_view name, const std::string& where);
inline bool is_float(DType t) {
  return t == DType::F64 || t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::F8_E4M3 ||
         t == DType::F8_E5M2;
}

// bf16 keeps the top 16 bits of an fp32; rounding to nearest-even matches torch's .to(torch.bfloat16).
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
// IEEE half <-> float, exact for every half value, round-to-nearest-even on the way down.
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

}  // namespace oscar::fmt
