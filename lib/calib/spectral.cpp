#include "lib/calib/spectral.h"

#include <Eigen/Dense>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "formats/error.h"
#include "lib/calib/bit_allocation.h"
#include "lib/model/rope.h"

namespace oscar::calib {
namespace {

using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

std::vector<int64_t> strided_tokens(int64_t n, int64_t max_tokens) {
  const int64_t stride = max_tokens > 0 ? std::max<int64_t>(1, (n + max_tokens - 1) / max_tokens) : 1;
  std::vector<int64_t> idx;
  for (int64_t t = 0; t < n; t += stride) idx.push_back(t);
  return idx;
}

ObjectiveSamples select(const HeldoutLayer& l, const std::vector<float>& x, const std::vector<int64_t>& idx) {
  ObjectiveSamples s;
  s.heads = l.num_kv_heads;
  s.dim = l.head_dim;
  s.tokens = static_cast<int64_t>(idx.size());
  const int64_t d = l.head_dim, n = l.tokens;
  s.x.resize(static_cast<size_t>(s.heads * s.tokens * d));
  for (int64_t h = 0; h < s.heads; ++h)
    for (int64_t i = 0; i < s.tokens; ++i)
      std::copy_n(x.begin() + (h * n + idx[i]) * d, d, s.x.begin() + (h * s.tokens + i) * d);
  return s;
}

// Columns of `vectors` (row-major [d, d]) reordered by `weights` descending (stable: ties keep the eigen order).
std::vector<double> order_columns(const std::vector<double>& vectors, int64_t d, std::vector<double>& weights) {
  std::vector<int64_t> order(d);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return weights[a] > weights[b]; });
  std::vector<double> r(static_cast<size_t>(d * d)), w(static_cast<size_t>(d));
  for (int64_t j = 0; j < d; ++j) {
    w[j] = weights[order[j]];
    for (int64_t i = 0; i < d; ++i) r[i * d + j] = vectors[i * d + order[j]];
  }
  weights = std::move(w);
  return r;
}

TensorChoice finish_tensor(const ObjectiveSamples& s, fmt::TensorQuantSpec spec, std::vector<double> rotation,
                           std::span<const float> grid, const CayleyOptions* refine, std::string note) {
  TensorChoice c;
  ClipSearch clip = tune_clip_ratio(s, rotation, spec, grid);
  if (refine) {
    const CayleyResult r = cayley_descent(s, rotation, spec, clip.ratio, *refine);
    note += ::fmt::format("{}cayley {:.5f}->{:.5f} ({} steps)", note.empty() ? "" : "; ", r.start_objective,
                          r.objective, r.accepted_steps);
    rotation = r.rotation;
    // The old ratio is on the grid, so re-tuning can only lower J further.
    clip = tune_clip_ratio(s, rotation, spec, grid);
  }
  spec.clip_ratio = clip.ratio;
  c.spec = std::move(spec);
  c.rotation = std::move(rotation);
  c.fit_objective = clip.objective;
  c.note = std::move(note);
  return c;
}

fmt::TensorQuantSpec int_spec(std::vector<fmt::QuantSegment> segments) {
  fmt::TensorQuantSpec t;
  t.storage = fmt::KvStorage::Int;
  t.segments = std::move(segments);
  return t;
}

}  // namespace

LayerSampleCollector::LayerSampleCollector(const StatisticsShape& shape, ValueWeighting weighting,
                                           int64_t skip_first_tokens, int64_t max_tokens_per_layer)
    : shape_(shape),
      skip_first_(std::max<int64_t>(0, skip_first_tokens)),
      max_tokens_(max_tokens_per_layer),
      heldout_(shape, weighting, skip_first_tokens, max_tokens_per_layer),
      kept_(static_cast<size_t>(shape.num_layers), 0),
      k_pre_(static_cast<size_t>(shape.num_layers)),
      positions_(static_cast<size_t>(shape.num_layers)) {}

void LayerSampleCollector::on_attention_inputs(const model::AttentionInputs& in) {
  heldout_.on_attention_inputs(in);  // validates the shape
  // The same window rule as HeldoutCollector, so sample t of k_pre_ is sample t of its k.
  const int64_t T = in.num_tokens, d = shape_.head_dim, H = shape_.num_kv_heads;
  int64_t& kept = kept_[in.layer];
  const int64_t first = std::max<int64_t>(0, skip_first_ - in.pos0);
  const int64_t take = std::min(T - first, max_tokens_ - kept);
  if (take <= 0) return;
  if (!in.k_pre_rope) throw Error("LayerSampleCollector", "the forward does not report pre-RoPE keys");
  std::vector<float> k(static_cast<size_t>(H * (kept + take) * d));
  const auto& old = k_pre_[in.layer];
  for (int64_t h = 0; h < H; ++h) {
    std::copy_n(old.begin() + h * kept * d, kept * d, k.begin() + h * (kept + take) * d);
    std::copy_n(in.k_pre_rope + (h * T + first) * d, take * d, k.begin() + h * (kept + take) * d + kept * d);
  }
  k_pre_[in.layer] = std::move(k);
  for (int64_t i = 0; i < take; ++i) positions_[in.layer].push_back(in.pos0 + first + i);
  kept += take;
}

