#include "lib/calib/ef_calibration.h"

#include <Eigen/Dense>
#include <fmt/format.h>
#include <tbb/parallel_for.h>

#include <cmath>
#include <complex>

#include "formats/error.h"
#include "formats/safetensors.h"
#include "lib/calib/error_feedback.h"
#include "lib/calib/kv_transform.h"
#include "lib/model/cpu_model.h"

namespace oscar::calib {

std::string_view error_feedback_mode_name(ErrorFeedbackMode m) {
  switch (m) {
    case ErrorFeedbackMode::Off: return "off";
    case ErrorFeedbackMode::K: return "k";
    case ErrorFeedbackMode::KV: return "kv";
  }
  return "?";
}

ErrorFeedbackMode parse_error_feedback_mode(std::string_view name, const std::string& where) {
  for (ErrorFeedbackMode m : {ErrorFeedbackMode::Off, ErrorFeedbackMode::K, ErrorFeedbackMode::KV})
    if (error_feedback_mode_name(m) == name) return m;
  throw Error(where, ::fmt::format("unknown error-feedback mode '{}' (off, k, kv)", name));
}

std::vector<double> value_output_metric(std::span<const float> o_proj, int64_t hidden, int64_t num_heads,
                                        int64_t num_kv_heads, int64_t d, const std::string& where) {
  const int64_t cols = num_heads * d;
  if (hidden <= 0 || num_heads <= 0 || num_kv_heads <= 0 || num_heads % num_kv_heads != 0 ||
      static_cast<int64_t>(o_proj.size()) != hidden * cols)
    throw Error(where, ::fmt::format("o_proj has {} values, expected [{}, {} heads x {}] with {} KV heads",
                                     o_proj.size(), hidden, num_heads, d, num_kv_heads));
  using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Map<const RowMatF> w(o_proj.data(), hidden, cols);
  const int64_t group = num_heads / num_kv_heads;
  std::vector<double> out;
  out.reserve(static_cast<size_t>(num_kv_heads * d * d));
  for (int64_t h = 0; h < num_kv_heads; ++h) {
    RowMatD s = RowMatD::Zero(d, d);
    // Heads in order: the sum is deterministic.
    for (int64_t g = h * group; g < (h + 1) * group; ++g) {
      const Eigen::MatrixXd wg = w.block(0, g * d, hidden, d).cast<double>();
      s += wg.transpose() * wg;
    }
    out.insert(out.end(), s.data(), s.data() + d * d);
  }
  return out;
}

std::vector<std::vector<double>> value_output_metrics(const fmt::TensorStore& weights, const fmt::ModelConfig& cfg) {
  std::vector<std::vector<double>> out;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const std::string name = ::fmt::format("model.layers.{}.self_attn.o_proj.weight", l);
    const std::vector<float> w = fmt::to_f32(weights.get(name));
    out.push_back(value_output_metric(w, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, name));
  }
  return out;
}

namespace {

// S_T(ω) = (1/T) Σ_{t<T} e^{iωt}, summed in closed form (a geometric series) where ω is not a multiple of 2π.
std::complex<double> position_average(double omega, int64_t positions) {
  const double half = 0.5 * omega, tn = static_cast<double>(positions);
  const double den = std::sin(half);
  if (std::abs(den) < 1e-12) return {1.0, 0.0};
  const double mag = std::sin(half * tn) / (tn * den);
  return std::polar(mag, half * (tn - 1.0));
}

}  // namespace

