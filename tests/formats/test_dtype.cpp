// dtype names/sizes and the scalar conversions, checked against independent references: the IEEE-754 definition
// of a half (evaluated with ldexp), GCC's _Float16 conversions, and hand-derived bf16 bit patterns.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <random>

#include "formats/dtype.h"
#include "formats/error.h"

namespace oscar::fmt {
namespace {

// The value of a half from its fields, straight from the IEEE-754 definition.
double half_value_by_definition(uint16_t h) {
  const int sign = (h >> 15) ? -1 : 1;
  const int exponent = (h >> 10) & 0x1f;
  const int mantissa = h & 0x3ff;
  if (exponent == 0) return sign * std::ldexp(mantissa, -24);
  if (exponent == 31) return mantissa ? NAN : sign * INFINITY;
  return sign * std::ldexp(1024 + mantissa, exponent - 25);
}

TEST(DType, SizesAndNames) {
  EXPECT_EQ(dtype_size(DType::F64), 8u);
  EXPECT_EQ(dtype_size(DType::BF16), 2u);
  EXPECT_EQ(dtype_size(DType::F8_E4M3), 1u);
  EXPECT_EQ(dtype_size(DType::I64), 8u);
  EXPECT_EQ(dtype_size(DType::U16), 2u);
  EXPECT_EQ(dtype_size(DType::BOOL), 1u);
  for (DType t : {DType::F64, DType::F32, DType::F16, DType::BF16, DType::F8_E4M3, DType::F8_E5M2, DType::I64,
                  DType::I32, DType::I16, DType::I8, DType::U64, DType::U32, DType::U16, DType::U8, DType::BOOL})
    EXPECT_EQ(parse_dtype(dtype_name(t), "x"), t) << dtype_name(t);
  EXPECT_EQ(dtype_name(DType::BF16), "BF16");
  EXPECT_EQ(parse_dtype("F8_E5M2", "x"), DType::F8_E5M2);
}

TEST(DType, UnknownNameNamesTheLocation) {
  try {
    parse_dtype("F4", "model.safetensors: tensor w");
    FAIL() << "expected oscar::Error";
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), "model.safetensors: tensor w");
    EXPECT_NE(std::string(e.what()).find("unknown dtype 'F4'"), std::string::npos) << e.what();
  }
  EXPECT_THROW(parse_dtype("f32", "x"), Error);  // the spelling is case-sensitive
}

TEST(DType, EveryHalfMatchesTheIeeeDefinitionAndRoundTrips) {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const float f = f16_to_f32(static_cast<uint16_t>(h));
    const double expected = half_value_by_definition(static_cast<uint16_t>(h));
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << h;
    } else {
      EXPECT_EQ(static_cast<double>(f), expected) << std::hex << h;
      EXPECT_EQ(std::signbit(f), (h & 0x8000) != 0) << std::hex << h;  // -0 stays -0
    }
    // Exact round trip of all 65536 patterns, NaN payloads included.
    ASSERT_EQ(f32_to_f16(f), h) << std::hex << h;
  }
}

TEST(DType, F32ToF16MatchesCompilerFloat16OnEdgesAndRandomFloats) {
  std::vector<float> cases = {0.0f,       -0.0f,       1.0f,        65504.0f,    65519.99f,  65520.0f,
                              -65520.0f,  1e10f,       INFINITY,    -INFINITY,   6.1035156e-05f,  // 2^-14
                              5.9604645e-08f,                                                    // 2^-24
                              2.9802322e-08f,                                                    // 2^-25: tie to 0
                              2.9802326e-08f,                                                    // just above
                              8.9406967e-08f,                                                    // 1.5 * 2^-24
                              1.0009765625f /*1 + 2^-10*/, 1.00048828125f /*1 + 2^-11, tie to even 1*/,
                              1.00146484375f /*1 + 3*2^-11, tie to even 1 + 2^-9*/};
  std::mt19937 rng(1234);
  std::uniform_int_distribution<uint32_t> any_bits;
  for (int i = 0; i < 200000; ++i) {
    float f = std::bit_cast<float>(any_bits(rng));
    if (!std::isnan(f)) cases.push_back(f);
  }
  // Floats around the half range, where rounding decisions actually happen.
  std::uniform_int_distribution<uint32_t> near_half(0x33000000u - 4096, 0x47800000u + 4096);
  for (int i = 0; i < 400000; ++i) cases.push_back(std::bit_cast<float>(near_half(rng) | (i & 1 ? 0x80000000u : 0)));
  for (float f : cases) {
    const _Float16 reference = static_cast<_Float16>(f);
    uint16_t ref_bits;
    std::memcpy(&ref_bits, &reference, 2);
    ASSERT_EQ(f32_to_f16(f), ref_bits) << "f32 bits 0x" << std::hex << std::bit_cast<uint32_t>(f);
  }
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);           // the tie above the largest half rounds to inf
  EXPECT_EQ(f32_to_f16(2.9802322e-08f), 0x0000);     // 2^-25 ties to even zero
  EXPECT_EQ(f32_to_f16(8.9406967e-08f), 0x0002);     // 1.5 units ties to even 2 units
  EXPECT_EQ(f32_to_f16(6.1035156e-05f), 0x0400);     // smallest normal
}

