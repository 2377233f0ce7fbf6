// calib::HeadTransform (lib/calib/kv_transform.h).
#include "lib/calib/kv_transform.h"

#include <Eigen/Dense>
#include <fmt/format.h>

#include <tbb/parallel_for.h>

#include <cmath>

#include "formats/error.h"
#include "lib/calib/ef_calibration.h"
#include "lib/calib/quantizer_ref.h"
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
  const std::vector<float> a(t.forward.begin(), t.forward.end()), a_inv(t.inverse.begin(), t.inverse.end());
  const std::vector<float> mu(t.mean.begin(), t.mean.end());
  transform_fake_quantize(HeadTransformView{t.dim, a, a_inv, mu}, x, rows, quantize_y, out);
}

void transform_fake_quantize(const HeadTransformView& t, std::span<const float> x, int64_t rows,
                             const BasisQuantizer& quantize_y, std::span<float> out) {
  const int64_t d = t.dim;
  if (static_cast<int64_t>(x.size()) != rows * d || out.size() != x.size())
    throw Error("transform_fake_quantize", ::fmt::format("{} rows of {} need {} values, got {} in and {} out", rows,
                                                         d, rows * d, x.size(), out.size()));
  const auto dd = static_cast<size_t>(d * d);
  if (t.forward.size() != dd || t.inverse.size() != dd || (!t.mean.empty() && t.mean.size() != static_cast<size_t>(d)))
    throw Error("transform_fake_quantize", ::fmt::format("transform views of {} / {} / {} values for head_dim {}",
                                                         t.forward.size(), t.inverse.size(), t.mean.size(), d));
  // fp32 throughout, in the cache writers' order (kern::kv_write with a per-head matrix and mean): x − μ rounded
  // once, then calib::rotate's fmaf chain with the fp32 A, so the simulated codes are the engine's.
  std::vector<float> y(x.size()), y_hat(x.size()), xc(static_cast<size_t>(d)), xr(static_cast<size_t>(d));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < d; ++i)
      xc[static_cast<size_t>(i)] = x[static_cast<size_t>(r * d + i)] - (t.mean.empty() ? 0.0f : t.mean[i]);
    rotate(xc, t.forward, std::span<float>(y).subspan(static_cast<size_t>(r * d), static_cast<size_t>(d)));
  }
  quantize_y(y, rows, y_hat);
  for (int64_t r = 0; r < rows; ++r) {
    rotate(std::span<const float>(y_hat).subspan(static_cast<size_t>(r * d), static_cast<size_t>(d)), t.inverse, xr);
    for (int64_t i = 0; i < d; ++i)
      out[static_cast<size_t>(r * d + i)] = xr[static_cast<size_t>(i)] + (t.mean.empty() ? 0.0f : t.mean[i]);
  }
}

bool has_transform(const fmt::LayerCalibration& layer, bool keys) {
  return !(keys ? layer.k_transform : layer.v_transform).empty();
}

HeadTransformView stored_transform_view(const fmt::LayerCalibration& layer, bool keys, int64_t kv_head, int64_t d,
                                        const std::string& where) {
  const std::vector<float>& a = keys ? layer.k_transform : layer.v_transform;
  const std::vector<float>& a_inv = keys ? layer.k_transform_inverse : layer.v_transform_inverse;
  const auto dd = static_cast<size_t>(d * d), off = static_cast<size_t>(kv_head) * dd;
  if (a.empty()) throw Error(where, ::fmt::format("the {} tensor has no storage transform", keys ? "K" : "V"));
  if (kv_head < 0 || a.size() < off + dd || a_inv.size() < off + dd ||
      (keys && layer.k_mean.size() < static_cast<size_t>((kv_head + 1) * d)))
    throw Error(where, ::fmt::format("storage transform arrays too short for KV head {}", kv_head));
  HeadTransformView v;
  v.dim = d;
  v.forward = std::span<const float>(a).subspan(off, dd);
  v.inverse = std::span<const float>(a_inv).subspan(off, dd);
  if (keys) v.mean = std::span<const float>(layer.k_mean).subspan(static_cast<size_t>(kv_head * d), static_cast<size_t>(d));
  return v;
}

HeadTransform stored_transform(const fmt::LayerCalibration& layer, bool keys, int64_t kv_head, int64_t d,
                               const std::string& where) {
  const HeadTransformView v = stored_transform_view(layer, keys, kv_head, d, where);
  HeadTransform t;
  t.dim = d;
  t.forward.assign(v.forward.begin(), v.forward.end());
  t.inverse.assign(v.inverse.begin(), v.inverse.end());
  if (v.mean.empty())
    t.mean.assign(static_cast<size_t>(d), 0.0);
  else
    t.mean.assign(v.mean.begin(), v.mean.end());
  return t;
}

