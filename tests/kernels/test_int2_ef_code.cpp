// kern::int2_ef_code (the error-feedback writer's per-step code with the scale's reciprocal; its host path runs the
// device path's operations) against calib::int_codes, the reference quantizer's element rounding, on the host: random
// tokens' (scale, zero) in fp16 as the records store them, values around and far outside the range, and values built
// to land exactly on half-integers (ties to even) and a few ulp beside them, where the reciprocal alone would be wrong.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "formats/dtype.h"
#include "kernels/kv_quantize/int2_ef_code.h"
#include "lib/calib/quantizer_ref.h"

namespace oscar {
namespace {

float reference_code(float w, const calib::IntParams& p) {
  uint8_t code = 0;
  calib::int_codes(std::span<const float>(&w, 1), 2, p, std::span<uint8_t>(&code, 1));
  return static_cast<float>(code);
}

calib::IntParams params(float scale, float zero) {
  calib::IntParams p;
  p.scale_f16 = fmt::f32_to_f16(scale);
  p.zero_f16 = fmt::f32_to_f16(zero);
  return p;
}

TEST(Int2EfCode, EqualsTheReferenceRoundingEverywhere) {
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> log_scale(-12.f, 8.f), unit(-1.f, 1.f), where(-3.f, 6.f);
  int64_t compared = 0, ties = 0, fallback_zone = 0;
  for (int token = 0; token < 4000; ++token) {
    const calib::IntParams p = params(std::exp2(log_scale(rng)), unit(rng) * std::exp2(log_scale(rng)));
    const float scale = p.scale(), zero = p.zero();
    if (!(scale > 0.f) || !std::isfinite(scale)) continue;
    const float inv = 1.0f / scale;
    auto check = [&](float w) {
      ASSERT_EQ(kern::int2_ef_code(w, zero, scale, inv), reference_code(w, p))
          << "w " << w << " zero " << zero << " scale " << scale;
      ++compared;
    };
    for (int i = 0; i < 64; ++i) check(zero + where(rng) * scale);  // around the range and outside it
    for (int k = -2; k <= 4; ++k) {                                  // exact half-integers and their neighbours
      const float w = zero + (static_cast<float>(k) + 0.5f) * scale;
      const float q = (w - zero) / scale;
      ties += q == static_cast<float>(k) + 0.5f;
      float v = w;
      for (int step = 0; step < 4; ++step) v = std::nextafter(v, -std::numeric_limits<float>::infinity());
      for (int step = 0; step < 9; ++step) {
        check(v);
        const float t = (v - zero) * inv;
        fallback_zone += t > -1.f && t < 4.f && std::fabs((t - std::floor(t)) - 0.5f) <= 1e-5f;
        v = std::nextafter(v, std::numeric_limits<float>::infinity());
      }
    }
    check(std::numeric_limits<float>::infinity());
    check(-std::numeric_limits<float>::infinity());
  }
  RecordProperty("compared", std::to_string(compared));
  EXPECT_GT(compared, 400000);
  EXPECT_GT(ties, 4000);            // exact ties were exercised
  EXPECT_GT(fallback_zone, 40000);  // and so was the division path
}

}  // namespace
}  // namespace oscar