TEST(DType, F32ToF16TiesBetweenEveryPairOfAdjacentHalvesGoToEven) {
  // The midpoint of two adjacent finite halves is exact in fp32; it must go to the one with an even mantissa,
  // and the fp32 neighbours of the midpoint must go to the nearer half.
  for (uint32_t h = 0; h < 0x7bff; ++h) {
    for (uint32_t sign : {0u, 0x8000u}) {
      const uint16_t lo = static_cast<uint16_t>(h | sign), hi = static_cast<uint16_t>((h + 1) | sign);
      const float mid = (f16_to_f32(lo) + f16_to_f32(hi)) / 2;
      ASSERT_EQ(f32_to_f16(mid), (h & 1) ? hi : lo) << std::hex << h;
      ASSERT_EQ(f32_to_f16(std::nextafter(mid, 0.0f)), lo) << std::hex << h;
      ASSERT_EQ(f32_to_f16(std::nextafter(mid, sign ? -INFINITY : INFINITY)), hi) << std::hex << h;
    }
  }
}

TEST(DType, F32ToF16KeepsNan) {
  EXPECT_EQ(f32_to_f16(std::bit_cast<float>(0x7fc00000u)), 0x7e00);
  EXPECT_EQ(f32_to_f16(std::bit_cast<float>(0xffc00000u)), 0xfe00);
  // A payload only in the low 13 bits must not collapse to inf.
  const uint16_t h = f32_to_f16(std::bit_cast<float>(0x7f800001u));
  EXPECT_EQ(h & 0x7c00, 0x7c00);
  EXPECT_NE(h & 0x03ff, 0);
}

TEST(DType, Bf16RoundToNearestEven) {
  struct Case {
    uint32_t f32;
    uint16_t bf16;
  };
  const Case cases[] = {
      {0x3f800000u, 0x3f80},  // 1.0 exact
      {0x3f808000u, 0x3f80},  // tie, even below: stays
      {0x3f818000u, 0x3f82},  // tie, odd below: rounds up to even
      {0x3f808001u, 0x3f81},  // above the tie
      {0x3f807fffu, 0x3f80},  // below the tie
      {0xbf818000u, 0xbf82},  // sign is symmetric
      {0x7f7fffffu, 0x7f80},  // FLT_MAX rounds to inf
      {0x7f7f7fffu, 0x7f7f},  // largest value that stays finite
      {0x7f800000u, 0x7f80},  // inf
      {0xff800000u, 0xff80},  // -inf
      {0x80000000u, 0x8000},  // -0
      {0x00000001u, 0x0000},  // smallest subnormal rounds to 0
      {0x00008000u, 0x0000},  // subnormal tie to even 0
      {0x00018000u, 0x0002},  // subnormal tie to even 2
      {0x007fffffu, 0x0080},  // largest subnormal rounds up into the smallest normal
      {0x40490fdbu, 0x4049},  // pi -> 3.140625
      {0x3dcccccdu, 0x3dcd},  // 0.1 -> 0.10009765625 (torch.tensor(0.1).bfloat16() gives the same bits)
  };
  for (const Case& c : cases) EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(c.f32)), c.bf16) << std::hex << c.f32;
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x7fc00000u)), 0x7fc0);
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x7f800001u)), 0x7fc0);  // signalling NaN becomes a quiet NaN, not inf
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    const float f = bf16_to_f32(static_cast<uint16_t>(b));
    if (std::isnan(f)) continue;
    ASSERT_EQ(f32_to_bf16(f), b) << std::hex << b;
  }
}

}  // namespace
}  // namespace oscar::fmt
