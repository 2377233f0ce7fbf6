// calib::HeadTransform (lib/calib/kv_transform.h): the moments, the transform's algebra (α = 0 is the rotation
// itself, A·A⁻¹ = I, α = 1 whitens), the metric in its basis, the round trip, and the claim the transform exists
// for: on an anisotropic source, error-feedback rounding in a partially whitened basis has a lower error in the
// metric than the same rounding after the rotation alone.
#include <gtest/gtest.h>

#include <Eigen/Dense>

#include <cmath>
#include <iostream>
#include <random>

#include "formats/error.h"
#include "lib/calib/error_feedback.h"
#include "lib/calib/kv_transform.h"
#include "lib/calib/quantizer_ref.h"
#include "lib/calib/rotation.h"
#include "tests/calib/random_matrices.h"

namespace oscar::calib {
namespace {

using test::RowMatD;
using test::random_orthogonal;

// n vectors x = μ + z·diag(√λ)·Qᵀ: mean μ, covariance Q diag(λ) Qᵀ with λ spread geometrically over `spread`.
std::vector<float> anisotropic_source(int64_t n, int64_t d, double spread, const RowMatD& q,
                                      const Eigen::RowVectorXd& mu, std::mt19937_64& rng) {
  std::normal_distribution<double> n01(0.0, 1.0);
  Eigen::RowVectorXd scale(d);
  for (int64_t i = 0; i < d; ++i) scale(i) = std::sqrt(std::pow(spread, -static_cast<double>(i) / (d - 1)));
  std::vector<float> x(static_cast<size_t>(n * d));
  for (int64_t t = 0; t < n; ++t) {
    Eigen::RowVectorXd z(d);
    for (int64_t i = 0; i < d; ++i) z(i) = n01(rng) * scale(i);
    const Eigen::RowVectorXd v = mu + z * q.transpose();
    for (int64_t i = 0; i < d; ++i) x[t * d + i] = static_cast<float>(v(i));
  }
  return x;
}

TEST(MomentAccumulator, WeightedMeanAndCovarianceMatchTheDirectSums) {
  const int64_t d = 5;
  std::mt19937_64 rng(3);
  std::normal_distribution<float> n01(0.f, 1.f);
  MomentAccumulator acc(d);
  std::vector<std::vector<float>> xs;
  std::vector<double> ws;
  for (int t = 0; t < 40; ++t) {
    std::vector<float> x(d);
    for (auto& v : x) v = n01(rng) + 0.5f;
    const double w = 0.25 + (t % 7);
    acc.add(x, w);
    xs.push_back(x);
    ws.push_back(w);
  }
  double total = 0;
  Eigen::VectorXd mean = Eigen::VectorXd::Zero(d);
  for (size_t t = 0; t < xs.size(); ++t) {
    total += ws[t];
    for (int64_t i = 0; i < d; ++i) mean(i) += ws[t] * xs[t][i];
  }
  mean /= total;
  Eigen::MatrixXd cov = Eigen::MatrixXd::Zero(d, d);
  for (size_t t = 0; t < xs.size(); ++t) {
    Eigen::VectorXd c(d);
    for (int64_t i = 0; i < d; ++i) c(i) = xs[t][i] - mean(i);
    cov += ws[t] * c * c.transpose();
  }
  cov /= total;
  const auto m = acc.mean();
  const auto centered = acc.covariance(true), second = acc.covariance(false);
  for (int64_t i = 0; i < d; ++i) {
    EXPECT_NEAR(m[i], mean(i), 1e-12);
    for (int64_t j = 0; j < d; ++j) {
      EXPECT_NEAR(centered[i * d + j], cov(i, j), 1e-12);
      EXPECT_NEAR(second[i * d + j], cov(i, j) + mean(i) * mean(j), 1e-12);  // E[xxᵀ] = Σ + μμᵀ
    }
  }
  EXPECT_THROW(acc.add(std::vector<float>(d + 1, 0.f)), Error);
  EXPECT_THROW(MomentAccumulator(4).mean(), Error);
}

TEST(WhiteningTransform, AlphaZeroIsTheRotationAndTheInverseIsExact) {
  const int64_t d = 16;
  std::mt19937_64 rng(5);
  const RowMatD q = random_orthogonal(d, rng);
  const RowMatD cov = q * Eigen::VectorXd::LinSpaced(d, 0.01, 4.0).asDiagonal() * q.transpose();
  const std::vector<double> h = hadamard(d), mean(d, 0.25);
  const HeadTransform t0 = whitening_transform(mean, std::span<const double>(cov.data(), d * d), d, 0.0, h, "t");
  EXPECT_EQ(t0.forward, h);
  EXPECT_EQ(t0.mean, mean);
  for (double alpha : {0.25, 0.5, 1.0}) {
    const HeadTransform t = whitening_transform(mean, std::span<const double>(cov.data(), d * d), d, alpha, h, "t");
    const Eigen::Map<const RowMatD> a(t.forward.data(), d, d), a_inv(t.inverse.data(), d, d);
    EXPECT_LT((a * a_inv - RowMatD::Identity(d, d)).cwiseAbs().maxCoeff(), 1e-10) << alpha;
    // y = x·A has covariance Aᵀ Σ A = Rᵀ U diag(λ (λ + ε)^(−α)) Uᵀ R, ε = kWhiteningFloor · mean(λ): α = 1 whitens
    // up to the floor, smaller α narrow the spread.
    Eigen::VectorXd ev = Eigen::SelfAdjointEigenSolver<RowMatD>(a.transpose() * cov * a).eigenvalues();
    const Eigen::VectorXd lam = Eigen::VectorXd::LinSpaced(d, 0.01, 4.0);
    const double eps = kWhiteningFloor * lam.mean();
    for (int64_t i = 0; i < d; ++i)
      EXPECT_NEAR(ev(i), lam(i) * std::pow(lam(i) + eps, -alpha), 1e-9) << "α " << alpha << " eigenvalue " << i;
  }
}

TEST(WhiteningTransform, RefusesBadInput) {
  const int64_t d = 4;
  const std::vector<double> eye = {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1}, zero(d * d, 0.0), mean(d, 0.0);
  EXPECT_THROW(whitening_transform(mean, eye, d, -0.1, {}, "t"), Error);
  EXPECT_THROW(whitening_transform(mean, eye, d, 1.5, {}, "t"), Error);
  EXPECT_THROW(whitening_transform(std::vector<double>(d + 1, 0.0), eye, d, 0.5, {}, "t"), Error);
  EXPECT_THROW(whitening_transform(mean, eye, d, 0.5, std::vector<double>(3, 0.0), "t"), Error);
  EXPECT_THROW(whitening_transform(mean, zero, d, 0.5, {}, "t"), Error);
  std::vector<double> nan = eye;
  nan[5] = std::nan("");
  EXPECT_THROW(whitening_transform(mean, nan, d, 0.5, {}, "t"), Error);
}

TEST(WhiteningTransform, MetricInItsBasisPricesTheSameErrors) {
  const int64_t d = 8;
  std::mt19937_64 rng(9);
  const RowMatD q = random_orthogonal(d, rng);
  const RowMatD cov = q * Eigen::VectorXd::LinSpaced(d, 0.1, 3.0).asDiagonal() * q.transpose();
  const RowMatD g = random_orthogonal(d, rng) * Eigen::VectorXd::LinSpaced(d, 0.5, 2.0).asDiagonal();
  const RowMatD m = g * g.transpose();
  const std::vector<double> h = hadamard(d), mean(d, 0.0);
  const std::span<const double> ms(m.data(), d * d);
  const HeadTransform t = whitening_transform(mean, std::span<const double>(cov.data(), d * d), d, 0.5, h, "t");
  const std::vector<double> hy = metric_in_transform_basis(ms, t);
  const Eigen::Map<const RowMatD> hym(hy.data(), d, d), a_inv(t.inverse.data(), d, d);
  std::normal_distribution<double> n01(0.0, 1.0);
  for (int k = 0; k < 5; ++k) {
    Eigen::RowVectorXd ey(d);
    for (int64_t i = 0; i < d; ++i) ey(i) = n01(rng);
    const Eigen::RowVectorXd ex = ey * a_inv;  // the error in the original basis
    const double in_y = (ey * hym * ey.transpose())(0, 0), in_x = (ex * m * ex.transpose())(0, 0);
    EXPECT_NEAR(in_y, in_x, 1e-9 * in_x);
  }
  // At α = 0 it is metric_in_basis's Rᵀ M R.
  const HeadTransform t0 = whitening_transform(mean, std::span<const double>(cov.data(), d * d), d, 0.0, h, "t");
  const auto a = metric_in_transform_basis(ms, t0), b = metric_in_basis(ms, h, d);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-12);
}

TEST(WhiteningTransform, FakeQuantizeRoundTripsThroughTheBasis) {
  const int64_t d = 8, n = 6;
  std::mt19937_64 rng(11);
  const RowMatD q = random_orthogonal(d, rng);
  Eigen::RowVectorXd mu(d);
  for (int64_t i = 0; i < d; ++i) mu(i) = 2.0 - 0.5 * i;
  const std::vector<float> x = anisotropic_source(n, d, 50.0, q, mu, rng);
  MomentAccumulator acc(d);
  for (int64_t t = 0; t < n; ++t) acc.add(std::span<const float>(x).subspan(t * d, d));
  const HeadTransform t = whitening_transform(acc.mean(), acc.covariance(true), d, 0.5, hadamard(d), "t");
  std::vector<float> out(x.size());
  transform_fake_quantize(t, x, n, [](std::span<const float> y, int64_t, std::span<float> yh) {
    std::copy(y.begin(), y.end(), yh.begin());
  }, out);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(out[i], x[i], 1e-5f * (1.f + std::fabs(x[i])));
  // A quantizer that adds e in y's basis shows up as e·A⁻¹ in x's.
  const Eigen::Map<const RowMatD> a_inv(t.inverse.data(), d, d);
  transform_fake_quantize(t, x, n, [](std::span<const float> y, int64_t, std::span<float> yh) {
    for (size_t i = 0; i < y.size(); ++i) yh[i] = y[i] + (i % 8 == 3 ? 0.125f : 0.f);
  }, out);
  Eigen::RowVectorXd e = Eigen::RowVectorXd::Zero(d);
  e(3) = 0.125;
  const Eigen::RowVectorXd ex = e * a_inv;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < d; ++i) EXPECT_NEAR(out[r * d + i] - x[r * d + i], ex(i), 1e-4);
  EXPECT_THROW(transform_fake_quantize(t, x, n + 1, {}, out), Error);
}

