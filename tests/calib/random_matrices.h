#pragma once
// Random test matrices the calib tests share.
#include <Eigen/Dense>

#include <cstdint>
#include <random>

namespace oscar::calib::test {

using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// A Haar-ish random orthogonal matrix: Q of the QR factorization of a Gaussian matrix.
inline RowMatD random_orthogonal(int64_t d, std::mt19937_64& rng) {
  std::normal_distribution<double> n01(0.0, 1.0);
  RowMatD g(d, d);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) g(i, j) = n01(rng);
  const Eigen::HouseholderQR<RowMatD> qr(g);
  return qr.householderQ();
}

}  // namespace oscar::calib::test
