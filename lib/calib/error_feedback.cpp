#include "lib/calib/error_feedback.h"

#include <Eigen/Dense>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "formats/dtype.h"
#include "formats/error.h"
#include "formats/kv_layout.h"

namespace oscar::calib {
namespace {

using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

}  // namespace

bool ErrorFeedbackTable::diagonal() const {
  for (int64_t k = 0; k < dim; ++k)
    for (int64_t m = k + 1; m < dim; ++m)
      if (u[static_cast<size_t>(k * dim + m)] != 0.0) return false;
  return true;
}

ErrorFeedbackTable error_feedback_table(std::span<const double> metric, int64_t d, const ErrorFeedbackOptions& options,
                                        const std::string& where) {
  if (d <= 0 || static_cast<int64_t>(metric.size()) != d * d)
    throw Error(where, ::fmt::format("metric has {} values, expected {}x{}", metric.size(), d, d));
  for (double v : metric)
    if (!std::isfinite(v)) throw Error(where, "metric is not finite");
  if (!(options.damp >= 0.0)) throw Error(where, ::fmt::format("damp {} must be >= 0", options.damp));
  RowMatD h = Eigen::Map<const RowMatD>(metric.data(), d, d);
  h = 0.5 * (h + h.transpose()).eval();
  const double mean_diag = h.diagonal().mean();
  if (!(mean_diag > 0.0)) throw Error(where, ::fmt::format("metric has diagonal mean {} (must be > 0)", mean_diag));
  h.diagonal().array() += options.damp * mean_diag;

  ErrorFeedbackTable t;
  t.dim = d;
  t.feedback_clip_error = options.feedback_clip_error;
  if (options.refit_iters < 0) throw Error(where, ::fmt::format("refit_iters {} must be >= 0", options.refit_iters));
  t.refit_iters = options.refit_iters;
  t.refit_reround = options.refit_reround;
  if (!options.token_clips.empty() && !options.feedback_clip_error)
    throw Error(where, "a per-token clip search needs clip feedback (the candidates' targets differ otherwise)");
  for (float c : options.token_clips)
    if (!(c > 0.f && c <= 1.f)) throw Error(where, ::fmt::format("token clip {} is not in (0, 1]", c));
  t.token_clips = options.token_clips;
  if (t.refit_iters > 0) t.metric.assign(h.data(), h.data() + d * d);
  t.order.resize(static_cast<size_t>(d));
  std::iota(t.order.begin(), t.order.end(), 0);
  if (options.act_order)
    // stable: equal diagonals (e.g. a scaled identity) keep the natural order, so a diagonal M stays plain RTN order
    std::stable_sort(t.order.begin(), t.order.end(), [&](int32_t a, int32_t b) { return h(a, a) > h(b, b); });
  RowMatD hp(d, d);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) hp(i, j) = h(t.order[i], t.order[j]);

  const Eigen::LLT<RowMatD> llt_h(hp);
  if (llt_h.info() != Eigen::Success)
    throw Error(where, "metric + damping is not positive definite (raise the damping)");
  const RowMatD hinv = llt_h.solve(RowMatD::Identity(d, d));
  const Eigen::LLT<RowMatD> llt_inv(0.5 * (hinv + hinv.transpose()));
  if (llt_inv.info() != Eigen::Success) throw Error(where, "Cholesky factorization of H^-1 failed");
  const RowMatD u = llt_inv.matrixU();  // H⁻¹ = UᵀU, U upper
  t.u.assign(static_cast<size_t>(d * d), 0.0);
  for (int64_t k = 0; k < d; ++k)
    for (int64_t m = k; m < d; ++m) t.u[static_cast<size_t>(k * d + m)] = u(k, m);
  return t;
}