std::vector<std::vector<double>> key_metrics_for_context(const std::vector<std::vector<double>>& metrics,
                                                         std::span<const float> inv_freq, int64_t d,
                                                         int64_t calibration_positions, int64_t serving_positions) {
  if (d <= 0 || d % 2 != 0 || static_cast<int64_t>(inv_freq.size()) != d / 2)
    throw Error("--ef-context", ::fmt::format("{} RoPE frequencies for head_dim {} (expected head_dim / 2)",
                                              inv_freq.size(), d));
  if (calibration_positions <= 0 || serving_positions <= 0)
    throw Error("--ef-context", ::fmt::format("positions {} -> {} must be > 0", calibration_positions, serving_positions));
  if (calibration_positions == serving_positions) return metrics;
  constexpr double kLost = 0.1;
  const int64_t h = d / 2;
  const auto factor = [&](double omega) -> std::complex<double> {
    const std::complex<double> from = position_average(omega, calibration_positions);
    if (std::abs(from) < kLost) return {0.0, 0.0};
    return position_average(omega, serving_positions) / from;
  };
  // The factors depend only on the pair (a, b), not on the layer or head: once per pair.
  std::vector<std::complex<double>> rot_factor(static_cast<size_t>(h * h)), refl_factor(rot_factor.size());
  for (int64_t a = 0; a < h; ++a)
    for (int64_t b = 0; b < h; ++b) {
      const double ta = inv_freq[static_cast<size_t>(a)], tb = inv_freq[static_cast<size_t>(b)];
      // rotation-like part (c + i s) turns by θ_a − θ_b per position, reflection-like (f + i g) by θ_a + θ_b
      rot_factor[static_cast<size_t>(a * h + b)] = factor(ta - tb);
      refl_factor[static_cast<size_t>(a * h + b)] = factor(ta + tb);
    }
  std::vector<std::vector<double>> out;
  out.reserve(metrics.size());
  for (size_t l = 0; l < metrics.size(); ++l) {
    const std::vector<double>& m = metrics[l];
    if (m.empty() || m.size() % static_cast<size_t>(d * d) != 0)
      throw Error("--ef-context", ::fmt::format("layer {}: a key metric of {} values is not [heads, {}, {}]", l,
                                                m.size(), d, d));
    std::vector<double> r(m.size());
    const int64_t heads = static_cast<int64_t>(m.size()) / (d * d);
    for (int64_t head = 0; head < heads; ++head) {
      const double* src = m.data() + head * d * d;
      double* dst = r.data() + head * d * d;
      for (int64_t a = 0; a < h; ++a)
        for (int64_t b = 0; b < h; ++b) {
          const double b11 = src[a * d + b], b12 = src[a * d + b + h], b21 = src[(a + h) * d + b],
                       b22 = src[(a + h) * d + b + h];
          const auto ab = static_cast<size_t>(a * h + b);
          const std::complex<double> zc = std::complex<double>(0.5 * (b11 + b22), 0.5 * (b21 - b12)) * rot_factor[ab];
          const std::complex<double> zf = std::complex<double>(0.5 * (b11 - b22), 0.5 * (b12 + b21)) * refl_factor[ab];
          dst[a * d + b] = zc.real() + zf.real();
          dst[(a + h) * d + b + h] = zc.real() - zf.real();
          dst[a * d + b + h] = zf.imag() - zc.imag();
          dst[(a + h) * d + b] = zc.imag() + zf.imag();
        }
      // The carried metric is a second moment only as far as Σ̃ is position-independent; where it is not, parts with
      // |S_T| just above the cut can be amplified into a matrix that is not positive semi-definite (seen when the
      // serving range is shorter than the calibration one). Its negative eigenvalues are set to zero, so the table's
      // factorization always succeeds; a PSD result keeps its bits.
      using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
      Eigen::Map<RowMatD> carried(dst, d, d);
      const Eigen::SelfAdjointEigenSolver<RowMatD> eig(carried);
      if (eig.info() == Eigen::Success && eig.eigenvalues().minCoeff() < 0.0)
        carried = eig.eigenvectors() * eig.eigenvalues().cwiseMax(0.0).asDiagonal() * eig.eigenvectors().transpose();
    }
    out.push_back(std::move(r));
  }
  return out;
}

fmt::Bundle bundle_for_context(const fmt::Bundle& bundle, const fmt::ModelConfig& cfg, int64_t context) {
  fmt::Bundle out = bundle;
  retarget_key_tables(out, model::rope_inv_freq(cfg), context);
  return out;
}

