#include "lib/calib/error_report.h"

#include <Eigen/Dense>
#include <fmt/format.h>
#include <tbb/parallel_for.h>

#include <algorithm>

#include "formats/error.h"

namespace oscar::calib {

namespace {

using RowMatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Σ_t x_t S x_tᵀ over the rows of x [n, d].
double quadratic_energy(const RowMatrix& x, const double* s) {
  Eigen::Map<const RowMatrix> sm(s, x.cols(), x.cols());
  return (x * sm).cwiseProduct(x).sum();
}
double quadratic_energy(const float* x, int64_t n, int64_t d, const double* s) {
  return quadratic_energy(
      Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(x, n, d).cast<double>(),
      s);
}

}  // namespace

double quadratic_energy(std::span<const double> x, int64_t d, const double* s, std::span<const double> w) {
  const auto n = static_cast<int64_t>(x.size()) / d;
  const Eigen::Map<const RowMatrix> xm(x.data(), n, d);
  if (w.empty()) return quadratic_energy(xm, s);
  Eigen::Map<const RowMatrix> sm(s, d, d);
  return (xm * sm).cwiseProduct(xm).rowwise().sum().dot(Eigen::Map<const Eigen::VectorXd>(w.data(), n));
}

HeldoutCollector::HeldoutCollector(const StatisticsShape& shape, ValueWeighting weighting, int64_t skip_first_tokens,
                                   int64_t max_tokens_per_layer)
    : shape_(shape),
      weighting_(weighting),
      skip_first_(std::max<int64_t>(0, skip_first_tokens)),
      max_tokens_(max_tokens_per_layer),
      queries_(shape, ValueWeighting::Uniform),
      layers_(static_cast<size_t>(shape.num_layers)) {
  if (max_tokens_per_layer <= 0)
    throw Error("HeldoutCollector", ::fmt::format("max_tokens_per_layer must be positive, got {}", max_tokens_per_layer));
  for (auto& l : layers_) {
    l.num_kv_heads = shape.num_kv_heads;
    l.head_dim = shape.head_dim;
  }
}

void HeldoutCollector::begin_sequence(int64_t index) { queries_.begin_sequence(index); }

void HeldoutCollector::on_attention_inputs(const model::AttentionInputs& in) {
  queries_.on_attention_inputs(in);  // validates the shape
  HeldoutLayer& l = layers_[in.layer];
  const int64_t T = in.num_tokens, d = shape_.head_dim, H = shape_.num_kv_heads;
  const int64_t first = std::max<int64_t>(0, skip_first_ - in.pos0);
  const int64_t take = std::min(T - first, max_tokens_ - l.tokens);
  if (take <= 0) return;
  // K/V are kept head-major, so appending a call means regrouping what is already there.
  std::vector<float> k(static_cast<size_t>(H * (l.tokens + take) * d)), v(k.size());
  std::vector<double> w(static_cast<size_t>(H * (l.tokens + take)), 1.0);
  std::vector<double> mass(static_cast<size_t>(T));
  for (int64_t h = 0; h < H; ++h) {
    const size_t old_off = static_cast<size_t>(h * l.tokens * d), new_off = static_cast<size_t>(h * (l.tokens + take) * d);
    std::copy_n(l.k.begin() + old_off, l.tokens * d, k.begin() + new_off);
    std::copy_n(l.v.begin() + old_off, l.tokens * d, v.begin() + new_off);
    std::copy_n(in.k + (h * T + first) * d, take * d, k.begin() + new_off + l.tokens * d);
    std::copy_n(in.v + (h * T + first) * d, take * d, v.begin() + new_off + l.tokens * d);
    if (weighting_ == ValueWeighting::AttentionMass) {
      std::copy_n(l.value_weight.begin() + h * l.tokens, l.tokens, w.begin() + h * (l.tokens + take));
      attention_mass(in, h, mass);
      std::copy_n(mass.begin() + first, take, w.begin() + h * (l.tokens + take) + l.tokens);
    }
  }
  l.k = std::move(k);
  l.v = std::move(v);
  l.value_weight = std::move(w);
  l.tokens += take;
}

std::vector<HeldoutLayer> HeldoutCollector::finish() {
  const int64_t d = shape_.head_dim, H = shape_.num_kv_heads;
  for (int64_t layer = 0; layer < shape_.num_layers; ++layer) {
    HeldoutLayer& l = layers_[layer];
    if (l.tokens == 0)
      throw Error("HeldoutCollector", ::fmt::format("layer {}: no held-out tokens beyond the first {} positions",
                                                    layer, skip_first_));
    l.sigma_q.resize(static_cast<size_t>(H * d * d));
    for (int64_t h = 0; h < H; ++h) {
      const HeadMoments m = queries_.head_moments(layer, h);
      std::copy(m.sigma_q.begin(), m.sigma_q.end(), l.sigma_q.begin() + h * d * d);
      if (weighting_ == ValueWeighting::QueryEnergy) {
        for (int64_t t = 0; t < l.tokens; ++t)
          l.value_weight[h * l.tokens + t] = quadratic_energy(l.k.data() + (h * l.tokens + t) * d, 1, d, m.sigma_q.data());
      }
    }
  }
  return std::move(layers_);
}

RotatedHeldout::RotatedHeldout(const HeldoutLayer& data, std::span<const float> k_rotation,
                               std::span<const float> v_rotation, int64_t groups, const fmt::KvQuantSpec& spec)
    : data_(data),
      groups_(groups),
      k_quant_(spec.k, data.head_dim, "error report (k)"),
      v_quant_(spec.v, data.head_dim, "error report (v)") {
  const int64_t d = data.head_dim, H = data.num_kv_heads, n = data.tokens;
  if (groups != 1 && groups != H)
    throw Error("RotatedHeldout", ::fmt::format("groups {} is neither 1 nor num_kv_heads {}", groups, H));
  if (static_cast<int64_t>(k_rotation.size()) != groups * d * d || static_cast<int64_t>(v_rotation.size()) != groups * d * d)
    throw Error("RotatedHeldout", ::fmt::format("rotations must hold [{}, {}, {}] values", groups, d, d));
  yk_.resize(data.k.size());
  yv_.resize(data.v.size());
  rotated_sigma_q_.resize(static_cast<size_t>(H * d * d));
  std::vector<double> key_energy(H), value_energy(H);
  tbb::parallel_for(int64_t{0}, H, [&](int64_t h) {
    const int64_t g = groups == 1 ? 0 : h;
    const auto rk = k_rotation.subspan(g * d * d, d * d);
    const auto rv = v_rotation.subspan(g * d * d, d * d);
    for (int64_t t = 0; t < n; ++t) {
      const size_t off = static_cast<size_t>((h * n + t) * d);
      rotate(std::span<const float>(data.k).subspan(off, d), rk, std::span<float>(yk_).subspan(off, d));
      rotate(std::span<const float>(data.v).subspan(off, d), rv, std::span<float>(yv_).subspan(off, d));
    }
    // The logit error of a rotated-basis error e' is e' (Rᵀ Σ_Q R) e'ᵀ.
    RowMatrix r = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(rk.data(), d, d)
                      .cast<double>();
    Eigen::Map<const RowMatrix> s(data.sigma_q.data() + h * d * d, d, d);
    Eigen::Map<RowMatrix>(rotated_sigma_q_.data() + h * d * d, d, d) = r.transpose() * s * r;
    key_energy[h] = quadratic_energy(data.k.data() + h * n * d, n, d, data.sigma_q.data() + h * d * d);
    double ve = 0;
    for (int64_t t = 0; t < n; ++t) {
      double sq = 0;
      for (int64_t c = 0; c < d; ++c) {
        const double x = data.v[(h * n + t) * d + c];
        sq += x * x;
      }
      ve += data.value_weight[h * n + t] * sq;
    }
    value_energy[h] = ve;
  });
  for (int64_t h = 0; h < H; ++h) {
    key_energy_ += key_energy[h];
    value_energy_ += value_energy[h];
  }
}

double RotatedHeldout::key_error(float clip_ratio) const {
  const int64_t d = data_.head_dim, H = data_.num_kv_heads, n = data_.tokens;
  std::vector<double> err(H);
  tbb::parallel_for(int64_t{0}, H, [&](int64_t h) {
    const auto y = std::span<const float>(yk_).subspan(h * n * d, n * d);
    std::vector<float> q(y.size());
    k_quant_.fake_quantize(y, n, {}, clip_ratio, Basis::Rotated, q);
    // The residual in fp64: ŷ − y in fp32 would round away the small errors the metric is about.
    RowMatrix e(n, d);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t c = 0; c < d; ++c) e(t, c) = static_cast<double>(q[t * d + c]) - y[t * d + c];
    err[h] = quadratic_energy(e, rotated_sigma_q_.data() + h * d * d);
  });
  double total = 0;
  for (double x : err) total += x;
  return key_energy_ > 0 ? total / key_energy_ : 0.0;
}

