#include "lib/calib/rotation_opt.h"

#include <Eigen/Dense>
#include <fmt/format.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <numbers>

#include "formats/error.h"
#include "lib/calib/quantizer_ref.h"
#include "lib/calib/rotation.h"

namespace oscar::calib {
namespace {

using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

Eigen::Map<const RowMatD> as_matrix(std::span<const double> m, int64_t d) { return {m.data(), d, d}; }

// x·cos + rotate_half(x)·sin on every row (row t uses the tables' row t); `transpose` applies the inverse (= Pᵀ).
void rope_rows(RowMatD& e, const ObjectiveSamples& s, bool transpose) {
  const int64_t h = s.dim / 2;
  for (int64_t t = 0; t < e.rows(); ++t) {
    const float* c = s.rope_cos.data() + t * h;
    const float* sn = s.rope_sin.data() + t * h;
    for (int64_t i = 0; i < h; ++i) {
      const double a = e(t, i), b = e(t, i + h), cs = c[i], si = transpose ? -sn[i] : sn[i];
      e(t, i) = a * cs - b * si;
      e(t, i + h) = b * cs + a * si;
    }
  }
}

double token_weight(const ObjectiveSamples& s, int64_t h, int64_t t) {
  return s.token_weight.empty() ? 1.0 : s.token_weight[h * s.tokens + t];
}

// Σ_t w_t e_t M e_tᵀ, and optionally the per-row gradient 2 w_t e_t M.
double weighted_quadratic(const RowMatD& e, const ObjectiveSamples& s, int64_t h, RowMatD* grad) {
  RowMatD em = s.metric.empty() ? e : RowMatD(e * as_matrix(std::span<const double>(s.metric).subspan(h * s.dim * s.dim, s.dim * s.dim), s.dim));
  double total = 0;
  for (int64_t t = 0; t < e.rows(); ++t) {
    const double w = token_weight(s, h, t);
    total += w * em.row(t).dot(e.row(t));
    if (grad) grad->row(t) = 2.0 * w * em.row(t);
  }
  return total;
}

struct HeadEvaluation {
  double error = 0;
  RowMatD grad;  // dJ_h/dR (unnormalized), when asked for
};

HeadEvaluation evaluate_head(const ObjectiveSamples& s, int64_t h, const RowMatD& r, const HeadQuantizer& quant,
                             const fmt::TensorQuantSpec& spec, float clip_ratio, bool want_grad) {
  const int64_t n = s.tokens, d = s.dim;
  const RowMatD x = Eigen::Map<const RowMatF>(s.x.data() + h * n * d, n, d).cast<double>();
  const RowMatF y = (x * r).cast<float>();
  RowMatF q(n, d);
  quant.fake_quantize(std::span<const float>(y.data(), n * d), n, {}, clip_ratio, Basis::Rotated,
                      std::span<float>(q.data(), n * d));
  // The residual in fp64: ŷ − y in fp32 would round away the small errors the metric is about.
  const RowMatD e_rot = q.cast<double>() - y.cast<double>();
  RowMatD e = e_rot * r.transpose();
  if (s.pre_rope()) rope_rows(e, s, false);
  HeadEvaluation out;
  RowMatD g_post(want_grad ? n : 0, want_grad ? d : 0);
  out.error = weighted_quadratic(e, s, h, want_grad ? &g_post : nullptr);
  if (!want_grad) return out;
  if (s.pre_rope()) rope_rows(g_post, s, true);
  const RowMatD& g_orig = g_post;
  const RowMatD g_rot = g_orig * r;
  RowMatD g_y = RowMatD::Zero(n, d);
  std::vector<float> row(static_cast<size_t>(d));
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t j = 0; j < d; ++j) row[j] = y(t, j);
    const float c = clip_threshold(row, clip_ratio);
    for (const auto& seg : spec.segments) {
      if (seg.bits == 0) {
        for (int64_t k = seg.begin; k < seg.end; ++k) g_y(t, k) = -g_rot(t, k);
        continue;
      }
      std::vector<float> clipped(static_cast<size_t>(seg.end - seg.begin));
      int64_t arg_lo = seg.begin, arg_hi = seg.begin;
      for (int64_t k = seg.begin; k < seg.end; ++k) {
        clipped[k - seg.begin] = std::clamp(row[k], -c, c);
        if (clipped[k - seg.begin] < clipped[arg_lo - seg.begin]) arg_lo = k;
        if (clipped[k - seg.begin] > clipped[arg_hi - seg.begin]) arg_hi = k;
      }
      const float scale = int_params(clipped, seg.bits).scale();
      double range_sensitivity = 0;
      for (int64_t k = seg.begin; k < seg.end; ++k) {
        if (std::abs(row[k]) > c || scale == 0.0f) {
          g_y(t, k) -= g_rot(t, k);  // the clip (or collapse) error grows one for one with y
        } else {
          range_sensitivity += g_rot(t, k) * e_rot(t, k) / scale;
        }
      }
      if (scale == 0.0f) continue;
      const double per_level = range_sensitivity / static_cast<double>((1 << seg.bits) - 1);
      if (std::abs(row[arg_hi]) <= c) g_y(t, arg_hi) += per_level;
      if (std::abs(row[arg_lo]) <= c) g_y(t, arg_lo) -= per_level;
    }
  }
  out.grad = g_orig.transpose() * e_rot + x.transpose() * g_y;
  return out;
}

