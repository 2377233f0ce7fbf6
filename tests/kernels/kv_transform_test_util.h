#pragma once
// Per-KV-head storage transforms for the kernel tests (bundle 2.0, lib/calib/kv_transform.h): A_h = W_h·R with W_h
// symmetric positive definite and well conditioned (I + 0.4·S, S a random symmetric matrix of spectral radius < 1),
// computed in fp64, stored fp32 like a bundle; the readers' A⁻ᵀ; and a key mean with a large constant part (what
// post-RoPE keys have).
#include <Eigen/Dense>

#include <random>
#include <vector>

#include "kv_cache_test_util.h"

namespace oscar::test {

struct HeadTransforms {
  int d = 0, heads = 0;
  std::vector<float> a, a_inv, read;  // [heads, d, d] row-major: A, A⁻¹, A⁻ᵀ
  std::vector<float> mean;            // [heads, d]
};

inline HeadTransforms random_head_transforms(int d, int heads, uint32_t seed, float mean_scale = 2.0f) {
  using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  HeadTransforms t;
  t.d = d;
  t.heads = heads;
  std::mt19937 rng(seed);
  std::normal_distribution<double> n(0.0, 1.0);
  const auto r32 = random_rotation(d, seed + 1);
  Mat r(d, d);
  for (int i = 0; i < d * d; ++i) r.data()[i] = r32[static_cast<size_t>(i)];
  for (int h = 0; h < heads; ++h) {
    Mat s(d, d);
    for (int i = 0; i < d * d; ++i) s.data()[i] = n(rng);
    s = (s + s.transpose()).eval() / (2.0 * std::sqrt(2.0 * d));  // spectral radius ~1/sqrt(2)
    const Mat w = Mat::Identity(d, d) + 0.4 * s;
    const Mat a = w * r;
    const Mat inv = a.inverse();
    for (int i = 0; i < d; ++i)
      for (int j = 0; j < d; ++j) {
        t.a.push_back(static_cast<float>(a(i, j)));
        t.a_inv.push_back(static_cast<float>(inv(i, j)));
      }
    for (int i = 0; i < d; ++i)
      for (int j = 0; j < d; ++j) t.read.push_back(static_cast<float>(inv(j, i)));
    for (int i = 0; i < d; ++i) t.mean.push_back(static_cast<float>(mean_scale * (1.0 + n(rng))));
  }
  return t;
}

}  // namespace oscar::test
