// Rotations chosen by the objective: the objective against a direct computation with the reference quantizer and
// model::apply_rope, the pre-RoPE metric identity, the straight-through gradient against finite differences where
// the objective is smooth, and the Cayley descent (orthogonal to 1e-6, never worse than its start).
#include <Eigen/Dense>
#include <gtest/gtest.h>
#include <unsupported/Eigen/MatrixFunctions>

#include <cmath>
#include <random>

#include "formats/error.h"
#include "lib/calib/quantizer_ref.h"
#include "lib/calib/rotation.h"
#include "lib/calib/rotation_opt.h"
#include "lib/model/rope.h"

namespace oscar::calib {
namespace {

using Mat = Eigen::MatrixXd;

Mat random_orthogonal(int64_t d, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n;
  Mat g(d, d);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) g(i, j) = n(rng);
  Eigen::HouseholderQR<Mat> qr(g);
  return qr.householderQ() * Mat::Identity(d, d);
}
std::vector<double> to_vec(const Mat& m) {
  std::vector<double> v;
  for (int64_t i = 0; i < m.rows(); ++i)
    for (int64_t j = 0; j < m.cols(); ++j) v.push_back(m(i, j));
  return v;
}
Mat to_mat(const std::vector<double>& v, int64_t d) {
  Mat m(d, d);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) m(i, j) = v[i * d + j];
  return m;
}

std::vector<float> inv_freq(int64_t d) {
  std::vector<float> f(static_cast<size_t>(d / 2));
  for (int64_t i = 0; i < d / 2; ++i) f[i] = static_cast<float>(std::pow(10000.0, -2.0 * double(i) / double(d)));
  return f;
}

// Keys with one outlier channel (what rotations exist to fix) and a random SPD query metric.
ObjectiveSamples key_samples(int64_t d, int64_t tokens, uint64_t seed, bool pre_rope, bool identity_metric = false) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n;
  ObjectiveSamples s;
  s.heads = 2;
  s.tokens = tokens;
  s.dim = d;
  for (int64_t i = 0; i < s.heads * tokens * d; ++i) {
    const int64_t c = i % d;
    s.x.push_back(static_cast<float>(n(rng) * (c == 3 ? 8.0 : 1.0 + 0.02 * double(c))));
  }
  for (int64_t h = 0; h < s.heads; ++h) {
    Mat a(d, d);
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j) a(i, j) = n(rng);
    const Mat m = identity_metric ? Mat(Mat::Identity(d, d)) : Mat(a * a.transpose() / double(d) + Mat::Identity(d, d) * 0.1);
    const auto v = to_vec(m);
    s.metric.insert(s.metric.end(), v.begin(), v.end());
  }
  if (pre_rope) {
    const auto f = inv_freq(d);
    for (int64_t t = 0; t < tokens; ++t) {
      const auto tab = model::rope_tables(f, 100 + 37 * t, 1);
      s.rope_cos.insert(s.rope_cos.end(), tab.cos.begin(), tab.cos.end());
      s.rope_sin.insert(s.rope_sin.end(), tab.sin.begin(), tab.sin.end());
    }
  }
  s.finalize("test keys");
  return s;
}

fmt::TensorQuantSpec spec_of(std::vector<fmt::QuantSegment> segs) {
  fmt::TensorQuantSpec t;
  t.segments = std::move(segs);
  return t;
}

// Independent evaluation: HeadQuantizer in the original basis (fp32 rotation), model::apply_rope on x̂ and x
// separately, then Σ e M eᵀ in plain loops.
double direct_objective(const ObjectiveSamples& s, const std::vector<double>& r, const fmt::TensorQuantSpec& spec,
                        float clip) {
  const int64_t d = s.dim, n = s.tokens;
  const HeadQuantizer q(spec, d, "direct");
  const std::vector<float> rf(r.begin(), r.end());
  const auto f = inv_freq(d);
  double err = 0, energy = 0;
  for (int64_t h = 0; h < s.heads; ++h)
    for (int64_t t = 0; t < n; ++t) {
      std::vector<float> x(s.x.begin() + (h * n + t) * d, s.x.begin() + (h * n + t + 1) * d), xq(d);
      q.fake_quantize(x, 1, rf, clip, Basis::Original, xq);
      if (s.pre_rope()) {
        const auto tab = model::rope_tables(f, 100 + 37 * t, 1);
        model::apply_rope(x.data(), 1, d, tab);
        model::apply_rope(xq.data(), 1, d, tab);
      }
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) {
          const double m = s.metric[(h * d + i) * d + j];
          err += (double(xq[i]) - x[i]) * m * (double(xq[j]) - x[j]);
          energy += double(x[i]) * m * x[j];
        }
    }
  return err / energy;
}

TEST(QuantizationObjective, MatchesADirectComputationWithAndWithoutRope) {
  const int64_t d = 32;
  const auto r = to_vec(random_orthogonal(d, 5));
  const auto spec = spec_of({{0, 16, 3}, {16, 24, 2}, {24, 32, 0}});
  for (bool pre_rope : {false, true}) {
    const ObjectiveSamples s = key_samples(d, 64, 9, pre_rope);
    for (float clip : {1.0f, 0.9f}) {
      const double got = quantization_objective(s, r, spec, clip);
      const double want = direct_objective(s, r, spec, clip);
      // fp32 vs fp64 rotation of x: the codes may differ at rounding ties, so 1e-3 relative.
      EXPECT_NEAR(got, want, 1e-3 * want) << pre_rope << " " << clip;
      EXPECT_GT(got, 0.0);
    }
    // Dropping every dim leaves ε = −k: J = 1 exactly, in any basis and with RoPE.
    EXPECT_NEAR(quantization_objective(s, r, spec_of({{0, d, 0}}), 1.0f), 1.0, 1e-6);
  }
}

