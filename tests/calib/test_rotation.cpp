// Rotations: Hadamard, bit reversal, the LAPACK eigen-decomposition and the published OSCAR composition, each
// checked against an independent construction (Eigen, the published recursion) or an analytic property.
#include <Eigen/Dense>
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>

#include "formats/error.h"
#include "lib/calib/rotation.h"
#include "test_support.h"

namespace oscar::calib {
namespace {

using Mat = Eigen::MatrixXd;

Mat to_mat(const std::vector<double>& v, int64_t d) {
  Mat m(d, d);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) m(i, j) = v[i * d + j];
  return m;
}

// The published build_hadamard: [[H, H], [H, −H]] / √2, recursively.
Mat recursive_hadamard(int64_t n) {
  if (n == 1) return Mat::Ones(1, 1);
  Mat h = recursive_hadamard(n / 2);
  Mat out(n, n);
  out << h, h, h, -h;
  return out / std::sqrt(2.0);
}

Mat random_orthogonal(int64_t d, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  Mat g(d, d);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) g(i, j) = normal(rng);
  Eigen::HouseholderQR<Mat> qr(g);
  return qr.householderQ() * Mat::Identity(d, d);
}

TEST(Hadamard, IsOrthogonalAndMatchesTheSylvesterRecursion) {
  for (int64_t n : {1, 2, 4, 8, 16, 64, 128}) {
    const Mat h = to_mat(hadamard(n), n);
    EXPECT_LT((h * h.transpose() - Mat::Identity(n, n)).cwiseAbs().maxCoeff(), 1e-14) << n;
    EXPECT_LT((h - recursive_hadamard(n)).cwiseAbs().maxCoeff(), 1e-15) << n;
    // Every entry is ±1/√n: the rotation spreads each channel evenly over all outputs.
    EXPECT_NEAR(h.cwiseAbs().minCoeff(), 1.0 / std::sqrt(double(n)), 1e-15);
  }
  EXPECT_THROW(hadamard(12), Error);
  EXPECT_THROW(hadamard(0), Error);
}

TEST(BitReversal, IsAnInvolutivePermutationWithKnownValues) {
  EXPECT_EQ(bit_reversal_permutation(8), (std::vector<int64_t>{0, 4, 2, 6, 1, 5, 3, 7}));
  for (int64_t n : {1, 2, 16, 128}) {
    const auto br = bit_reversal_permutation(n);
    std::vector<int64_t> sorted = br;
    std::sort(sorted.begin(), sorted.end());
    std::vector<int64_t> iota(n);
    std::iota(iota.begin(), iota.end(), 0);
    EXPECT_EQ(sorted, iota) << n;
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(br[br[i]], i);
  }
  EXPECT_THROW(bit_reversal_permutation(6), Error);
}

TEST(SymmetricEigen, RecoversAKnownBasis) {
  const int64_t d = 32;
  const Mat u = random_orthogonal(d, 7);
  Eigen::VectorXd lambda(d);
  for (int64_t i = 0; i < d; ++i) lambda(i) = std::pow(0.8, double(i)) * 10.0;  // distinct, descending
  const Mat sigma = u * lambda.asDiagonal() * u.transpose();
  std::vector<double> s(d * d);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) s[i * d + j] = sigma(i, j);
  const SymmetricEigen eig = symmetric_eigen(s, d, "test");
  const Mat v = to_mat(eig.vectors, d);
  for (int64_t j = 0; j < d; ++j) {
    EXPECT_NEAR(eig.values[j], lambda(j), 1e-12 * lambda(0)) << j;
    // Sine of the angle between the recovered and the true eigenvector (sign-free, accurate near zero).
    const double cosine = v.col(j).dot(u.col(j));
    const double sine = (v.col(j) - cosine * u.col(j)).norm();
    EXPECT_LT(sine, 1e-9) << j;
    // Sign convention: the largest-magnitude component is positive.
    Eigen::Index arg;
    v.col(j).cwiseAbs().maxCoeff(&arg);
    EXPECT_GT(v(arg, j), 0.0) << j;
  }
}

TEST(SymmetricEigen, RejectsNonFiniteInput) {
  std::vector<double> s = {1, 0, 0, std::nan("")};
  EXPECT_THROW(symmetric_eigen(s, 2, "test"), Error);
  EXPECT_THROW(symmetric_eigen(s, 3, "test"), Error);
}

TEST(BuildRotation, OscarMatchesThePublishedComposition) {
  // compute_kv_rotation.py, composition "r_h_pbr": R = U_asc @ H @ P with P = I[:, perm],
  // perm[br[i]] = argsort(eigvals_asc, descending)[i].
  const int64_t d = 16;
  const Mat u = random_orthogonal(d, 11);
  Eigen::VectorXd lambda(d);
  for (int64_t i = 0; i < d; ++i) lambda(i) = 1.0 + double((i * 7) % d);  // distinct, unordered
  const Mat sigma = u * lambda.asDiagonal() * u.transpose();
  std::vector<double> s(sigma.data(), sigma.data() + d * d);  // symmetric: storage order is irrelevant
  const SymmetricEigen eig = symmetric_eigen(s, d, "test");

  Mat u_asc(d, d);
  Eigen::VectorXd w_asc(d);
  for (int64_t m = 0; m < d; ++m) {
    u_asc.col(m) = to_mat(eig.vectors, d).col(d - 1 - m);
    w_asc(m) = eig.values[d - 1 - m];
  }
  std::vector<int64_t> sorted_idx(d);
  std::iota(sorted_idx.begin(), sorted_idx.end(), 0);
  std::stable_sort(sorted_idx.begin(), sorted_idx.end(), [&](int64_t a, int64_t b) { return w_asc(a) > w_asc(b); });
  const auto br = bit_reversal_permutation(d);
  std::vector<int64_t> perm(d);
  for (int64_t i = 0; i < d; ++i) perm[br[i]] = sorted_idx[i];
  Mat p = Mat::Zero(d, d);
  for (int64_t j = 0; j < d; ++j) p(perm[j], j) = 1.0;
  const Mat expected = u_asc * recursive_hadamard(d) * p;

  const auto r = build_rotation(RotationKind::EigenHadamard, eig, d);
  EXPECT_LT((to_mat(r, d) - expected).cwiseAbs().maxCoeff(), 1e-13);
  EXPECT_LT(orthogonality_error(r, d), 1e-13);
  EXPECT_EQ(oscar_composition_name(d), "eigen*hadamard*bitrev");
}

TEST(BuildRotation, KindsAndTheNonPowerOfTwoFallback) {
  const int64_t d = 6;
  const Mat u = random_orthogonal(d, 3);
  Eigen::VectorXd lambda(d);
  lambda << 6, 5, 4, 3, 2, 1;
  const Mat sigma = u * lambda.asDiagonal() * u.transpose();
  std::vector<double> s(sigma.data(), sigma.data() + d * d);
  const SymmetricEigen eig = symmetric_eigen(s, d, "test");
  EXPECT_EQ(to_mat(build_rotation(RotationKind::None, eig, d), d), Mat::Identity(d, d));
  EXPECT_EQ(build_rotation(RotationKind::Eigen, eig, d), eig.vectors);
  // No Sylvester Hadamard of order 6: OSCAR falls back to the eigenvectors and says so.
  EXPECT_EQ(build_rotation(RotationKind::EigenHadamard, eig, d), eig.vectors);
  EXPECT_EQ(oscar_composition_name(d), "eigen");
  EXPECT_THROW(build_rotation(RotationKind::Hadamard, eig, d), Error);
}

}  // namespace
}  // namespace oscar::calib
