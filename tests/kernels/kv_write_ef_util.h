#pragma once
// Test-only error-feedback tables for kv_write (issue #10), shared by tests/kernels (CPU) and tests/gpu: the stored
// form of lib/calib/error_feedback.h built from a random non-diagonal metric through the real calibration code
// (calib::error_feedback_table + stored_error_feedback), per KV head.
#include <cstdint>
#include <random>
#include <vector>

#include "lib/calib/error_feedback.h"

namespace oscar::test {

struct EfTables {
  std::vector<int32_t> order;  // [heads, d]
  std::vector<float> weights;  // [heads, d, d]
};

// A correlated SPD metric per head (G Gᵀ / d with G Gaussian, plus a few dominant directions, like E[q qᵀ]).
inline std::vector<double> random_metric(int d, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> n01;
  std::vector<double> g(static_cast<size_t>(d) * d), m(static_cast<size_t>(d) * d, 0.0);
  for (auto& v : g) v = n01(rng);
  for (int i = 0; i < d; ++i) g[static_cast<size_t>(i) * d + i % 7] *= 6.0;  // structure: strong shared columns
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j) {
      double s = 0;
      for (int k = 0; k < d; ++k) s += g[static_cast<size_t>(i) * d + k] * g[static_cast<size_t>(j) * d + k];
      m[static_cast<size_t>(i) * d + j] = s / d;
    }
  return m;
}

inline EfTables random_ef_tables(int d, int heads, uint32_t seed, bool act_order = true) {
  EfTables t;
  t.order.resize(static_cast<size_t>(heads) * d);
  t.weights.resize(static_cast<size_t>(heads) * d * d);
  for (int h = 0; h < heads; ++h) {
    calib::ErrorFeedbackOptions o;
    o.act_order = act_order;
    const calib::ErrorFeedbackTable table =
        calib::error_feedback_table(random_metric(d, seed + 977u * h), d, o, "random_ef_tables");
    calib::stored_error_feedback(
        table, std::span<int32_t>(t.order.data() + static_cast<size_t>(h) * d, static_cast<size_t>(d)),
        std::span<float>(t.weights.data() + static_cast<size_t>(h) * d * d, static_cast<size_t>(d) * d));
  }
  return t;
}

// A random order per head and all-zero weights: no feedback, so the codes must be plain RTN.
inline EfTables zero_ef_tables(int d, int heads, uint32_t seed) {
  EfTables t;
  std::mt19937 rng(seed);
  for (int h = 0; h < heads; ++h) {
    std::vector<int32_t> o(static_cast<size_t>(d));
    for (int i = 0; i < d; ++i) o[static_cast<size_t>(i)] = i;
    std::shuffle(o.begin(), o.end(), rng);
    t.order.insert(t.order.end(), o.begin(), o.end());
  }
  t.weights.assign(static_cast<size_t>(heads) * d * d, 0.f);
  return t;
}

}  // namespace oscar::test