TEST(QuantizationObjective, PreRopeMetricIsThePositionAverage) {
  const int64_t d = 16;
  const ObjectiveSamples s = key_samples(d, 40, 3, true);
  const Mat m = to_mat(effective_metric(s, 1), d);
  std::mt19937_64 rng(1);
  std::normal_distribution<double> n;
  std::vector<float> e(d);
  for (auto& x : e) x = static_cast<float>(n(rng));
  Eigen::VectorXd ev(d);
  for (int64_t i = 0; i < d; ++i) ev[i] = e[i];
  double avg = 0;
  const auto f = inv_freq(d);
  for (int64_t t = 0; t < s.tokens; ++t) {
    std::vector<float> post = e;
    model::apply_rope(post.data(), 1, d, model::rope_tables(f, 100 + 37 * t, 1));
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j) avg += double(post[i]) * s.metric[(d + i) * d + j] * post[j];
  }
  avg /= double(s.tokens);
  EXPECT_NEAR(ev.dot(m * ev), avg, 1e-5 * avg);
}

TEST(QuantizationObjective, GradientMatchesFiniteDifferencesWhereTheObjectiveIsSmooth) {
  // 8-bit codes on [0, 8) and dropped dims elsewhere: J is dominated by the smooth dropped-energy term, the
  // straight-through part is ~2^-16 smaller, so the directional derivative must agree to ~1%. The metric is the
  // identity (RoPE keeps it so): with a dense metric the large dropped error would reach the 8-bit dims through
  // cross terms, where finite differences see the sawtooth slope of rounding that straight-through ignores by design.
  const int64_t d = 16;
  for (bool pre_rope : {false, true}) {
    const ObjectiveSamples s = key_samples(d, 64, 21, pre_rope, true);
    const Mat r = random_orthogonal(d, 8);
    const auto spec = spec_of({{0, 8, 8}, {8, 16, 0}});
    std::vector<double> grad;
    quantization_objective_gradient(s, to_vec(r), spec, 1.0f, grad);
    const Mat g = to_mat(grad, d);
    Mat a = random_orthogonal(d, 2) - random_orthogonal(d, 2).transpose();  // skew direction
    a = (a - a.transpose()) / 2;
    const double analytic = (g.array() * (a * r).array()).sum();
    // The quantizer sees fp32 y, so tiny steps drown in rounding; J is smooth enough for a 1e-2 central step.
    const double h = 1e-2;
    auto at = [&](double tau) {
      const Mat e = (tau * a).exp();
      return quantization_objective(s, to_vec(e * r), spec, 1.0f);
    };
    const double numeric = (at(h) - at(-h)) / (2 * h);
    EXPECT_NEAR(analytic, numeric, 0.01 * std::abs(numeric) + 1e-6) << pre_rope;
  }
}

TEST(CayleyDescent, StaysOrthogonalAndNeverIncreasesTheObjective) {
  const int64_t d = 32;
  const ObjectiveSamples s = key_samples(d, 256, 4, false);
  const auto spec = spec_of({{0, d, 2}});
  for (const auto& start : {to_vec(Mat::Identity(d, d)), hadamard(d)}) {
    CayleyOptions opt;
    opt.max_iterations = 15;
    const CayleyResult r = cayley_descent(s, start, spec, 1.0f, opt);
    EXPECT_LT(orthogonality_error(r.rotation, d), 1e-6);
    EXPECT_LE(r.objective, r.start_objective);
    EXPECT_DOUBLE_EQ(r.start_objective, quantization_objective(s, start, spec, 1.0f));
    EXPECT_DOUBLE_EQ(r.objective, quantization_objective(s, r.rotation, spec, 1.0f));
  }
  // From the identity with an 8σ outlier channel there is a lot to gain: the descent must find some of it.
  const CayleyResult r = cayley_descent(s, to_vec(Mat::Identity(d, d)), spec, 1.0f, {});
  EXPECT_LT(r.objective, 0.9 * r.start_objective);
  EXPECT_GT(r.accepted_steps, 0);
}

TEST(SegmentMix, IsOrthogonalForEveryLength) {
  for (int64_t n : {1, 8, 16, 48, 80, 112, 128}) {
    const auto m = segment_mix(n);
    EXPECT_LT(orthogonality_error(m, n), 1e-12) << n;
  }
  EXPECT_THROW(segment_mix(0), Error);
  // Mixes applied to an orthogonal basis keep it orthogonal and leave unmixed columns untouched.
  const int64_t d = 64;
  const auto r = to_vec(random_orthogonal(d, 1));
  const std::vector<fmt::QuantSegment> segs = {{0, 16, 3}, {16, 64, 2}};
  const auto mixed = apply_segment_mixes(r, d, segs, {false, true});
  EXPECT_LT(orthogonality_error(mixed, d), 1e-12);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < 16; ++j) EXPECT_EQ(mixed[i * d + j], r[i * d + j]);
}

}  // namespace
}  // namespace oscar::calib