// The measured mechanism (docs/results.md) on synthetic data: a source whose variance spreads over 2.5 decades
// and a metric that is not aligned with it. Error in the metric per unit source energy, 2-bit whole-head records,
// no clip, EF damped as the calibrator does (0.1).
TEST(WhiteningTransform, PartialWhiteningLowersTheErrorInTheMetricUnderFeedback) {
  const int64_t d = 64, n = 1500;
  std::mt19937_64 rng(21);
  const RowMatD q = random_orthogonal(d, rng);
  Eigen::RowVectorXd mu = Eigen::RowVectorXd::Zero(d);
  const std::vector<float> fit = anisotropic_source(n, d, 300.0, q, mu, rng);
  const std::vector<float> test = anisotropic_source(n, d, 300.0, q, mu, rng);
  const RowMatD g = random_orthogonal(d, rng) * Eigen::VectorXd::LinSpaced(d, 0.2, 3.0).asDiagonal();
  const RowMatD m = g * g.transpose();
  const std::span<const double> ms(m.data(), d * d);
  MomentAccumulator acc(d);
  for (int64_t t = 0; t < n; ++t) acc.add(std::span<const float>(fit).subspan(t * d, d));
  const std::vector<double> h = hadamard(d);
  ErrorFeedbackOptions o;
  o.damp = 0.1;
  const fmt::TensorQuantSpec spec = fmt::KvQuantSpec::uniform(d, 2).k;
  const HeadQuantizer rtn(spec, d, "test");
  auto metric_error = [&](double alpha, bool feedback) {
    const HeadTransform t = whitening_transform(acc.mean(), acc.covariance(true), d, alpha, h, "t");
    const ErrorFeedbackTable table = error_feedback_table(metric_in_transform_basis(ms, t), d, o, "t");
    std::vector<float> out(test.size());
    transform_fake_quantize(t, test, n, [&](std::span<const float> y, int64_t rows, std::span<float> yh) {
      if (feedback) error_feedback_fake_quantize(y, rows, {}, 1.0f, 2, table, yh);
      else rtn.fake_quantize(y, rows, {}, 1.0f, Basis::Original, yh);
    }, out);
    double err = 0, energy = 0;
    for (int64_t r = 0; r < n; ++r) {
      Eigen::RowVectorXd e(d), xv(d);
      for (int64_t i = 0; i < d; ++i) e(i) = out[r * d + i] - test[r * d + i], xv(i) = test[r * d + i];
      err += (e * m * e.transpose())(0, 0);
      energy += (xv * m * xv.transpose())(0, 0);
    }
    return err / energy;
  };
  const double ef_rot = metric_error(0.0, true), ef_white = metric_error(0.5, true);
  const double rtn_rot = metric_error(0.0, false), rtn_white = metric_error(0.5, false);
  std::cout << "relative error in M: RTN " << rtn_rot << " (R) " << rtn_white << " (W·R); EF " << ef_rot << " (R) "
            << ef_white << " (W·R)\n";
  EXPECT_LT(ef_rot, rtn_rot);     // the feedback alone already helps in an anisotropic metric
  EXPECT_LT(ef_white, rtn_white);  // in either basis
  EXPECT_LT(ef_white, 0.8 * ef_rot);  // and the whitened basis gives it more to work with
}

}  // namespace
}  // namespace oscar::calib