double evaluate(const ObjectiveSamples& s, std::span<const double> rotation, const fmt::TensorQuantSpec& spec,
                float clip_ratio, std::vector<double>* grad) {
  const int64_t d = s.dim;
  if (static_cast<int64_t>(rotation.size()) != d * d)
    throw Error("quantization_objective", ::fmt::format("rotation has {} values, expected {}", rotation.size(), d * d));
  if (!(s.energy > 0)) throw Error("quantization_objective", "samples are not finalized (energy 0)");
  const HeadQuantizer quant(spec, d, "quantization_objective");
  const RowMatD r = as_matrix(rotation, d);
  std::vector<HeadEvaluation> heads(static_cast<size_t>(s.heads));
  tbb::parallel_for(int64_t{0}, s.heads,
                    [&](int64_t h) { heads[h] = evaluate_head(s, h, r, quant, spec, clip_ratio, grad != nullptr); });
  double total = 0;
  RowMatD g = RowMatD::Zero(grad ? d : 0, grad ? d : 0);
  for (const auto& he : heads) {  // fixed head order: deterministic
    total += he.error;
    if (grad) g += he.grad;
  }
  if (grad) {
    grad->resize(static_cast<size_t>(d * d));
    Eigen::Map<RowMatD>(grad->data(), d, d) = g / s.energy;
  }
  return total / s.energy;
}

}  // namespace

void ObjectiveSamples::finalize(const std::string& where) {
  const int64_t d = dim;
  if (heads <= 0 || tokens <= 0 || d <= 0 || static_cast<int64_t>(x.size()) != heads * tokens * d)
    throw Error(where, ::fmt::format("samples hold {} values, expected [{}, {}, {}]", x.size(), heads, tokens, d));
  if (!metric.empty() && static_cast<int64_t>(metric.size()) != heads * d * d)
    throw Error(where, ::fmt::format("metric holds {} values, expected [{}, {}, {}]", metric.size(), heads, d, d));
  if (!token_weight.empty() && static_cast<int64_t>(token_weight.size()) != heads * tokens)
    throw Error(where, ::fmt::format("token weights hold {} values, expected {}", token_weight.size(), heads * tokens));
  if (pre_rope() && (d % 2 != 0 || static_cast<int64_t>(rope_cos.size()) != tokens * d / 2 ||
                     rope_sin.size() != rope_cos.size()))
    throw Error(where, "RoPE tables must be [tokens, head_dim / 2]");
  energy = 0;
  for (int64_t h = 0; h < heads; ++h) {
    RowMatD k = Eigen::Map<const RowMatF>(x.data() + h * tokens * d, tokens, d).cast<double>();
    if (pre_rope()) rope_rows(k, *this, false);
    energy += weighted_quadratic(k, *this, h, nullptr);
  }
  if (!(energy > 0) || !std::isfinite(energy)) throw Error(where, ::fmt::format("sample energy {} is not positive", energy));
}

double quantization_objective(const ObjectiveSamples& s, std::span<const double> rotation,
                              const fmt::TensorQuantSpec& spec, float clip_ratio) {
  return evaluate(s, rotation, spec, clip_ratio, nullptr);
}

double quantization_objective_gradient(const ObjectiveSamples& s, std::span<const double> rotation,
                                       const fmt::TensorQuantSpec& spec, float clip_ratio, std::vector<double>& grad) {
  return evaluate(s, rotation, spec, clip_ratio, &grad);
}

