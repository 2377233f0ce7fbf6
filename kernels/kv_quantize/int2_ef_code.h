#pragma once
// The 2-bit code of one element on the sequential path of the error-feedback writer (kv_write_int2_ef.cuh), host
// and device: calib::int_codes of one element — rintf((w - zero) / scale) clamped to [0, 3] — bit for bit, with the
// token's reciprocal of the scale instead of an IEEE division (which costs ~20 cycles of latency on every step of
// the device's sequential loop).
//
// Why it is exact: num · inv_scale (inv_scale the correctly rounded 1 / scale) is within 2 ulp of the correctly
// rounded quotient, < 1e-6 for quotients in [-1, 4]; rint gives the same integer to both unless a half-integer lies
// between them, so where the quotient is more than 1e-5 from a half-integer (rounding ties included) the product
// decides, and within it the division does. Below -1 or above 4 both clamp to the same end code; a NaN takes the
// division. scale != 0. tests/kernels/test_int2_ef_code.cpp checks it against calib::int_codes on the host.
#include <cmath>

#include "formats/kv_layout.h"  // OSCAR_HD

namespace oscar::kern {

OSCAR_HD inline float int2_ef_code(float w, float zero, float scale, float inv_scale) {
#ifdef __CUDA_ARCH__
  // Explicit round-to-nearest intrinsics: nvcc would otherwise be free to contract into FMAs.
  const float num = __fsub_rn(w, zero);
  const float t = __fmul_rn(num, inv_scale);
  if (t > -1.f && t < 4.f) {
    const float q = fabsf(__fsub_rn(t, floorf(t)) - 0.5f) > 1e-5f ? rintf(t) : rintf(__fdiv_rn(num, scale));
    return fminf(fmaxf(q, 0.f), 3.f);
  }
  if (t >= 4.f) return 3.f;
  if (t <= -1.f) return 0.f;
  return fminf(fmaxf(rintf(__fdiv_rn(num, scale)), 0.f), 3.f);
#else
  // x86-64's baseline has no FMA instruction for the compiler to contract into; IEEE fp32, round to nearest.
  const float num = w - zero;
  const float t = num * inv_scale;
  if (t > -1.f && t < 4.f) {
    const float q = std::fabs((t - std::floor(t)) - 0.5f) > 1e-5f ? std::rint(t) : std::rint(num / scale);
    return std::fmin(std::fmax(q, 0.f), 3.f);
  }
  if (t >= 4.f) return 3.f;
  if (t <= -1.f) return 0.f;
  return std::fmin(std::fmax(std::rint(num / scale), 0.f), 3.f);
#endif
}

}  // namespace oscar::kern
