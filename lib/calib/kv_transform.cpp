// calib::HeadTransform (lib/calib/kv_transform.h).
#include "lib/calib/kv_transform.h"

#include <Eigen/Dense>
#include <fmt/format.h>

#include <cmath>

#include "formats/error.h"
#include "lib/calib/rotation.h"

namespace oscar::calib {

namespace {
using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
}  // namespace

MomentAccumulator::MomentAccumulator(int64_t d)
    : d_(d), sum_(static_cast<size_t>(d), 0.0), outer_(static_cast<size_t>(d * d), 0.0) {
  if (d <= 0) throw Error("MomentAccumulator", ::fmt::format("dimension {} must be positive", d));
}

void MomentAccumulator::add(std::span<const float> x, double weight) {
  if (static_cast<int64_t>(x.size()) != d_)
    throw Error("MomentAccumulator", ::fmt::format("vector has {} values, expected {}", x.size(), d_));
  total_ += weight;
  for (int64_t i = 0; i < d_; ++i) {
    const double wi = weight * x[static_cast<size_t>(i)];
    sum_[static_cast<size_t>(i)] += wi;
    double* row = outer_.data() + i * d_;
    for (int64_t j = 0; j < d_; ++j) row[j] += wi * x[static_cast<size_t>(j)];
  }
}

std::vector<double> MomentAccumulator::mean() const {
  if (!(total_ > 0)) throw Error("MomentAccumulator", "no weight accumulated");
  std::vector<double> m(sum_);
  for (double& v : m) v /= total_;
  return m;
}

std::vector<double> MomentAccumulator::covariance(bool centered) const {
  if (!(total_ > 0)) throw Error("MomentAccumulator", "no weight accumulated");
  const std::vector<double> m = centered ? mean() : std::vector<double>(static_cast<size_t>(d_), 0.0);
  std::vector<double> c(outer_.size());
  for (int64_t i = 0; i < d_; ++i)
    for (int64_t j = 0; j < d_; ++j)
      c[static_cast<size_t>(i * d_ + j)] = outer_[static_cast<size_t>(i * d_ + j)] / total_ - m[i] * m[j];
  return c;
}

HeadTransform whitening_transform(std::span<const double> mean, std::span<const double> covariance, int64_t d,
                                  double alpha, std::span<const double> rotation, const std::string& where) {
  if (static_cast<int64_t>(mean.size()) != d || static_cast<int64_t>(covariance.size()) != d * d)
    throw Error(where, ::fmt::format("moments have {} and {} values, expected {} and {}x{}", mean.size(),
                                     covariance.size(), d, d, d));
  if (!rotation.empty() && static_cast<int64_t>(rotation.size()) != d * d)
    throw Error(where, ::fmt::format("rotation has {} values, expected {}x{}", rotation.size(), d, d));
  if (!(alpha >= 0.0 && alpha <= 1.0)) throw Error(where, ::fmt::format("α {} is outside [0, 1]", alpha));
  for (double v : mean)
    if (!std::isfinite(v)) throw Error(where, "mean is not finite");
  // LAPACK with the sign convention every eigen-decomposition here uses: the same Σ gives the same bytes.
  const SymmetricEigen eig = symmetric_eigen(covariance, d, where + " covariance");
  double mean_eig = 0;
  for (double v : eig.values) mean_eig += std::max(v, 0.0) / static_cast<double>(d);
  if (!(mean_eig > 0)) throw Error(where, "covariance has no positive eigenvalue");
  const double floor = kWhiteningFloor * mean_eig;
  const Eigen::Map<const RowMatD> u(eig.vectors.data(), d, d);
  Eigen::VectorXd down(d), up(d);
  for (int64_t i = 0; i < d; ++i) {
    const double lam = std::max(eig.values[static_cast<size_t>(i)], 0.0) + floor;
    down(i) = std::pow(lam, -alpha / 2);
    up(i) = std::pow(lam, alpha / 2);
  }
  const RowMatD w = u * down.asDiagonal() * u.transpose();
  const RowMatD w_inv = u * up.asDiagonal() * u.transpose();
  RowMatD r = RowMatD::Identity(d, d);
  if (!rotation.empty()) r = Eigen::Map<const RowMatD>(rotation.data(), d, d);
  // R is orthogonal, so (W R)⁻¹ = Rᵀ W⁻¹ without a solve.
  const RowMatD a = alpha == 0.0 ? r : RowMatD(w * r);
  const RowMatD a_inv = alpha == 0.0 ? RowMatD(r.transpose()) : RowMatD(r.transpose() * w_inv);
  HeadTransform t;
  t.dim = d;
  t.mean.assign(mean.begin(), mean.end());
  t.forward.assign(a.data(), a.data() + d * d);
  t.inverse.assign(a_inv.data(), a_inv.data() + d * d);
  return t;
}

std::vector<double> metric_in_transform_basis(std::span<const double> metric, const HeadTransform& t) {
  const int64_t d = t.dim;
  if (static_cast<int64_t>(metric.size()) != d * d)
    throw Error("metric_in_transform_basis", ::fmt::format("metric has {} values, expected {}x{}", metric.size(), d, d));
  const Eigen::Map<const RowMatD> m(metric.data(), d, d), c(t.inverse.data(), d, d);
  const RowMatD out = c * m * c.transpose();
  return std::vector<double>(out.data(), out.data() + d * d);
}

void transform_fake_quantize(const HeadTransform& t, std::span<const float> x, int64_t rows,
                             const BasisQuantizer& quantize_y, std::span<float> out) {
  const int64_t d = t.dim;
  if (static_cast<int64_t>(x.size()) != rows * d || out.size() != x.size())
    throw Error("transform_fake_quantize", ::fmt::format("{} rows of {} need {} values, got {} in and {} out", rows,
                                                         d, rows * d, x.size(), out.size()));
  const Eigen::Map<const RowMatD> a(t.forward.data(), d, d), a_inv(t.inverse.data(), d, d);
  const Eigen::Map<const Eigen::RowVectorXd> mu(t.mean.data(), d);
  std::vector<float> y(x.size()), y_hat(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    const Eigen::RowVectorXd xc = Eigen::Map<const Eigen::RowVectorXf>(x.data() + r * d, d).cast<double>() - mu;
    const Eigen::RowVectorXf yr = (xc * a).cast<float>();
    std::copy(yr.data(), yr.data() + d, y.begin() + r * d);
  }
  quantize_y(y, rows, y_hat);
  for (int64_t r = 0; r < rows; ++r) {
    const Eigen::RowVectorXd xr =
        Eigen::Map<const Eigen::RowVectorXf>(y_hat.data() + r * d, d).cast<double>() * a_inv + mu;
    const Eigen::RowVectorXf xf = xr.cast<float>();
    std::copy(xf.data(), xf.data() + d, out.begin() + r * d);
  }
}

}  // namespace oscar::calib