std::vector<double> effective_metric(const ObjectiveSamples& s, int64_t head) {
  const int64_t d = s.dim, h = d / 2;
  RowMatD m = s.metric.empty() ? RowMatD(RowMatD::Identity(d, d))
                               : RowMatD(as_matrix(std::span<const double>(s.metric).subspan(head * d * d, d * d), d));
  if (!s.pre_rope()) return std::vector<double>(m.data(), m.data() + d * d);
  // A row vector e becomes e·P_t, P_t block-diagonal in the pairs (i, i + d/2) with blocks [[c, s], [−s, c]], so
  // the pre-RoPE metric is P_t M P_tᵀ; each 2×2 block of M only meets its two pairs' blocks (O(d²) per token).
  RowMatD acc = RowMatD::Zero(d, d);
  for (int64_t t = 0; t < s.tokens; ++t) {
    const float* cs = s.rope_cos.data() + t * h;
    const float* sn = s.rope_sin.data() + t * h;
    for (int64_t i = 0; i < h; ++i) {
      const double ci = cs[i], si = sn[i];
      for (int64_t j = 0; j < h; ++j) {
        const double cj = cs[j], sj = sn[j];
        // B_i M_ij B_jᵀ with B = [[c, s], [−s, c]].
        const double m00 = m(i, j), m01 = m(i, j + h), m10 = m(i + h, j), m11 = m(i + h, j + h);
        const double t00 = ci * m00 + si * m10, t01 = ci * m01 + si * m11;
        const double t10 = -si * m00 + ci * m10, t11 = -si * m01 + ci * m11;
        acc(i, j) += t00 * cj + t01 * sj;
        acc(i, j + h) += -t00 * sj + t01 * cj;
        acc(i + h, j) += t10 * cj + t11 * sj;
        acc(i + h, j + h) += -t10 * sj + t11 * cj;
      }
    }
  }
  acc /= static_cast<double>(s.tokens);
  return std::vector<double>(acc.data(), acc.data() + d * d);
}

std::vector<double> segment_mix(int64_t length) {
  if (length <= 0) throw Error("segment_mix", ::fmt::format("length {} must be positive", length));
  if (is_power_of_two(length)) return hadamard(length);
  // Orthonormal DCT-II as a row-vector map y -> y·C: column k is the k-th cosine basis vector.
  std::vector<double> c(static_cast<size_t>(length * length));
  for (int64_t n = 0; n < length; ++n)
    for (int64_t k = 0; k < length; ++k) {
      const double norm = std::sqrt((k == 0 ? 1.0 : 2.0) / static_cast<double>(length));
      c[n * length + k] = norm * std::cos(std::numbers::pi * (n + 0.5) * k / static_cast<double>(length));
    }
  return c;
}

std::vector<double> apply_segment_mixes(std::span<const double> rotation, int64_t d,
                                        std::span<const fmt::QuantSegment> segments, const std::vector<bool>& mixed) {
  RowMatD r = as_matrix(rotation, d);
  for (size_t i = 0; i < segments.size(); ++i) {
    if (i >= mixed.size() || !mixed[i]) continue;
    const int64_t b = segments[i].begin, len = segments[i].end - segments[i].begin;
    const std::vector<double> mix = segment_mix(len);
    const RowMatD cols = r.middleCols(b, len) * as_matrix(mix, len);
    r.middleCols(b, len) = cols;
  }
  return std::vector<double>(r.data(), r.data() + d * d);
}

