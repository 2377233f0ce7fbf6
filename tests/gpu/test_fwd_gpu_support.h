#pragma once
// Helpers shared by the forward-pass GPU tests (test_fwd_*): device presence, bf16 round trips, error metrics.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "formats/dtype.h"

namespace oscar::test::fwd {

inline bool have_gpu() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

// Normalized mean squared error sum((got - ref)²) / sum(ref²), in double.
inline double nmse(const std::vector<float>& got, const std::vector<float>& ref) {
  EXPECT_EQ(got.size(), ref.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size() && i < got.size(); ++i) {
    const double diff = static_cast<double>(got[i]) - ref[i];
    num += diff * diff;
    den += static_cast<double>(ref[i]) * ref[i];
  }
  return den > 0 ? num / den : num;
}

inline std::vector<float> randn(size_t n, uint32_t seed, float sd = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, sd);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

inline std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = fmt::f32_to_bf16(v[i]);
  return b;
}
inline std::vector<float> widen(const std::vector<uint16_t>& b) {
  std::vector<float> v(b.size());
  for (size_t i = 0; i < b.size(); ++i) v[i] = fmt::bf16_to_f32(b[i]);
  return v;
}
// The value a bf16 kernel actually sees: x rounded to bf16 and widened back.
inline std::vector<float> bf16_round(const std::vector<float>& v) { return widen(to_bf16(v)); }

}  // namespace oscar::test::fwd

#define OSCAR_REQUIRE_GPU()                                                  \
  do {                                                                       \
    if (!::oscar::test::fwd::have_gpu()) GTEST_SKIP() << "no CUDA device";  \
  } while (0)