std::vector<LayerSamples> LayerSampleCollector::finish() {
  std::vector<HeldoutLayer> base = heldout_.finish();
  std::vector<LayerSamples> out(base.size());
  for (size_t l = 0; l < base.size(); ++l) {
    out[l].base = std::move(base[l]);
    out[l].k_pre_rope = std::move(k_pre_[l]);
    out[l].positions = std::move(positions_[l]);
  }
  return out;
}

ObjectiveSamples key_objective_samples(const LayerSamples& layer, bool pre_rope, std::span<const float> inv_freq,
                                       int64_t max_tokens) {
  const HeldoutLayer& l = layer.base;
  const auto idx = strided_tokens(l.tokens, max_tokens);
  ObjectiveSamples s = select(l, pre_rope ? layer.k_pre_rope : l.k, idx);
  s.metric = l.sigma_q;
  if (pre_rope) {
    const int64_t half = l.head_dim / 2;
    if (static_cast<int64_t>(inv_freq.size()) != half)
      throw Error("key_objective_samples", ::fmt::format("inv_freq has {} entries, expected {}", inv_freq.size(), half));
    for (int64_t t : idx) {
      const model::RopeTables tab = model::rope_tables(inv_freq, layer.positions[t], 1);
      s.rope_cos.insert(s.rope_cos.end(), tab.cos.begin(), tab.cos.end());
      s.rope_sin.insert(s.rope_sin.end(), tab.sin.begin(), tab.sin.end());
    }
  }
  s.finalize(pre_rope ? "key samples (pre-RoPE)" : "key samples");
  return s;
}

ObjectiveSamples value_objective_samples(const LayerSamples& layer, int64_t max_tokens) {
  const HeldoutLayer& l = layer.base;
  const auto idx = strided_tokens(l.tokens, max_tokens);
  ObjectiveSamples s = select(l, l.v, idx);
  s.token_weight.resize(static_cast<size_t>(s.heads * s.tokens));
  for (int64_t h = 0; h < s.heads; ++h)
    for (int64_t i = 0; i < s.tokens; ++i) s.token_weight[h * s.tokens + i] = l.value_weight[h * l.tokens + idx[i]];
  s.finalize("value samples");
  return s;
}

std::vector<double> ordered_key_basis(const ObjectiveSamples& keys, std::vector<double>& weights) {
  const int64_t d = keys.dim, n = keys.tokens;
  RowMatD sigma_q = RowMatD::Zero(d, d), sigma_k = RowMatD::Zero(d, d);
  for (int64_t h = 0; h < keys.heads; ++h) {
    const std::vector<double> m = effective_metric(keys, h);
    sigma_q += Eigen::Map<const RowMatD>(m.data(), d, d);
    const RowMatD x = Eigen::Map<const RowMatF>(keys.x.data() + h * n * d, n, d).cast<double>();
    sigma_k += x.transpose() * x / static_cast<double>(n);
  }
  sigma_q /= static_cast<double>(keys.heads);
  sigma_k /= static_cast<double>(keys.heads);
  const SymmetricEigen eig =
      symmetric_eigen(std::span<const double>(sigma_q.data(), d * d), d, "ordered_key_basis (Σ_Q)");
  weights.assign(static_cast<size_t>(d), 0.0);
  const Eigen::Map<const RowMatD> u(eig.vectors.data(), d, d);
  for (int64_t i = 0; i < d; ++i)
    weights[i] = std::max(0.0, eig.values[i]) * std::max(0.0, u.col(i).dot(sigma_k * u.col(i)));
  return order_columns(eig.vectors, d, weights);
}

std::vector<double> ordered_value_basis(const ObjectiveSamples& values, std::vector<double>& weights) {
  const int64_t d = values.dim, n = values.tokens;
  RowMatD sigma = RowMatD::Zero(d, d);
  double total = 0;
  for (int64_t h = 0; h < values.heads; ++h) {
    RowMatD x = Eigen::Map<const RowMatF>(values.x.data() + h * n * d, n, d).cast<double>();
    for (int64_t t = 0; t < n; ++t) {
      const double w = values.token_weight.empty() ? 1.0 : values.token_weight[h * n + t];
      total += w;
      x.row(t) *= std::sqrt(w);
    }
    sigma += x.transpose() * x;
  }
  sigma /= total;
  const SymmetricEigen eig = symmetric_eigen(std::span<const double>(sigma.data(), d * d), d, "ordered_value_basis");
  weights.assign(eig.values.begin(), eig.values.end());
  for (double& w : weights) w = std::max(0.0, w);
  return order_columns(eig.vectors, d, weights);
}

