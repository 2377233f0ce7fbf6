// Spectral bit allocation: reverse water-filling against its closed form, the segment DP against brute-force
// enumeration, exact budget accounting (metadata included) against fmt::TensorQuantSpec, aligned tilings, and the
// allocation beating uniform INT2 at equal bits on anisotropic synthetic K/V.
#include <Eigen/Dense>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <numeric>
#include <random>

#include "formats/error.h"
#include "formats/kv_quant_spec.h"
#include "lib/calib/bit_allocation.h"
#include "lib/calib/rotation.h"
#include "lib/calib/rotation_opt.h"
#include "lib/calib/spectral.h"

namespace oscar::calib {
namespace {

TEST(ReverseWaterFilling, AllActiveMatchesTheGeometricMeanClosedForm) {
  // Enough bits that every direction is active: b_i = B/n + ½·log2(w_i / geomean(w)).
  const std::vector<double> w = {9.0, 4.0, 2.5, 1.0, 0.5, 0.3};
  const double B = 18.0;
  const WaterFilling r = reverse_water_filling(w, B);
  double log_gm = 0;
  for (double x : w) log_gm += std::log2(x);
  log_gm /= static_cast<double>(w.size());
  double sum = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    EXPECT_NEAR(r.bits[i], B / w.size() + 0.5 * (std::log2(w[i]) - log_gm), 1e-12) << i;
    EXPECT_NEAR(r.distortion[i], r.level, 1e-12 * r.level) << i;
    sum += r.bits[i];
  }
  EXPECT_NEAR(sum, B, 1e-12);
  EXPECT_NEAR(r.level, std::exp2(log_gm - 2.0 * B / w.size()), 1e-15);
}

TEST(ReverseWaterFilling, InactiveDirectionsKeepTheirVariance) {
  // Worked by hand: w = {16, 1, 1/16, 1e-6}.
  // B = 2: θ_1 = 16·2^-4 = 1 and w_2 = 1 is not above θ_2 = √16·2^-2 = 1, so only direction 0 gets bits (2).
  const std::vector<double> w = {16.0, 1.0, 1.0 / 16.0, 1e-6};
  WaterFilling r = reverse_water_filling(w, 2.0);
  EXPECT_NEAR(r.level, 1.0, 1e-12);
  EXPECT_NEAR(r.bits[0], 2.0, 1e-12);
  EXPECT_EQ(r.bits[1], 0.0);
  EXPECT_NEAR(r.total_distortion, 1.0 + 1.0 + 1.0 / 16.0 + 1e-6, 1e-12);
  // B = 4: θ_2 = 4·2^-4 = 1/4 < w_2 while θ_3 = 2^(-8/3) > 1/16: two active, bits ½·log2(16·4) = 3 and 1.
  r = reverse_water_filling(w, 4.0);
  EXPECT_NEAR(r.level, 0.25, 1e-12);
  EXPECT_NEAR(r.bits[0], 3.0, 1e-12);
  EXPECT_NEAR(r.bits[1], 1.0, 1e-12);
  EXPECT_EQ(r.bits[2], 0.0);
  EXPECT_EQ(r.bits[3], 0.0);
  EXPECT_NEAR(r.total_distortion, 0.25 + 0.25 + 1.0 / 16.0 + 1e-6, 1e-12);
  // No bits: nothing active, the distortion is the variance.
  r = reverse_water_filling(w, 0.0);
  EXPECT_NEAR(r.total_distortion, 16.0 + 1.0 + 1.0 / 16.0 + 1e-6, 1e-12);
  EXPECT_THROW(reverse_water_filling(std::vector<double>{1.0, -1.0}, 1.0), Error);
  EXPECT_THROW(reverse_water_filling(w, -1.0), Error);
}

TEST(ReverseWaterFilling, NoFeasibleBitMoveLowersTheDistortion) {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> u(-6.0, 3.0);
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<double> w(12);
    for (double& x : w) x = std::exp2(u(rng));
    const double B = 1.0 + trial;
    const WaterFilling r = reverse_water_filling(w, B);
    auto distortion = [&](const std::vector<double>& b) {
      double s = 0;
      for (size_t i = 0; i < w.size(); ++i) s += w[i] * std::exp2(-2.0 * b[i]);
      return s;
    };
    EXPECT_NEAR(distortion(r.bits), r.total_distortion, 1e-9 * r.total_distortion);
    for (size_t i = 0; i < w.size(); ++i)
      for (size_t j = 0; j < w.size(); ++j) {
        if (i == j) continue;
        const double delta = std::min(0.05, r.bits[i]);  // move bits from i to j, staying feasible
        if (delta <= 0) continue;
        std::vector<double> b = r.bits;
        b[i] -= delta;
        b[j] += delta;
        EXPECT_GE(distortion(b), r.total_distortion * (1 - 1e-12)) << trial << " " << i << "->" << j;
      }
  }
}

