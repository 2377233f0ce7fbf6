#pragma once
// Shared by the GPU tests that check a device result against a double-precision reference of the same bf16 inputs
// (test_wgmma_gpu, test_lt_gemm_gpu): seeded Gaussian bf16 data and the NMSE against the double values.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "formats/dtype.h"

namespace oscar::test::gpu {

// n values of N(0, 1) rounded to bf16 (bit patterns), from a seeded generator: every run sees the same data.
inline std::vector<uint16_t> random_bf16(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = fmt::f32_to_bf16(dist(rng));
  return v;
}

// Σ (got − want)² / Σ want²; a non-finite output counts as 1e30, so NaN/Inf fail any bound.
inline double nmse_vs_double(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = (std::isfinite(got[i]) ? got[i] : 1e30) - want[i];
    num += d * d;
    den += want[i] * want[i];
  }
  return num / den;
}

}  // namespace oscar::test::gpu