int64_t error_feedback_context(const fmt::Bundle& bundle) {
  if (!fmt::has_error_feedback(bundle)) return 0;
  if (bundle.ef_key_context > 0) return bundle.ef_key_context;
  for (const auto& [key, value] : bundle.calibration.options)
    if (key == "ef_context") {
      try {
        const int64_t n = std::stoll(value);
        if (n > 0) return n;
      } catch (const std::exception&) {
      }
      throw Error("error_feedback_context", ::fmt::format("provenance option ef_context '{}' is not a positive count",
                                                          value));
    }
  return bundle.calibration.seq_len;
}

bool whole_head_int2(const fmt::Bundle& bundle, size_t layer, bool keys) {
  const fmt::KvQuantSpec spec = fmt::layer_spec(bundle, layer);
  return (keys ? spec.k : spec.v).whole_head_int2(bundle.quant.head_dim);
}

namespace {

// One (layer, tensor)'s tables from its metric [num_kv_heads, d, d] in the original basis: per KV head, the metric
// moved into the rotation's storage basis, factorized (error_feedback_table) and stored.
void fill_tensor_tables(fmt::Bundle& b, int64_t l, bool keys, const std::vector<double>& metric,
                        const ErrorFeedbackOptions& eo) {
  const int64_t d = b.quant.head_dim, hkv = b.model.num_kv_heads;
  fmt::LayerCalibration& layer = b.layers[static_cast<size_t>(l)];
  const std::vector<float>& rot = keys ? layer.k_rotation : layer.v_rotation;
  std::vector<int32_t>& order = keys ? layer.k_ef_order : layer.v_ef_order;
  std::vector<float>& weights = keys ? layer.k_ef_weights : layer.v_ef_weights;
  order.assign(static_cast<size_t>(hkv * d), 0);
  weights.assign(static_cast<size_t>(hkv * d * d), 0.0f);
  const bool transformed = has_transform(layer, keys);
  for (int64_t h = 0; h < hkv; ++h) {
    const int64_t g = b.rotation_groups == 1 ? 0 : h;
    const std::string where = ::fmt::format("layer {} KV head {} {} error-feedback metric", l, h, keys ? "K" : "V");
    const auto head_metric =
        std::span<const double>(metric).subspan(static_cast<size_t>(h * d * d), static_cast<size_t>(d * d));
    // The table lives in the storage basis: Rᵀ M R for a rotation, A⁻¹ M A⁻ᵀ for a storage transform (format 2.0).
    const ErrorFeedbackTable t = error_feedback_table(
        transformed ? metric_in_transform_basis(head_metric, stored_transform(layer, keys, h, d, where))
                    : metric_in_basis(head_metric,
                                      std::vector<double>(rot.begin() + g * d * d, rot.begin() + (g + 1) * d * d), d),
        d, eo, where);
    stored_error_feedback(t, std::span<int32_t>(order).subspan(static_cast<size_t>(h * d), static_cast<size_t>(d)),
                          std::span<float>(weights).subspan(static_cast<size_t>(h * d * d), static_cast<size_t>(d * d)));
  }
}

ErrorFeedbackOptions table_options(double damp, bool clip_feedback) {
  ErrorFeedbackOptions eo;
  eo.damp = damp;
  eo.act_order = true;
  eo.feedback_clip_error = clip_feedback;
  return eo;
}

}  // namespace

