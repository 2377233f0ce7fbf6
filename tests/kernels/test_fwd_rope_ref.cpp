// rope_qkv_ref (token-major, fused QKV input) against lib/model's RoPE (head-major tables) and RoPE's algebra.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/norm/rmsnorm.h"
#include "kernels/rope/rope_qkv.h"
#include "lib/model/cpu_model.h"
#include "lib/model/rope.h"

namespace oscar::kern {
namespace {

std::vector<float> randn(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

fmt::ModelConfig config(int64_t d, fmt::RopeType type) {
  fmt::ModelConfig c;
  c.head_dim = d;
  c.rope.theta = 500000.0;
  c.rope.type = type;
  c.rope.factor = type == fmt::RopeType::Default ? 1.0 : 8.0;
  return c;
}

struct Outputs {
  std::vector<float> q, k_pre, k, v;
};

Outputs run_ref(const RopeQkvShape& s, const std::vector<float>& qkv, const std::vector<int32_t>& pos,
                const std::vector<float>& inv_freq, const float* bias = nullptr, const float* qn = nullptr,
                const float* kn = nullptr) {
  Outputs o;
  o.q.resize(s.num_tokens * s.num_heads * s.head_dim);
  o.k_pre.resize(s.num_tokens * s.num_kv_heads * s.head_dim);
  o.k.resize(o.k_pre.size());
  o.v.resize(o.k_pre.size());
  RopeQkvRefArgs a;
  a.qkv = qkv.data();
  a.bias = bias;
  a.q_norm_weight = qn;
  a.k_norm_weight = kn;
  a.positions = pos.data();
  a.inv_freq = inv_freq.data();
  a.q_out = o.q.data();
  a.k_pre_rope_out = o.k_pre.data();
  a.k_out = o.k.data();
  a.v_out = o.v.data();
  rope_qkv_ref(s, a);
  return o;
}

TEST(FwdRopeRef, MatchesLibModelApplyRopeForEveryRopeType) {
  for (const auto type : {fmt::RopeType::Default, fmt::RopeType::Linear, fmt::RopeType::Llama3}) {
    const int64_t T = 37, hq = 4, hkv = 2, d = 64, pos0 = 1000;
    const RopeQkvShape s{T, hq, hkv, d, (hq + 2 * hkv) * d};
    const std::vector<float> qkv = randn(T * s.qkv_row_stride, 11);
    std::vector<int32_t> pos(T);
    for (int64_t t = 0; t < T; ++t) pos[t] = static_cast<int32_t>(pos0 + t);
    const std::vector<float> inv_freq = model::rope_inv_freq(config(d, type));
    const Outputs o = run_ref(s, qkv, pos, inv_freq);

    // lib/model works head-major [heads, T, d] with precomputed tables: same math, different structure.
    auto head_major = [&](int64_t first_slot, int64_t heads) {
      std::vector<float> x(heads * T * d);
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t i = 0; i < d; ++i) x[(h * T + t) * d + i] = qkv[t * s.qkv_row_stride + (first_slot + h) * d + i];
      return x;
    };
    std::vector<float> q = head_major(0, hq), k = head_major(hq, hkv), v = head_major(hq + hkv, hkv);
    const model::RopeTables tables = model::rope_tables(inv_freq, pos0, T);
    model::apply_rope(q.data(), hq, d, tables);
    model::apply_rope(k.data(), hkv, d, tables);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < d; ++i) {
        for (int64_t h = 0; h < hq; ++h)
          ASSERT_NEAR(o.q[(t * hq + h) * d + i], q[(h * T + t) * d + i], 1e-5) << "rope type " << int(type);
        for (int64_t h = 0; h < hkv; ++h) {
          ASSERT_NEAR(o.k[(t * hkv + h) * d + i], k[(h * T + t) * d + i], 1e-5);
          ASSERT_EQ(o.v[(t * hkv + h) * d + i], v[(h * T + t) * d + i]);
          ASSERT_EQ(o.k_pre[(t * hkv + h) * d + i], qkv[t * s.qkv_row_stride + (hq + h) * d + i]);
        }
      }
  }
}

TEST(FwdRopeRef, ScoresDependOnlyOnRelativePosition) {
  // RoPE's defining property: <R(p) q, R(p') k> depends on p - p' only.
  const int64_t d = 128;
  const RopeQkvShape s{2, 1, 1, d, 3 * d};
  std::vector<float> qkv = randn(d * 3, 3);
  qkv.resize(2 * 3 * d);
  std::copy(qkv.begin(), qkv.begin() + 3 * d, qkv.begin() + 3 * d);  // same q, k, v at both tokens
  const std::vector<float> inv_freq = model::rope_inv_freq(config(d, fmt::RopeType::Default));
  auto score = [&](int32_t pq, int32_t pk) {
    const Outputs o = run_ref(s, qkv, {pq, pk}, inv_freq);
    double dot = 0;
    for (int64_t i = 0; i < d; ++i) dot += static_cast<double>(o.q[i]) * o.k[d + i];  // q of token 0, k of token 1
    return dot;
  };
  const double ref = score(7, 3);
  EXPECT_NEAR(score(107, 103), ref, 1e-3 * std::abs(ref) + 1e-3);
  EXPECT_NEAR(score(1004, 1000), ref, 1e-3 * std::abs(ref) + 1e-3);
  // Position 0 is the identity rotation.
  const Outputs o = run_ref(s, qkv, {0, 0}, inv_freq);
  for (int64_t i = 0; i < d; ++i) EXPECT_EQ(o.q[i], qkv[i]);
}

TEST(FwdRopeRef, BiasAndQkNormComeBeforeRotation) {
  const int64_t T = 3, hq = 2, hkv = 1, d = 16;
  const RopeQkvShape s{T, hq, hkv, d, (hq + 2 * hkv) * d};
  const std::vector<float> qkv = randn(T * s.qkv_row_stride, 21), bias = randn(s.qkv_row_stride, 22);
  std::vector<float> qn(d), kn(d);
  for (int64_t i = 0; i < d; ++i) qn[i] = 0.5f + 0.1f * i, kn[i] = 2.f - 0.05f * i;
  const std::vector<int32_t> pos = {0, 5, 9};
  const std::vector<float> inv_freq = model::rope_inv_freq(config(d, fmt::RopeType::Default));
  const Outputs o = run_ref(s, qkv, pos, inv_freq, bias.data(), qn.data(), kn.data());

  // Independently: add bias, normalize with head_rmsnorm_ref, then rotate with the unbiased, unnormed path.
  std::vector<float> pre = qkv;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < s.qkv_row_stride; ++i) pre[t * s.qkv_row_stride + i] += bias[i];
  head_rmsnorm_ref(pre.data(), T, s.qkv_row_stride, hq, d, qn.data(), 1e-6f);
  head_rmsnorm_ref(pre.data() + hq * d, T, s.qkv_row_stride, hkv, d, kn.data(), 1e-6f);
  const Outputs plain = run_ref(s, pre, pos, inv_freq);
  for (size_t i = 0; i < o.q.size(); ++i) EXPECT_NEAR(o.q[i], plain.q[i], 1e-6);
  for (size_t i = 0; i < o.k.size(); ++i) {
    EXPECT_NEAR(o.k[i], plain.k[i], 1e-6);
    EXPECT_NEAR(o.k_pre[i], plain.k_pre[i], 1e-6);
    EXPECT_NEAR(o.v[i], plain.v[i], 1e-6);
  }
}

}  // namespace
}  // namespace oscar::kern
