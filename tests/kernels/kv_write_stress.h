#pragma once
// Head vectors that stress the INT2 quantize-on-write select and min/max: ties at the clip threshold, all-equal,
// all-zero, ±0 mixes, a clip threshold of exactly 0, ±inf that the clip removes, values beyond fp16 range, and
// magnitudes below fp16 resolution. Shared by the CPU reference tests and the GPU kernel tests.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "formats/dtype.h"
#include "lib/calib/quantizer_ref.h"

namespace oscar::test {

inline constexpr int kStressPatterns = 12;

// Patterns 9 (±inf) and 10 (3e38) only keep the result defined when the rotation does not mix dims (inf * 0 is
// NaN) and, for ±inf, when the clip removes all four of them: `finite_only` replaces them by pattern 0.
inline void fill_stress_vector(int pattern, int d, std::mt19937& rng, bool finite_only, uint16_t* out) {
  std::normal_distribution<float> n01;
  std::uniform_int_distribution<int> small(-3, 3), coin(0, 1);
  if (finite_only && (pattern == 9 || pattern == 10)) pattern = 0;
  for (int i = 0; i < d; ++i) {
    float v = 0.f;
    switch (pattern) {
      case 0: v = n01(rng) * (i % 37 == 5 ? 20.f : 1.f); break;  // Gaussian with channel outliers
      case 1: v = 0.f; break;                                     // all +0
      case 2: v = -0.f; break;                                    // all -0
      case 3: v = coin(rng) ? 0.f : -0.f; break;                  // ±0 mixed
      case 4: v = coin(rng) ? 0.f : -0.f; break;                  // mostly ±0, a few nonzero below: clip c == 0
      case 5: v = 0.25f; break;                                   // all equal
      case 6: v = coin(rng) ? 1.5f : -1.5f; break;                // equal magnitudes, mixed signs: ties everywhere
      case 7: v = static_cast<float>(small(rng)); break;          // few distinct values: long runs of ties
      case 8: {  // ties and ±0
        const int s = small(rng);
        v = s != 0 ? static_cast<float>(s) * 0.5f : (i % 2 ? -0.f : 0.f);
        break;
      }
      case 9: v = n01(rng); break;                                // ±inf placed below
      case 10: v = n01(rng); break;                               // 3e38 placed below
      case 11: v = n01(rng) * 1e-30f; break;                      // range below fp16: scale 0, codes 0
      default: break;
    }
    out[i] = fmt::f32_to_bf16(v);
  }
  if (pattern == 4) {
    out[3] = fmt::f32_to_bf16(-5.f);
    out[d / 2] = fmt::f32_to_bf16(3.f);
    out[d - 2] = fmt::f32_to_bf16(-7.f);
  }
  if (pattern == 9) {
    const float inf = std::numeric_limits<float>::infinity();
    out[1] = fmt::f32_to_bf16(inf);
    out[d / 3] = fmt::f32_to_bf16(-inf);
    out[d / 2 + 1] = fmt::f32_to_bf16(inf);
    out[d - 1] = fmt::f32_to_bf16(-inf);
  }
  if (pattern == 10) out[d / 4] = fmt::f32_to_bf16(3e38f);
}

// Position of the clip threshold counted from the largest |y| (0 = the maximum); -1 = no clipping.
inline int clip_top(float ratio, int d) {
  return ratio >= 1.0f ? -1 : d - 1 - static_cast<int>(calib::clip_index(ratio, d));
}

// The four ±inf of pattern 9 are clipped only when the threshold sits at least four places below the top.
inline bool inf_is_clipped(float ratio, int d) { return clip_top(ratio, d) >= 4; }

// A signed permutation: y is a reordering of x with some signs flipped, computed exactly by the fma chain, so
// the ties and zeros of x survive the rotation.
inline std::vector<float> signed_permutation(int d, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int> perm(static_cast<size_t>(d));
  for (int i = 0; i < d; ++i) perm[static_cast<size_t>(i)] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<float> r(static_cast<size_t>(d) * d, 0.f);
  for (int i = 0; i < d; ++i) r[static_cast<size_t>(i) * d + perm[static_cast<size_t>(i)]] = (rng() & 1) ? 1.f : -1.f;
  return r;
}

}  // namespace oscar::test