// Brute force over every tiling (compositions of the units) and every width assignment.
double brute_force_best(const SegmentCostTable& t, int64_t budget) {
  double best = std::numeric_limits<double>::infinity();
  std::function<void(int64_t, int64_t, double)> rec = [&](int64_t u, int64_t bits, double cost) {
    if (bits > budget) return;
    if (u == t.units()) {
      best = std::min(best, cost);
      return;
    }
    for (int64_t j = u + 1; j <= t.units(); ++j)
      for (size_t w = 0; w < t.widths().size(); ++w) {
        const int64_t wb = t.widths()[w];
        rec(j, bits + (wb > 0 ? (j - u) * t.align() * wb + 32 : 0), cost + t.cost(u, j, w));
      }
  };
  rec(0, 0, 0.0);
  return best;
}

TEST(SegmentPlans, DynamicProgramMatchesBruteForceAndAccountsBitsExactly) {
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const int64_t d = 64, align = 16;
  SegmentCostTable t(d, align, {0, 1, 2, 3, 4});
  // Random but sensible costs: more bits never cost more, longer spans cost more.
  for (int64_t i = 0; i < t.units(); ++i)
    for (int64_t j = i + 1; j <= t.units(); ++j) {
      double c = (j - i) * (1.0 + u(rng));
      for (size_t w = 0; w < 5; ++w) {
        t.cost(i, j, w) = c;
        c *= 0.2 + 0.4 * u(rng);
      }
    }
  const int64_t max_bits = 4 * d + 32 * t.units();
  const auto plans = optimal_plans(t, max_bits);
  ASSERT_EQ(static_cast<int64_t>(plans.size()), max_bits + 1);
  for (int64_t B = 0; B <= max_bits; B += 7) {
    const SegmentPlan& p = plans[B];
    EXPECT_NEAR(p.cost, brute_force_best(t, B), 1e-12) << B;
    EXPECT_LE(p.bits, B);
    // Tiling on aligned boundaries, and the fmt accounting agrees bit for bit.
    fmt::TensorQuantSpec spec;
    spec.segments = p.segments;
    fmt::KvQuantSpec kv = fmt::KvQuantSpec::uniform(d, 2);
    kv.k = spec;
    EXPECT_NO_THROW(kv.validate("plan"));
    for (const auto& s : p.segments) {
      EXPECT_EQ(s.begin % align, 0);
      EXPECT_EQ(s.end % align, 0);
    }
    EXPECT_EQ(spec.bits_per_element(d) * d, static_cast<double>(p.bits));
    EXPECT_EQ(plan_bits(p.segments), p.bits);
  }
  // Costs fall as the budget grows.
  for (int64_t B = 1; B <= max_bits; ++B) EXPECT_LE(plans[B].cost, plans[B - 1].cost);
}