int64_t add_error_feedback_tables(fmt::Bundle& b, const std::vector<std::vector<double>>& key_metrics,
                                  const ErrorFeedbackCalibration& opt) {
  if (opt.mode == ErrorFeedbackMode::Off) return 0;
  const int64_t d = b.quant.head_dim, hkv = b.model.num_kv_heads, L = static_cast<int64_t>(b.layers.size());
  const bool values = opt.mode == ErrorFeedbackMode::KV;
  const auto check_metrics = [&](const std::vector<std::vector<double>>& m, const char* what) {
    if (static_cast<int64_t>(m.size()) != L)
      throw Error("--error-feedback", ::fmt::format("{} metrics for {} layers, the bundle has {}", what, m.size(), L));
    for (const auto& x : m)
      if (static_cast<int64_t>(x.size()) != hkv * d * d)
        throw Error("--error-feedback", ::fmt::format("a {} metric holds {} values, expected [{}, {}, {}]", what,
                                                      x.size(), hkv, d, d));
  };
  check_metrics(key_metrics, "key");
  if (values) check_metrics(opt.value_metrics, "value");
  const ErrorFeedbackOptions eo = table_options(opt.damp, opt.clip_feedback);
  int64_t tables = 0;
  for (int64_t l = 0; l < L; ++l)
    for (const bool keys : {true, false}) {
      if (!keys && !values) continue;
      if (!whole_head_int2(b, static_cast<size_t>(l), keys)) continue;
      fill_tensor_tables(b, l, keys, (keys ? key_metrics : opt.value_metrics)[static_cast<size_t>(l)], eo);
      ++tables;
    }
  b.ef_clip_feedback = opt.clip_feedback;
  return tables;
}

void symmetrize_metric(std::vector<double>& metric, int64_t d) {
  if (d <= 0 || metric.size() % static_cast<size_t>(d * d) != 0)
    throw Error("symmetrize_metric", ::fmt::format("{} values are not [heads, {}, {}]", metric.size(), d, d));
  const int64_t heads = static_cast<int64_t>(metric.size()) / (d * d);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < i; ++j) {
        double& a = metric[static_cast<size_t>((h * d + i) * d + j)];
        double& c = metric[static_cast<size_t>((h * d + j) * d + i)];
        if (a != c) a = c = 0.5 * (a + c);
      }
}

void store_key_metrics(fmt::Bundle& b, const std::vector<std::vector<double>>& collected, int64_t positions,
                       int64_t key_context, double damp) {
  if (static_cast<int64_t>(collected.size()) != static_cast<int64_t>(b.layers.size()))
    throw Error("--error-feedback", ::fmt::format("{} key metrics for {} layers", collected.size(), b.layers.size()));
  if (positions <= 0 || key_context <= 0)
    throw Error("--error-feedback", ::fmt::format("positions {} / key context {} must be > 0", positions, key_context));
  bool any = false;
  for (size_t l = 0; l < b.layers.size(); ++l) {
    fmt::LayerCalibration& layer = b.layers[l];
    if (layer.k_ef_order.empty()) {
      layer.k_ef_metric.clear();
      continue;
    }
    const int64_t d = b.quant.head_dim, heads = b.model.num_kv_heads;
    const std::vector<double>& m = collected[l];
    if (static_cast<int64_t>(m.size()) != heads * d * d)
      throw Error("--error-feedback", ::fmt::format("layer {}: a key metric of {} values is not [{}, {}, {}]", l,
                                                    m.size(), heads, d, d));
    layer.k_ef_metric = m;
    symmetrize_metric(layer.k_ef_metric, d);
    any = true;
  }
  if (!any) return;
  b.ef_damp = damp;
  b.ef_metric_positions = positions;
  b.ef_key_context = key_context;
}

void require_key_metric(const fmt::Bundle& b, const std::string& where) {
  if (fmt::has_key_metric(b)) return;
  throw Error(where, fmt::has_error_feedback(b)
                         ? "the bundle stores no key metric (format 1.2 or calibrate --no-ef-key-metric), so its key "
                           "tables cannot be rebuilt for another context: recalibrate with --ef-context"
                         : "the bundle has no error-feedback tables");
}

int64_t retarget_key_tables(fmt::Bundle& b, std::span<const float> inv_freq, int64_t context) {
  if (context <= 0) throw Error("--ef-context", ::fmt::format("{} positions: must be > 0", context));
  require_key_metric(b, "--ef-context");
  if (context == b.ef_key_context) return 0;
  const int64_t d = b.quant.head_dim;
  std::vector<std::vector<double>> metrics;
  std::vector<int64_t> layers;
  for (size_t l = 0; l < b.layers.size(); ++l)
    if (!b.layers[l].k_ef_metric.empty()) {
      metrics.push_back(b.layers[l].k_ef_metric);
      layers.push_back(static_cast<int64_t>(l));
    }
  const std::vector<std::vector<double>> carried =
      key_metrics_for_context(metrics, inv_freq, d, b.ef_metric_positions, context);
  const ErrorFeedbackOptions eo = table_options(b.ef_damp, b.ef_clip_feedback);
  for (size_t i = 0; i < layers.size(); ++i) fill_tensor_tables(b, layers[i], true, carried[i], eo);
  b.ef_key_context = context;
  return static_cast<int64_t>(layers.size());
}