SegmentCostTable measure_segment_costs(const ObjectiveSamples& s, std::span<const double> basis, int64_t align,
                                       const std::vector<int32_t>& widths, bool try_mix) {
  const int64_t d = s.dim, n = s.tokens;
  SegmentCostTable table(d, align, widths);
  const RowMatD r = as_matrix(basis, d);
  std::vector<RowMatD> rotated(static_cast<size_t>(s.heads)), metric(static_cast<size_t>(s.heads));
  for (int64_t h = 0; h < s.heads; ++h) {
    const RowMatD x = Eigen::Map<const RowMatF>(s.x.data() + h * n * d, n, d).cast<double>();
    rotated[h] = (x * r).cast<float>().cast<double>();  // what the quantizer sees is fp32
    const std::vector<double> m = effective_metric(s, h);
    metric[h] = r.transpose() * as_matrix(m, d) * r;
  }
  std::vector<std::pair<int64_t, int64_t>> spans;
  for (int64_t i = 0; i < table.units(); ++i)
    for (int64_t j = i + 1; j <= table.units(); ++j) spans.emplace_back(i, j);
  tbb::parallel_for(size_t{0}, spans.size(), [&](size_t si) {
    const auto [i, j] = spans[si];
    const int64_t b = i * align, len = (j - i) * align;
    const std::vector<double> mix = try_mix ? segment_mix(len) : std::vector<double>{};
    std::vector<float> row(static_cast<size_t>(len));
    std::vector<uint8_t> codes(static_cast<size_t>(len));
    for (size_t w = 0; w < widths.size(); ++w) {
      double best = std::numeric_limits<double>::infinity();
      bool best_mixed = false;
      for (int variant = 0; variant < (try_mix && widths[w] > 0 ? 2 : 1); ++variant) {
        double total = 0;
        for (int64_t h = 0; h < s.heads; ++h) {
          RowMatD y = rotated[h].middleCols(b, len);
          RowMatD m = metric[h].block(b, b, len, len);
          if (variant == 1) {
            const auto mm = as_matrix(mix, len);
            y = (y * mm).cast<float>().cast<double>();
            m = mm.transpose() * m * mm;
          }
          RowMatD e(n, len);
          for (int64_t t = 0; t < n; ++t) {
            if (widths[w] == 0) {
              e.row(t) = -y.row(t);
              continue;
            }
            for (int64_t k = 0; k < len; ++k) row[k] = static_cast<float>(y(t, k));
            const IntParams p = int_params(row, widths[w]);
            int_codes(row, widths[w], p, codes);
            for (int64_t k = 0; k < len; ++k) e(t, k) = static_cast<double>(int_dequant(codes[k], p)) - row[k];
          }
          const RowMatD em = e * m;
          for (int64_t t = 0; t < n; ++t) total += token_weight(s, h, t) * em.row(t).dot(e.row(t));
        }
        if (total < best) {
          best = total;
          best_mixed = variant == 1;
        }
      }
      table.cost(i, j, w) = best;
      table.set_mixed(i, j, w, best_mixed);
    }
  });
  return table;
}

CayleyResult cayley_descent(const ObjectiveSamples& s, std::span<const double> start, const fmt::TensorQuantSpec& spec,
                            float clip_ratio, const CayleyOptions& options) {
  const int64_t d = s.dim;
  CayleyResult out;
  out.rotation.assign(start.begin(), start.end());
  std::vector<double> grad;
  double f = quantization_objective_gradient(s, out.rotation, spec, clip_ratio, grad);
  out.start_objective = out.objective = f;
  out.evaluations = 1;
  double step = options.initial_step;
  const RowMatD eye = RowMatD::Identity(d, d);
  for (int64_t it = 0; it < options.max_iterations; ++it) {
    const RowMatD r = as_matrix(out.rotation, d);
    const RowMatD g = as_matrix(grad, d);
    const RowMatD a = g * r.transpose() - r * g.transpose();
    const double norm = a.norm();
    if (!(norm > 0) || !std::isfinite(norm)) break;
    bool improved = false;
    for (int64_t k = 0; k <= options.max_halvings; ++k) {
      const double tau = step / norm;
      const RowMatD next = (eye + 0.5 * tau * a).partialPivLu().solve((eye - 0.5 * tau * a) * r);
      std::vector<double> candidate(next.data(), next.data() + d * d);
      std::vector<double> candidate_grad;
      const double fn = quantization_objective_gradient(s, candidate, spec, clip_ratio, candidate_grad);
      ++out.evaluations;
      if (fn < f) {
        f = fn;
        out.rotation = std::move(candidate);
        grad = std::move(candidate_grad);
        improved = true;
        ++out.accepted_steps;
        step = std::min(step * 1.5, 1.0);
        break;
      }
      step *= 0.5;
    }
    if (!improved) break;
  }
  out.objective = f;
  return out;
}

ClipSearch tune_clip_ratio(const ObjectiveSamples& s, std::span<const double> rotation,
                           const fmt::TensorQuantSpec& spec, std::span<const float> grid) {
  if (grid.empty()) throw Error("tune_clip_ratio", "empty clip grid");
  std::vector<float> ratios(grid.begin(), grid.end());
  std::sort(ratios.begin(), ratios.end(), std::greater<float>());
  ClipSearch best;
  best.objective = std::numeric_limits<double>::infinity();
  for (float ratio : ratios) {
    const double j = quantization_objective(s, rotation, spec, ratio);
    if (j < best.objective) {
      best.objective = j;
      best.ratio = ratio;
    }
  }
  return best;
}

}  // namespace oscar::calib
