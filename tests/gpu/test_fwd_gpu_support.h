#pragma once
// Helpers shared by the GPU tests: device presence, bf16 round trips, error metrics, fixture token sequences.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "formats/dtype.h"
#include "formats/tokenizer.h"

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

// Consecutive sequences of `len` tokens from the text (no BOS: the text stream, as the packer would cut it); fewer
// than `count` when the text is short.
inline std::vector<std::vector<int32_t>> text_sequences(const std::filesystem::path& model_dir,
                                                        const std::filesystem::path& text, int64_t count,
                                                        int64_t len) {
  std::ifstream in(text, std::ios::binary);
  std::string bytes(static_cast<size_t>(count * len * 8), '\0');
  in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  bytes.resize(static_cast<size_t>(in.gcount()));
  const std::vector<int32_t> ids = fmt::Tokenizer::load(model_dir)->encode(bytes, false);
  std::vector<std::vector<int32_t>> out;
  for (int64_t s = 0; s < count && (s + 1) * len <= static_cast<int64_t>(ids.size()); ++s)
    out.emplace_back(ids.begin() + s * len, ids.begin() + (s + 1) * len);
  return out;
}

}  // namespace oscar::test::fwd

#define OSCAR_REQUIRE_GPU()                                                  \
  do {                                                                       \
    if (!::oscar::test::fwd::have_gpu()) GTEST_SKIP() << "no CUDA device";  \
  } while (0)