TEST(SegmentPlans, ModeledCostsFollowTheSpectrumAndBudgetIsAStrictCeiling) {
  // A steep spectrum: the plan must give its bits to the leading dims and drop the tail.
  const int64_t d = 128;
  std::vector<double> w(d);
  for (int64_t i = 0; i < d; ++i) w[i] = std::exp(-0.08 * double(i));
  const auto table = modeled_segment_costs(w, 16, {0, 1, 2, 3, 4});
  const int64_t budget = budget_bits(2.28, d);
  EXPECT_EQ(budget, 291);
  EXPECT_EQ(budget_bits(2.25, 128), 288);
  const auto plans = optimal_plans(table, budget);
  const SegmentPlan& p = plans.back();
  EXPECT_LE(p.bits, budget);
  EXPECT_GT(p.segments.front().bits, p.segments.back().bits);
  EXPECT_EQ(p.segments.back().bits, 0);
  // It beats uniform INT2 (288 bits) in the model's own terms.
  double uniform = 0;
  for (double x : w) uniform += x * std::exp2(-4.0);
  EXPECT_LT(p.cost, uniform);
}

TEST(KvSplit, PicksTheLeastWeightedRelativeErrorWithinTheBudget) {
  // Two tensors with closed-form curves: cost = energy · 2^(-bits/64); total 256 bits.
  auto curve = [](double energy, int64_t max_bits) {
    std::vector<SegmentPlan> v(static_cast<size_t>(max_bits + 1));
    for (int64_t b = 0; b <= max_bits; ++b) {
      v[b].bits = b;
      v[b].cost = energy * std::exp2(-double(b) / 64.0);
    }
    return v;
  };
  const auto k = curve(10.0, 256), v = curve(1.0, 256);
  // Equal weights: relative errors 2^(-bk/64) + 2^(-bv/64) with bk + bv = 256 is minimized at the even split.
  KvSplit s = choose_kv_split(k, 10.0, v, 1.0, 256);
  EXPECT_EQ(s.k_bits + s.v_bits, 256);
  EXPECT_EQ(s.k_bits, 128);
  // Weight K 4×: the optimum moves 64 bits to K (4·2^(-bk/64) = 2^(-bv/64) → bk − bv = 128).
  s = choose_kv_split(k, 10.0, v, 1.0, 256, 4.0, 1.0);
  EXPECT_EQ(s.k_bits, 192);
  EXPECT_EQ(s.v_bits, 64);
}

// Anisotropic synthetic keys/values: a decaying covariance spectrum, a query second moment aligned with it, and
// heavy-ish tails. The spectral allocation at the bits of uniform INT2 (metadata included) must beat
// uniform INT2 with the best of its rotations on fresh samples.
struct Synthetic {
  ObjectiveSamples k, v;
};
Synthetic synthetic(int64_t tokens, uint64_t seed, const Eigen::MatrixXd& basis) {
  const int64_t d = 64, heads = 2;
  std::mt19937_64 rng(seed);
  std::student_t_distribution<double> t5(5.0);
  Synthetic s;
  for (ObjectiveSamples* o : {&s.k, &s.v}) {
    o->heads = heads;
    o->tokens = tokens;
    o->dim = d;
    o->x.resize(static_cast<size_t>(heads * tokens * d));
  }
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t t = 0; t < tokens; ++t) {
      Eigen::VectorXd zk(d), zv(d);
      for (int64_t i = 0; i < d; ++i) {
        zk[i] = std::exp(-0.05 * double(i)) * t5(rng);
        zv[i] = std::exp(-0.04 * double(i)) * t5(rng);
      }
      const Eigen::VectorXd xk = basis * zk, xv = basis.transpose() * zv;
      for (int64_t i = 0; i < d; ++i) {
        s.k.x[(h * tokens + t) * d + i] = static_cast<float>(xk[i]);
        s.v.x[(h * tokens + t) * d + i] = static_cast<float>(xv[i]);
      }
    }
  // Σ_Q: large along the first basis directions.
  Eigen::VectorXd lam(d);
  for (int64_t i = 0; i < d; ++i) lam[i] = 1.0 / (1.0 + 0.2 * double(i));
  const Eigen::MatrixXd sq = basis * lam.asDiagonal() * basis.transpose();
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j) s.k.metric.push_back(sq(i, j));
  s.v.token_weight.assign(static_cast<size_t>(heads * tokens), 1.0);
  for (size_t i = 0; i < s.v.token_weight.size(); ++i) s.v.token_weight[i] = 0.5 + double(i % 7) / 7.0;
  s.k.finalize("synthetic k");
  s.v.finalize("synthetic v");
  return s;
}