std::vector<double> metric_in_basis(std::span<const double> metric, std::span<const double> rotation, int64_t d) {
  if (static_cast<int64_t>(metric.size()) != d * d)
    throw Error("metric_in_basis", ::fmt::format("metric has {} values, expected {}x{}", metric.size(), d, d));
  if (rotation.empty()) return std::vector<double>(metric.begin(), metric.end());
  if (static_cast<int64_t>(rotation.size()) != d * d)
    throw Error("metric_in_basis", ::fmt::format("rotation has {} values, expected {}x{}", rotation.size(), d, d));
  const Eigen::Map<const RowMatD> m(metric.data(), d, d), r(rotation.data(), d, d);
  const RowMatD out = r.transpose() * m * r;
  return std::vector<double>(out.data(), out.data() + d * d);
}

namespace {

// One rounding pass with fixed params p: the running target starts at `target` and every rounded coordinate feeds
// its error forward through U.
// Returns Σ_k (fed-back error of step k / U_kk)²: the error in H against `target` (see token_clips).
double feedback_round(std::span<const float> target, IntParams p, int32_t bits, const ErrorFeedbackTable& table,
                      std::span<uint8_t> codes) {
  double loss = 0;
  const int64_t d = table.dim;
  // Feedback runs in double: the running target accumulates up to d corrections.
  std::vector<double> w(target.begin(), target.end());
  for (int64_t k = 0; k < d; ++k) {
    const int32_t i = table.order[static_cast<size_t>(k)];
    // The element rounds with the reference quantizer's own arithmetic (fp32 rint, clamp), so with no feedback the
    // code is bit-identical to RTN.
    const float wi = static_cast<float>(w[i]);
    int_codes(std::span<const float>(&wi, 1), bits, p, codes.subspan(static_cast<size_t>(i), 1));
    const double* urow = table.u.data() + k * d;
    const double err = (w[i] - static_cast<double>(int_dequant(codes[i], p))) / urow[k];
    loss += err * err;
    for (int64_t m = k + 1; m < d; ++m) {
      const double c = urow[m];
      if (c != 0.0) w[table.order[static_cast<size_t>(m)]] -= err * c;
    }
  }
  return loss;
}

// (y - x̂)ᵀ H (y - x̂) of codes under p.
double metric_error(std::span<const float> y, std::span<const uint8_t> codes, IntParams p, const ErrorFeedbackTable& t) {
  const int64_t d = t.dim;
  std::vector<double> e(static_cast<size_t>(d));
  for (int64_t i = 0; i < d; ++i) e[i] = static_cast<double>(y[i]) - int_dequant(codes[i], p);
  double total = 0;
  for (int64_t i = 0; i < d; ++i) {
    double row = 0;
    for (int64_t j = 0; j < d; ++j) row += t.metric[static_cast<size_t>(i * d + j)] * e[j];
    total += e[i] * row;
  }
  return total;
}

// Least-squares (scale, zero) of fixed codes in H: minimize (y - s·c - z·1)ᵀ H (y - s·c - z·1). False when the
// codes do not determine them (all equal) or the fit is degenerate (s <= 0).
bool refit_params(std::span<const float> y, std::span<const uint8_t> codes, const ErrorFeedbackTable& t, IntParams& p) {
  const int64_t d = t.dim;
  double a11 = 0, a12 = 0, a22 = 0, b1 = 0, b2 = 0;
  for (int64_t i = 0; i < d; ++i) {
    double hc = 0, h1 = 0;
    for (int64_t j = 0; j < d; ++j) {
      const double h = t.metric[static_cast<size_t>(i * d + j)];
      hc += h * codes[j];
      h1 += h;
    }
    a11 += codes[i] * hc;
    a12 += codes[i] * h1;
    a22 += h1;
    b1 += y[i] * hc;
    b2 += y[i] * h1;
  }
  const double det = a11 * a22 - a12 * a12;
  if (!(det > 1e-12 * std::max(a11 * a22, 1e-300))) return false;
  const double s = (b1 * a22 - b2 * a12) / det, z = (a11 * b2 - a12 * b1) / det;
  if (!(s > 0) || !std::isfinite(z)) return false;
  p.scale_f16 = fmt::f32_to_f16(static_cast<float>(s));
  p.zero_f16 = fmt::f32_to_f16(static_cast<float>(z));
  return p.scale() > 0.f && std::isfinite(p.scale()) && std::isfinite(p.zero());
}

}  // namespace

