#include "formats/dtype.h"

#include <array>
#include <utility>

#include "formats/error.h"

namespace oscar::fmt {

namespace {

struct DTypeInfo {
  DType type;
  std::string_view name;
  size_t size;
};

// The safetensors spellings; F8 names follow the reference implementation ("F8_E4M3", "F8_E5M2").
constexpr std::array<DTypeInfo, 15> kDTypes{{
    {DType::F64, "F64", 8},
    {DType::F32, "F32", 4},
    {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2},
    {DType::F8_E4M3, "F8_E4M3", 1},
    {DType::F8_E5M2, "F8_E5M2", 1},
    {DType::I64, "I64", 8},
    {DType::I32, "I32", 4},
    {DType::I16, "I16", 2},
    {DType::I8, "I8", 1},
    {DType::U64, "U64", 8},
    {DType::U32, "U32", 4},
    {DType::U16, "U16", 2},
    {DType::U8, "U8", 1},
    {DType::BOOL, "BOOL", 1},
}};

const DTypeInfo& info(DType t) {
  for (const auto& i : kDTypes)
    if (i.type == t) return i;
  throw Error("", "invalid DType value " + std::to_string(static_cast<int>(t)));
}

}  // namespace

size_t dtype_size(DType t) { return info(t).size; }

std::string_view dtype_name(DType t) { return info(t).name; }

DType parse_dtype(std::string_view name, const std::string& where) {
  for (const auto& i : kDTypes)
    if (i.name == name) return i.type;
  std::string known;
  for (const auto& i : kDTypes) known += (known.empty() ? "" : ", ") + std::string(i.name);
  throw Error(where, "unknown dtype '" + std::string(name) + "' (known: " + known + ")");
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    // inf / NaN: the payload moves to the top of the fp32 mantissa, so f32_to_f16 gives it back unchanged.
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {
    // A half subnormal is a normal fp32: shift the leading 1 into the implicit position, adjusting the exponent.
    int32_t e = 127 - 15 + 1;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --e;
    }
    bits = sign | (static_cast<uint32_t>(e) << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const auto sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t magnitude = u & 0x7fffffffu;

  if (magnitude >= 0x7f800000u) {
    if (magnitude == 0x7f800000u) return sign | 0x7c00u;
    // Keep the top payload bits; a payload living only in the low 13 bits must still read as NaN, not inf.
    uint16_t payload = static_cast<uint16_t>((magnitude >> 13) & 0x3ffu);
    return sign | 0x7c00u | (payload ? payload : 0x200u);
  }
  // 65520 = 65504 + half an ulp: the tie rounds to the even neighbour 65536, which is inf in half.
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;

  if (magnitude >= 0x38800000u) {  // >= 2^-14: normal half
    const uint32_t exponent = (magnitude >> 23) - (127 - 15);
    const uint32_t mantissa = magnitude & 0x7fffffu;
    uint32_t h = (exponent << 10) | (mantissa >> 13);
    const uint32_t rest = mantissa & 0x1fffu;
    // A carry out of the mantissa correctly bumps the exponent (and 0x7bff + 1 = inf, excluded above).
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
    return sign | static_cast<uint16_t>(h);
  }
  // Subnormal half: units of 2^-24. 2^-25 (and below) is at most half a unit and ties to even zero.
  if (magnitude <= 0x33000000u) return sign;
  const uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - (magnitude >> 23);  // 14..24 here
  uint32_t h = mantissa >> shift;
  const uint32_t rest = mantissa & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rest > half || (rest == half && (h & 1u))) ++h;  // may round up into the smallest normal, 0x0400
  return sign | static_cast<uint16_t>(h);
}

}  // namespace oscar::fmt