std::string TransformCalibration::alpha_text() const {
  return value_alpha && *value_alpha != alpha ? ::fmt::format("{:.6g},{:.6g}", alpha, *value_alpha)
                                              : ::fmt::format("{:.6g}", alpha);
}

void TransformCalibration::check_alphas() const {
  for (const bool keys : {true, false})
    if (!(alpha_for(keys) >= 0.0 && alpha_for(keys) <= 1.0))
      throw Error("--transform-alpha",
                  ::fmt::format("{} α {} is outside [0, 1]", keys ? "key" : "value", alpha_for(keys)));
}

int64_t add_storage_transforms(fmt::Bundle& b, const std::vector<HeldoutLayer>& heldout,
                               const TransformCalibration& opt) {
  if (!opt.enabled) return 0;
  const int64_t d = b.quant.head_dim, hkv = b.model.num_kv_heads, L = static_cast<int64_t>(b.layers.size());
  opt.check_alphas();
  if (static_cast<int64_t>(heldout.size()) != L)
    throw Error("--transform", ::fmt::format("needs held-out samples of every layer ({} for {} layers): "
                                             "calibrate with --heldout-seqs >= 1", heldout.size(), L));
  std::vector<uint8_t> given(static_cast<size_t>(2 * L), 0);
  tbb::parallel_for(int64_t{0}, L, [&](int64_t l) {
    const HeldoutLayer& data = heldout[static_cast<size_t>(l)];
    fmt::LayerCalibration& layer = b.layers[static_cast<size_t>(l)];
    for (const bool keys : {true, false}) {
      if (!whole_head_int2(b, static_cast<size_t>(l), keys)) continue;
      const std::string where = ::fmt::format("--transform layer {} {}", l, keys ? "K" : "V");
      if (data.num_kv_heads != hkv || data.head_dim != d || data.tokens < 1)
        throw Error(where, ::fmt::format("held-out samples are [{} heads, {} tokens, {}], expected [{}, >= 1, {}]",
                                         data.num_kv_heads, data.tokens, data.head_dim, hkv, d));
      const std::vector<float>& x = keys ? data.k : data.v;
      const std::vector<float>& rot = keys ? layer.k_rotation : layer.v_rotation;
      std::vector<float>& a = keys ? layer.k_transform : layer.v_transform;
      std::vector<float>& a_inv = keys ? layer.k_transform_inverse : layer.v_transform_inverse;
      a.assign(static_cast<size_t>(hkv * d * d), 0.0f);
      a_inv.assign(a.size(), 0.0f);
      if (keys) layer.k_mean.assign(static_cast<size_t>(hkv * d), 0.0f);
      for (int64_t h = 0; h < hkv; ++h) {
        MomentAccumulator acc(d);
        for (int64_t t = 0; t < data.tokens; ++t)
          acc.add(std::span<const float>(x).subspan(static_cast<size_t>((h * data.tokens + t) * d),
                                                    static_cast<size_t>(d)),
                  keys || data.value_weight.empty() ? 1.0
                                                    : data.value_weight[static_cast<size_t>(h * data.tokens + t)]);
        const int64_t g = b.rotation_groups == 1 ? 0 : h;
        const std::vector<double> r(rot.begin() + g * d * d, rot.begin() + (g + 1) * d * d);
        // The mean is stored as fp32 and the transform is built around that fp32 mean, so the writer's subtraction
        // and the fit agree exactly.
        std::vector<double> mu(static_cast<size_t>(d), 0.0);
        if (keys) {
          const std::vector<double> m = acc.mean();
          for (int64_t i = 0; i < d; ++i) mu[i] = static_cast<double>(static_cast<float>(m[i]));
        }
        const HeadTransform t = whitening_transform(mu, acc.covariance(keys), d, opt.alpha_for(keys), r,
                                                    ::fmt::format("{} KV head {}", where, h));
        for (int64_t i = 0; i < d * d; ++i) {
          a[static_cast<size_t>(h * d * d + i)] = static_cast<float>(t.forward[static_cast<size_t>(i)]);
          a_inv[static_cast<size_t>(h * d * d + i)] = static_cast<float>(t.inverse[static_cast<size_t>(i)]);
        }
        if (keys)
          for (int64_t i = 0; i < d; ++i) layer.k_mean[static_cast<size_t>(h * d + i)] = static_cast<float>(mu[i]);
      }
      given[static_cast<size_t>(2 * l + (keys ? 0 : 1))] = 1;
    }
  });
  int64_t n = 0;
  for (uint8_t g : given) n += g;
  return n;
}

}  // namespace oscar::calib
