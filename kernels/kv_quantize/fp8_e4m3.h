#pragma once
// OCP e4m3fn conversions shared by the FP8 cache kernels (kv_write_fp8.cuh, decode_attention_fp8.cuh) and their CPU
// tests. Integer-only, so host and device compute the same bits and the CPU tests can check the device rule
// against calib::f32_to_e4m3 / e4m3_to_f32 (lib/calib/quantizer_ref.cpp), which define the format. We do not use
// cuda_fp8.h's __nv_cvt_float_to_fp8: its rounding is done by hardware we cannot check from the CPU, while this
// rule is tested here against the reference on every tie, subnormal and saturation boundary.
#include <cstdint>

#include "formats/kv_layout.h"  // OSCAR_HD

namespace oscar::kern {

// e4m3 code of the fp32 with bit pattern `u`: round to nearest even, saturate to ±448 (0x7e / 0xfe), NaN -> 0x7f,
// signed zero kept. Exactly calib::f32_to_e4m3.
OSCAR_HD constexpr uint8_t e4m3_from_f32_bits(uint32_t u) {
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7f;  // NaN (either sign)
  const auto sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  if (a >= 0x43e00000u) return sign | 0x7e;  // >= 448 (inf included)
  const uint32_t e = a >> 23;                // biased fp32 exponent
  if (e >= 121) {                            // >= 2^-6: a normal e4m3 (or it rounds up into 448)
    uint32_t r = ((e - 120) << 3) | ((a >> 20) & 7u);
    const uint32_t rest = a & 0xfffffu;
    if (rest > 0x80000u || (rest == 0x80000u && (r & 1u))) ++r;  // a carry moves into the exponent, as it should
    return static_cast<uint8_t>(sign | (r > 0x7eu ? 0x7eu : r));
  }
  // Below 2^-6: multiples of 2^-9. a = M * 2^(e - 150) with M the 24-bit significand, so the code is M >> (141 - e)
  // rounded to nearest even; code 8 (a round-up from 7.5) is the bit pattern of 2^-6, the smallest normal.
  if (e == 0) return sign;  // fp32 zero / subnormal: far below 2^-10
  const uint32_t shift = 141 - e;  // >= 21
  if (shift >= 25) return sign;    // a < 2^-10: below half the quantum
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  uint32_t q = m >> shift;
  const uint32_t rest = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  if (rest > half || (rest == half && (q & 1u))) ++q;
  return static_cast<uint8_t>(sign | q);
}

// The fp16 bit pattern of e4m3(code) * 2^-8, exact for every code but the NaNs (0x7f, 0xff): the 4-bit exponent
// and 3-bit mantissa drop into the fp16 fields unchanged (bias 15 vs 7 is the 2^-8), subnormals included. Decode
// folds the 2^8 into the per-token scale.
OSCAR_HD constexpr uint16_t e4m3_to_f16_bits_scaled(uint8_t code) {
  return static_cast<uint16_t>(((code & 0x80u) << 8) | ((code & 0x7fu) << 7));
}
inline constexpr float kE4m3F16Unscale = 256.0f;

}  // namespace oscar::kern