double RotatedHeldout::value_error(float clip_ratio) const {
  const int64_t d = data_.head_dim, H = data_.num_kv_heads, n = data_.tokens;
  std::vector<double> err(H);
  tbb::parallel_for(int64_t{0}, H, [&](int64_t h) {
    const auto y = std::span<const float>(yv_).subspan(h * n * d, n * d);
    std::vector<float> q(y.size());
    v_quant_.fake_quantize(y, n, {}, clip_ratio, Basis::Rotated, q);
    double acc = 0;
    for (int64_t t = 0; t < n; ++t) {
      double sq = 0;
      for (int64_t c = 0; c < d; ++c) {
        const double e = static_cast<double>(q[t * d + c]) - y[t * d + c];
        sq += e * e;
      }
      acc += data_.value_weight[h * n + t] * sq;
    }
    err[h] = acc;
  });
  double total = 0;
  for (double x : err) total += x;
  return value_energy_ > 0 ? total / value_energy_ : 0.0;
}

fmt::ErrorReport build_error_report(const std::vector<HeldoutLayer>& heldout,
                                    const std::vector<CandidateRotations>& candidates, const fmt::KvQuantSpec& spec) {
  fmt::ErrorReport report;
  const int64_t L = static_cast<int64_t>(heldout.size());
  report.num_layers = L;
  for (const auto& c : candidates) {
    report.rows.push_back(c.name);
    report.rows.push_back(c.name + "+clip");
  }
  const size_t rows = report.rows.size();
  report.k_relative_error.assign(rows * L, 0.0);
  report.v_relative_error.assign(rows * L, 0.0);
  for (size_t ci = 0; ci < candidates.size(); ++ci) {
    const auto& c = candidates[ci];
    if (static_cast<int64_t>(c.k.size()) != L || static_cast<int64_t>(c.v.size()) != L)
      throw Error("build_error_report", ::fmt::format("candidate {} has rotations for {} layers, expected {}", c.name,
                                                      c.k.size(), L));
    for (int64_t l = 0; l < L; ++l) {
      RotatedHeldout r(heldout[l], c.k[l], c.v[l], c.groups, spec);
      report.k_relative_error[(2 * ci) * L + l] = r.key_error(1.0f);
      report.v_relative_error[(2 * ci) * L + l] = r.value_error(1.0f);
      report.k_relative_error[(2 * ci + 1) * L + l] = r.key_error(spec.k.clip_ratio);
      report.v_relative_error[(2 * ci + 1) * L + l] = r.value_error(spec.v.clip_ratio);
    }
  }
  return report;
}

std::string format_error_report(const fmt::ErrorReport& report) {
  std::string out = "| configuration | K rel. logit MSE (mean over layers) | V rel. output MSE (mean over layers) |\n";
  out += "|---|---|---|\n";
  const int64_t L = report.num_layers;
  for (size_t r = 0; r < report.rows.size(); ++r) {
    double k = 0, v = 0;
    for (int64_t l = 0; l < L; ++l) {
      k += report.k_relative_error[r * L + l];
      v += report.v_relative_error[r * L + l];
    }
    if (L > 0) {
      k /= static_cast<double>(L);
      v /= static_cast<double>(L);
    }
    out += ::fmt::format("| {} | {:.5f} | {:.5f} |\n", report.rows[r], k, v);
  }
  return out;
}

}  // namespace oscar::calib
