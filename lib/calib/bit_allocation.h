#pragma once
// Spectral bit allocation: transform coding of a rotated head vector in the attention metric (docs/method.md,
// "Beyond the published method").
//
// In an ordered basis where the error metric is (near) diagonal, quantizing direction i with b bits costs about
// D_i(b) = w_i · 2^(−2b) (w_i: metric weight × variance along i, times the quantizer's constant). The continuous
// optimum under Σ b_i = B is reverse water-filling: b_i = max(0, ½·log2(w_i / θ)), every active direction ends at
// distortion θ, every inactive one at w_i. The cache cannot store per-direction widths, so the allocation is made
// of a few contiguous segments [begin, end) on `align`-dim boundaries, each with one width from `widths` and its
// own fp16 scale + zero (32 bits per segment per token, counted in the budget like fmt::TensorQuantSpec does).
//
// SegmentCostTable holds the distortion of every candidate segment at every width — measured on samples with the
// real quantizer (lib/calib/rotation_opt.h measure_segment_costs) or modelled from a spectrum (modeled_segment_costs)
// — and optimal_plans() finds, for every total bit count, the tiling of [0, d) of least summed cost by dynamic
// programming. Summing segment costs assumes the errors of different segments do not interact (exact for a
// block-diagonal metric); callers re-measure the chosen plan with the whole-head metric.
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "formats/kv_quant_spec.h"

namespace oscar::calib {

// ---- continuous reverse water-filling

struct WaterFilling {
  double level = 0;                 // θ: the distortion of every direction that gets bits
  std::vector<double> bits;         // b_i >= 0, Σ b_i = total_bits
  std::vector<double> distortion;   // min(w_i, θ) = w_i · 2^(−2 b_i)
  double total_distortion = 0;
};
// Minimizes Σ w_i 2^(−2 b_i) subject to Σ b_i = total_bits, b_i >= 0 (weights >= 0, total_bits >= 0). Exact
// closed form: the active set is the k largest weights for the largest k with w_(k) > θ_k,
// θ_k = (Π_{i<=k} w_(i))^(1/k) · 2^(−2B/k). Throws oscar::Error on negative or non-finite input.
WaterFilling reverse_water_filling(std::span<const double> weights, double total_bits);

// ---- segment plans

// Bits one plan stores per head vector: Σ (end − begin)·bits + 32 per segment with bits > 0.
int64_t plan_bits(std::span<const fmt::QuantSegment> segments);

// Distortions of every candidate segment [i·align, j·align) (0 <= i < j <= units, units = dim / align) at every
// width in `widths`. `mixed` records whether the measurement chose the segment's internal mix (see
// rotation_opt.h); the DP does not read it.
class SegmentCostTable {
 public:
  SegmentCostTable(int64_t dim, int64_t align, std::vector<int32_t> widths);
  int64_t dim() const { return dim_; }
  int64_t align() const { return align_; }
  int64_t units() const { return units_; }
  const std::vector<int32_t>& widths() const { return widths_; }
  double& cost(int64_t i, int64_t j, size_t width_index) { return cost_[index(i, j, width_index)]; }
  double cost(int64_t i, int64_t j, size_t width_index) const { return cost_[index(i, j, width_index)]; }
  void set_mixed(int64_t i, int64_t j, size_t width_index, bool m) { mixed_[index(i, j, width_index)] = m ? 1 : 0; }
  bool mixed(int64_t i, int64_t j, size_t width_index) const { return mixed_[index(i, j, width_index)] != 0; }

 private:
  size_t index(int64_t i, int64_t j, size_t w) const;
  int64_t dim_, align_, units_;
  std::vector<int32_t> widths_;
  std::vector<double> cost_;
  std::vector<uint8_t> mixed_;
};

// The table a spectrum predicts: segment [a, b) at width β costs Σ_{i∈[a,b)} w_i · 2^(−2β) (β = 0: Σ w_i).
// `weights` has `dim` entries, in the order of the basis the segments cut.
SegmentCostTable modeled_segment_costs(std::span<const double> weights, int64_t align, std::vector<int32_t> widths);

struct SegmentPlan {
  std::vector<fmt::QuantSegment> segments;  // tile [0, dim) on align boundaries; adjacent segments may share a width
  std::vector<bool> mixed;                  // per segment, from the table
  int64_t bits = 0;                         // plan_bits(segments)
  double cost = std::numeric_limits<double>::infinity();  // Σ table costs
};

// best[B] for B = 0 .. max_bits: the least-cost plan storing at most B bits per head vector (cost +inf when no
// plan fits, e.g. B < 0-bit-everything is impossible only if 0 is not a width). Ties go to fewer bits, then to
// fewer segments. Deterministic.
std::vector<SegmentPlan> optimal_plans(const SegmentCostTable& table, int64_t max_bits);

// K/V split of one layer: the pair (bits_k, bits_v) with bits_k + bits_v <= total_bits minimizing
// k_weight · k[bits_k].cost / k_energy + v_weight · v[bits_v].cost / v_energy (relative errors).
struct KvSplit {
  int64_t k_bits = 0, v_bits = 0;
  double k_relative = 0, v_relative = 0;
  double objective = std::numeric_limits<double>::infinity();
};
KvSplit choose_kv_split(const std::vector<SegmentPlan>& k, double k_energy, const std::vector<SegmentPlan>& v,
                        double v_energy, int64_t total_bits, double k_weight = 1.0, double v_weight = 1.0);

// Bits per head vector a budget in bits/element allows (floor of budget · dim, with a 1e-9 guard so 2.25 · 128
// is 288, not 287).
int64_t budget_bits(double bits_per_element, int64_t dim);

// The segments as text: "[0,32)@3 [32,96)@2 [96,128)@0".
std::string segments_text(std::span<const fmt::QuantSegment> segments);

}  // namespace oscar::calib