SpectralLayerSearch::SpectralLayerSearch(const ObjectiveSamples& keys, const ObjectiveSamples& values,
                                         const SpectralOptions& opt)
    : keys_(keys), values_(values), opt_(opt) {
  const int64_t d = keys.dim;
  if (values.dim != d) throw Error("spectral_layer", "K and V samples differ in head_dim");
  std::vector<double> wk, wv;
  rk_ = ordered_key_basis(keys, wk);
  rv_ = ordered_value_basis(values, wv);
  SegmentCostTable tk = opt.modeled_costs ? modeled_segment_costs(wk, opt.align, opt.widths)
                                          : measure_segment_costs(keys, rk_, opt.align, opt.widths, opt.segment_mix);
  SegmentCostTable tv = opt.modeled_costs ? modeled_segment_costs(wv, opt.align, opt.widths)
                                          : measure_segment_costs(values, rv_, opt.align, opt.widths, opt.segment_mix);
  // Modelled costs are in the spectrum's units: their relative error divides by the total weight.
  ek_ = opt.modeled_costs ? std::accumulate(wk.begin(), wk.end(), 0.0) : keys.energy;
  ev_ = opt.modeled_costs ? std::accumulate(wv.begin(), wv.end(), 0.0) : values.energy;
  total_ = budget_bits(2.0 * opt.budget_bits_per_element, d);
  pk_ = optimal_plans(tk, total_);
  pv_ = optimal_plans(tv, total_);
}

LayerChoice SpectralLayerSearch::choose(double k_weight, double v_weight) const {
  const int64_t d = keys_.dim;
  const SpectralOptions& opt = opt_;
  const KvSplit split = choose_kv_split(pk_, ek_, pv_, ev_, total_, k_weight, v_weight);
  if (!std::isfinite(split.objective))
    throw Error("spectral_layer", ::fmt::format("no segment layout fits {} bits per K+V head vector pair at head_dim {}",
                                                total_, d));
  const SegmentPlan& plan_k = pk_[split.k_bits];
  const SegmentPlan& plan_v = pv_[split.v_bits];
  // With modelled costs nothing was measured, so a mix is applied wherever the segment has bits (the formula
  // assumes the error spreads evenly over the segment, which is what the mix makes true).
  auto mixes = [&](const SegmentPlan& p) {
    if (!opt.modeled_costs) return p.mixed;
    std::vector<bool> m;
    for (const auto& s : p.segments) m.push_back(opt.segment_mix && s.bits > 0);
    return m;
  };
  const CayleyOptions* refine = opt.optimize_rotation ? &opt.cayley : nullptr;
  LayerChoice c;
  c.k = finish_tensor(keys_, int_spec(plan_k.segments), apply_segment_mixes(rk_, d, plan_k.segments, mixes(plan_k)),
                      opt.clip_grid, refine, segments_text(plan_k.segments));
  c.v = finish_tensor(values_, int_spec(plan_v.segments), apply_segment_mixes(rv_, d, plan_v.segments, mixes(plan_v)),
                      opt.clip_grid, refine, segments_text(plan_v.segments));
  return c;
}

LayerChoice spectral_layer(const ObjectiveSamples& keys, const ObjectiveSamples& values,
                           const SpectralOptions& opt) {
  return SpectralLayerSearch(keys, values, opt).choose(opt.k_weight, opt.v_weight);
}

LayerChoice uniform_layer(const ObjectiveSamples& keys, const ObjectiveSamples& values, std::vector<double> k_rotation,
                          std::vector<double> v_rotation, int32_t bits, std::span<const float> clip_grid,
                          const CayleyOptions* refine) {
  const int32_t d = static_cast<int32_t>(keys.dim);
  const auto spec = int_spec({fmt::QuantSegment{0, d, bits}});
  LayerChoice c;
  c.k = finish_tensor(keys, spec, std::move(k_rotation), clip_grid, refine, "");
  c.v = finish_tensor(values, spec, std::move(v_rotation), clip_grid, refine, "");
  return c;
}

fmt::LayerCalibration to_layer_calibration(const LayerChoice& choice, const fmt::KvQuantSpec& global) {
  fmt::LayerCalibration l;
  const int64_t d = global.head_dim;
  l.k_rotation.assign(choice.k.rotation.begin(), choice.k.rotation.end());
  l.v_rotation.assign(choice.v.rotation.begin(), choice.v.rotation.end());
  // The spectral bases are not eigenvalue-ordered rotations of one matrix; the bundle's eigenvalue slots hold zeros.
  l.k_eigenvalues.assign(static_cast<size_t>(d), 0.0);
  l.v_eigenvalues.assign(static_cast<size_t>(d), 0.0);
  l.k_clip_ratio = choice.k.spec.clip_ratio;
  l.v_clip_ratio = choice.v.spec.clip_ratio;
  if (choice.k.spec.segments != global.k.segments) l.k_segments = choice.k.spec.segments;
  if (choice.v.spec.segments != global.v.segments) l.v_segments = choice.v.spec.segments;
  return l;
}

}  // namespace oscar::calib