namespace {

// At most this many held-out samples per (layer, KV head) are scored, evenly strided: the EF loop is O(d²) per
// sample, and an 8B model's 16384 samples x 8 heads x 36 layers x K,V would cost minutes for a summary number.
constexpr int64_t kHeldoutScoreSamples = 2048;

// Σ_h Σ_t w_t eᵀ M_h e and Σ_h Σ_t w_t yᵀ M_h y of one tensor, RTN and EF, in the storage basis.
struct TensorErrors {
  double rtn = 0, ef = 0, energy = 0;
};

TensorErrors tensor_errors(const fmt::Bundle& b, const HeldoutLayer& data, size_t layer, bool keys,
                           const std::vector<double>& metric_original, std::span<const double> weights_per_token) {
  const int64_t d = data.head_dim, H = data.num_kv_heads, n = data.tokens;
  const fmt::LayerCalibration& lc = b.layers[layer];
  const std::vector<float>& rot = keys ? lc.k_rotation : lc.v_rotation;
  const std::vector<int32_t>& order = keys ? lc.k_ef_order : lc.v_ef_order;
  const std::vector<float>& table = keys ? lc.k_ef_weights : lc.v_ef_weights;
  const float clip = keys ? lc.k_clip_ratio : lc.v_clip_ratio;
  const std::vector<float>& x = keys ? data.k : data.v;
  TensorErrors out;
  const int64_t stride = (n + kHeldoutScoreSamples - 1) / kHeldoutScoreSamples, samples = (n + stride - 1) / stride;
  std::vector<float> y(static_cast<size_t>(d)), clipped(static_cast<size_t>(d));
  std::vector<uint8_t> codes(static_cast<size_t>(d));
  // Per KV head, the sampled rows in the storage basis: RTN error, EF error, the vector itself, and its weight.
  std::vector<double> e_rtn(static_cast<size_t>(samples * d)), e_ef(e_rtn.size()), yd(e_rtn.size());
  std::vector<double> w(weights_per_token.empty() ? 0 : static_cast<size_t>(samples));
  const bool transformed = has_transform(lc, keys);
  std::vector<float> centered(static_cast<size_t>(d)), y_energy(static_cast<size_t>(d));
  for (int64_t h = 0; h < H; ++h) {
    const int64_t g = b.rotation_groups == 1 ? 0 : h;
    // The storage basis: y = x·R, or y = (x − μ)·A with a transform (format 2.0). The energy is the tensor's own,
    // x M xᵀ, which for a transform is (x·A) H_y (x·A)ᵀ: uncentered, so both bases score against the same energy.
    // The writers' fp32 A and μ as stored (views); the metric's change of basis wants them in fp64.
    const HeadTransformView tf =
        transformed ? stored_transform_view(lc, keys, h, d, "held-out EF score") : HeadTransformView{};
    const std::span<const float> r = transformed ? tf.forward
                                                 : std::span<const float>(rot.data() + g * d * d, static_cast<size_t>(d * d));
    const auto head_metric =
        std::span<const double>(metric_original).subspan(static_cast<size_t>(h * d * d), static_cast<size_t>(d * d));
    const std::vector<double> m =
        transformed ? metric_in_transform_basis(head_metric, stored_transform(lc, keys, h, d, "held-out EF score"))
                    : metric_in_basis(head_metric, std::vector<double>(r.begin(), r.end()), d);
    const HeadTable ht = head_table(order, table, h, d);
    // x·A = (x − μ)·A + μ·A: the uncentered energy row from the stored one plus μ·A, made once per head (keys; values
    // have no mean).
    std::vector<float> mean_in_basis(static_cast<size_t>(d), 0.0f);
    if (!tf.mean.empty()) rotate(tf.mean, r, mean_in_basis);
    for (int64_t i = 0; i < samples; ++i) {
      const int64_t t = i * stride;
      const auto xs = std::span<const float>(x).subspan(static_cast<size_t>((h * n + t) * d), static_cast<size_t>(d));
      if (transformed) {
        for (int64_t c = 0; c < d; ++c) centered[c] = tf.mean.empty() ? xs[c] : xs[c] - tf.mean[c];
        rotate(centered, r, y);
        for (int64_t c = 0; c < d; ++c) y_energy[c] = y[c] + mean_in_basis[c];
      } else {
        rotate(xs, r, y);
      }
      clipped = y;
      clip_in_place(clipped, clip);
      const IntParams p = int_params(clipped, 2);
      int_codes(clipped, 2, p, codes);
      const auto row = static_cast<size_t>(i * d);
      for (int64_t c = 0; c < d; ++c) e_rtn[row + c] = static_cast<double>(int_dequant(codes[c], p)) - y[c];
      error_feedback_codes_stored(y, clip, 2, ht.order, ht.weights, b.ef_clip_feedback, codes);
      for (int64_t c = 0; c < d; ++c) {
        e_ef[row + c] = static_cast<double>(int_dequant(codes[c], p)) - y[c];
        yd[row + c] = transformed ? y_energy[c] : y[c];
      }
      if (!w.empty()) w[static_cast<size_t>(i)] = weights_per_token[static_cast<size_t>(h * n + t)];
    }
    out.rtn += quadratic_energy(e_rtn, d, m.data(), w);
    out.ef += quadratic_energy(e_ef, d, m.data(), w);
    out.energy += quadratic_energy(yd, d, m.data(), w);
  }
  return out;
}

}  // namespace