Eigen::MatrixXd random_orthogonal(int64_t d, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n;
  Eigen::MatrixXd g(d, d);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) g(i, j) = n(rng);
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(g);
  return qr.householderQ() * Eigen::MatrixXd::Identity(d, d);
}

std::vector<double> to_vec(const Eigen::MatrixXd& m) {
  std::vector<double> v;
  for (int64_t i = 0; i < m.rows(); ++i)
    for (int64_t j = 0; j < m.cols(); ++j) v.push_back(m(i, j));
  return v;
}

TEST(SpectralAllocation, BeatsUniformInt2AtEqualBitsOnAnisotropicData) {
  const int64_t d = 64;
  const Eigen::MatrixXd basis = random_orthogonal(d, 11);
  const Synthetic fit = synthetic(1024, 1, basis), test = synthetic(1024, 2, basis);
  SpectralOptions opt;
  // Uniform INT2 at d = 64 stores 2 bits + 32 metadata bits per 64 dims = 2.5 bits/element: the same budget.
  opt.budget_bits_per_element = 2.5;
  opt.k_weight = 1.0;  // the comparison below weighs J_K and J_V equally
  const LayerChoice spectral = spectral_layer(fit.k, fit.v, opt);
  const double bits = 0.5 * (spectral.k.spec.bits_per_element(d) + spectral.v.spec.bits_per_element(d));
  EXPECT_LE(bits, 2.5);
  const double spectral_test =
      quantization_objective(test.k, spectral.k.rotation, spectral.k.spec, spectral.k.spec.clip_ratio) +
      quantization_objective(test.v, spectral.v.rotation, spectral.v.spec, spectral.v.spec.clip_ratio);
  // Uniform INT2 with the best of identity / Hadamard / eigen rotations, each with its clip tuned on `fit`.
  double best_uniform = std::numeric_limits<double>::infinity();
  std::vector<double> wk, wv;
  const std::vector<std::pair<std::vector<double>, std::vector<double>>> rotations = {
      {to_vec(Eigen::MatrixXd::Identity(d, d)), to_vec(Eigen::MatrixXd::Identity(d, d))},
      {hadamard(d), hadamard(d)},
      {ordered_key_basis(fit.k, wk), ordered_value_basis(fit.v, wv)}};
  for (const auto& [rk, rv] : rotations) {
    const LayerChoice u = uniform_layer(fit.k, fit.v, rk, rv, 2, opt.clip_grid, nullptr);
    EXPECT_DOUBLE_EQ(u.k.spec.bits_per_element(d), 2.5);  // 2 bits + 32 metadata bits over 64 dims
    const double j = quantization_objective(test.k, u.k.rotation, u.k.spec, u.k.spec.clip_ratio) +
                     quantization_objective(test.v, u.v.rotation, u.v.spec, u.v.spec.clip_ratio);
    best_uniform = std::min(best_uniform, j);
  }
  EXPECT_LT(spectral_test, 0.8 * best_uniform) << "spectral " << spectral_test << " uniform " << best_uniform
                                               << " K " << spectral.k.note << " V " << spectral.v.note;
}

}  // namespace
}  // namespace oscar::calib