IntParams error_feedback_codes(std::span<const float> y, float clip_ratio, int32_t bits,
                               const ErrorFeedbackTable& table, std::span<uint8_t> codes) {
  const int64_t d = table.dim;
  if (static_cast<int64_t>(y.size()) != d || static_cast<int64_t>(codes.size()) != d)
    throw Error("error_feedback_codes", ::fmt::format("vector has {} values, table is for head_dim {}", y.size(), d));
  std::vector<float> clipped(y.begin(), y.end());
  clip_in_place(clipped, clip_ratio);
  IntParams p = int_params(clipped, bits);
  const std::span<const float> target = table.feedback_clip_error ? y : std::span<const float>(clipped);
  double loss = feedback_round(target, p, bits, table, codes);
  if (!table.token_clips.empty()) {
    std::vector<uint8_t> trial(static_cast<size_t>(d));
    std::vector<float> c2(y.size());
    for (float c : table.token_clips) {
      std::copy(y.begin(), y.end(), c2.begin());
      clip_in_place(c2, c);
      const IntParams q = int_params(c2, bits);
      const double l = feedback_round(target, q, bits, table, trial);
      if (l < loss) {
        loss = l;
        p = q;
        std::copy(trial.begin(), trial.end(), codes.begin());
      }
    }
  }
  if (table.refit_iters == 0) return p;
  double best = metric_error(y, codes, p, table);
  std::vector<uint8_t> trial(static_cast<size_t>(d));
  IntParams q = p;
  for (int it = 0; it < table.refit_iters; ++it) {
    if (!refit_params(y, codes, table, q)) break;
    if (table.refit_reround)
      feedback_round(target, q, bits, table, trial);
    else
      std::copy(codes.begin(), codes.end(), trial.begin());
    const double err = metric_error(y, trial, q, table);
    if (!(err < best)) break;
    best = err;
    p = q;
    std::copy(trial.begin(), trial.end(), codes.begin());
  }
  return p;
}

namespace {

// Rotate each row, choose its codes with `codes_of` (y, codes) -> params, dequantize, rotate back.
template <class CodesOf>
void fake_quantize_rows(std::span<const float> x, int64_t rows, size_t d, std::span<const float> rotation,
                        std::span<float> out, const char* where, CodesOf&& codes_of) {
  if (x.size() != static_cast<size_t>(rows) * d || out.size() != x.size())
    throw Error(where, ::fmt::format("expected {} x {} values", rows, d));
  std::vector<float> row(d), y(d), deq(d);
  std::vector<uint8_t> codes(d);
  for (int64_t r = 0; r < rows; ++r) {
    std::copy_n(x.begin() + static_cast<std::ptrdiff_t>(r * d), d, row.begin());  // x and out may alias
    rotate(row, rotation, y);
    const IntParams p = codes_of(std::span<const float>(y), std::span<uint8_t>(codes));
    for (size_t i = 0; i < d; ++i) deq[i] = int_dequant(codes[i], p);
    unrotate(deq, rotation, out.subspan(static_cast<size_t>(r) * d, d));
  }
}

}  // namespace

void error_feedback_fake_quantize(std::span<const float> x, int64_t rows, std::span<const float> rotation,
                                  float clip_ratio, int32_t bits, const ErrorFeedbackTable& table,
                                  std::span<float> out) {
  fake_quantize_rows(x, rows, static_cast<size_t>(table.dim), rotation, out, "error_feedback_fake_quantize",
                     [&](std::span<const float> y, std::span<uint8_t> codes) {
                       return error_feedback_codes(y, clip_ratio, bits, table, codes);
                     });
}

void error_feedback_fake_quantize_stored(std::span<const float> x, int64_t rows, std::span<const float> rotation,
                                         float clip_ratio, int32_t bits, std::span<const int32_t> order,
                                         std::span<const float> weights, bool clip_feedback, std::span<float> out) {
  fake_quantize_rows(x, rows, order.size(), rotation, out, "error_feedback_fake_quantize_stored",
                     [&](std::span<const float> y, std::span<uint8_t> codes) {
                       return error_feedback_codes_stored(y, clip_ratio, bits, order, weights, clip_feedback, codes);
                     });
}