ErrorFeedbackHeldout error_feedback_heldout_error(const fmt::Bundle& b, const std::vector<HeldoutLayer>& heldout,
                                                  const std::vector<std::vector<double>>& value_metrics) {
  if (heldout.size() != b.layers.size())
    throw Error("error_feedback_heldout_error",
                ::fmt::format("{} held-out layers for a bundle of {}", heldout.size(), b.layers.size()));
  // Layers in parallel, each tensor's sums kept apart and added in layer order: the same result on any core count.
  const size_t L = b.layers.size();
  std::vector<TensorErrors> k(L), v(L);
  std::vector<uint8_t> k_scored(L, 0), v_scored(L, 0);
  tbb::parallel_for(size_t{0}, L, [&](size_t l) {
    const HeldoutLayer& data = heldout[l];
    if (!b.layers[l].k_ef_order.empty() && data.tokens > 0) {
      k[l] = tensor_errors(b, data, l, true, data.sigma_q, {});
      k_scored[l] = 1;
    }
    if (!b.layers[l].v_ef_order.empty() && data.tokens > 0 && l < value_metrics.size()) {
      v[l] = tensor_errors(b, data, l, false, value_metrics[l], data.value_weight);
      v_scored[l] = 1;
    }
  });
  ErrorFeedbackHeldout r;
  for (size_t l = 0; l < L; ++l) {
    if (k_scored[l] && k[l].energy > 0) {
      r.k_rtn += k[l].rtn / k[l].energy;
      r.k_ef += k[l].ef / k[l].energy;
      ++r.k_layers;
    }
    if (v_scored[l] && v[l].energy > 0) {
      r.v_rtn += v[l].rtn / v[l].energy;
      r.v_ef += v[l].ef / v[l].energy;
      ++r.v_layers;
    }
  }
  if (r.k_layers > 0) r.k_rtn /= static_cast<double>(r.k_layers), r.k_ef /= static_cast<double>(r.k_layers);
  if (r.v_layers > 0) r.v_rtn /= static_cast<double>(r.v_layers), r.v_ef /= static_cast<double>(r.v_layers);
  return r;
}

}  // namespace oscar::calib