void stored_error_feedback(const ErrorFeedbackTable& table, std::span<int32_t> order, std::span<float> weights) {
  const int64_t d = table.dim;
  if (static_cast<int64_t>(order.size()) != d || static_cast<int64_t>(weights.size()) != d * d)
    throw Error("stored_error_feedback", ::fmt::format("outputs hold {} / {} values, expected {} / {}", order.size(),
                                                       weights.size(), d, d * d));
  std::copy(table.order.begin(), table.order.end(), order.begin());
  std::fill(weights.begin(), weights.end(), 0.f);
  for (int64_t k = 0; k < d; ++k) {
    const double diag = table.u[static_cast<size_t>(k * d + k)];
    for (int64_t m = k + 1; m < d; ++m)
      weights[static_cast<size_t>(k * d + m)] = static_cast<float>(table.u[static_cast<size_t>(k * d + m)] / diag);
  }
}

IntParams error_feedback_codes_stored(std::span<const float> y, float clip_ratio, int32_t bits,
                                      std::span<const int32_t> order, std::span<const float> weights,
                                      bool clip_feedback, std::span<uint8_t> codes) {
  const auto d = static_cast<int64_t>(y.size());
  if (static_cast<int64_t>(order.size()) != d || static_cast<int64_t>(weights.size()) != d * d ||
      static_cast<int64_t>(codes.size()) != d)
    throw Error("error_feedback_codes_stored",
                ::fmt::format("vector of {} values, order of {}, weights of {}, codes of {}", d, order.size(),
                              weights.size(), codes.size()));
  std::vector<float> clipped(y.begin(), y.end());
  clip_in_place(clipped, clip_ratio);
  const IntParams p = int_params(clipped, bits);
  std::vector<float> w = clip_feedback ? std::vector<float>(y.begin(), y.end()) : clipped;
  for (int64_t k = 0; k < d; ++k) {
    const int32_t i = order[static_cast<size_t>(k)];
    if (i < 0 || i >= d) throw Error("error_feedback_codes_stored", ::fmt::format("order[{}] = {} is not in [0, {})", k, i, d));
    int_codes(std::span<const float>(&w[static_cast<size_t>(i)], 1), bits, p, codes.subspan(static_cast<size_t>(i), 1));
    const float e = w[static_cast<size_t>(i)] - int_dequant(codes[static_cast<size_t>(i)], p);
    const float* row = weights.data() + k * d;
    for (int64_t m = k + 1; m < d; ++m) {
      float& target = w[static_cast<size_t>(order[static_cast<size_t>(m)])];
      target = std::fmaf(-e, row[m], target);
    }
  }
  return p;
}

void error_feedback_encode_record(std::span<const float> x, std::span<const float> rotation, float clip_ratio,
                                  int32_t bits, std::span<const int32_t> order, std::span<const float> weights,
                                  bool clip_feedback, std::span<uint8_t> record) {
  const auto d = static_cast<int32_t>(x.size());
  const auto code_bytes = static_cast<size_t>(fmt::packed_bytes(d, bits));
  if (record.size() != code_bytes + 4)
    throw Error("error_feedback_encode_record",
                ::fmt::format("record of {} bytes, a whole-head {}-bit record of {} values has {}", record.size(), bits,
                              d, code_bytes + 4));
  std::vector<float> y(x.size());
  rotate(x, rotation, y);
  std::vector<uint8_t> codes(x.size());
  const IntParams p = error_feedback_codes_stored(y, clip_ratio, bits, order, weights, clip_feedback, codes);
  pack_codes(codes, bits, record.first(code_bytes));
  std::memcpy(record.data() + code_bytes, &p.scale_f16, 2);
  std::memcpy(record.data() + code_bytes + 2, &p.zero_f16, 2);
}

}  // namespace oscar::calib
