#pragma once
// Rotations chosen by the objective (docs/method.md, "Beyond the published method"): the attention-aware
// quantization error of one tensor (K or V) of one layer as a function of its rotation R, the segment-cost
// measurements the bit allocation (lib/calib/bit_allocation.h) runs its DP on, and a Cayley descent on R.
//
// Objective (relative, on samples x_t of KV head h with token weight w_t and metric M_h):
//   J(R) = Σ_h Σ_t w_t · ε_t M_h ε_tᵀ / Σ_h Σ_t w_t · k_t M_h k_tᵀ,   ε_t = P_t(Q(x_t R) Rᵀ − x_t),
// Q the reference quantizer (lib/calib/quantizer_ref.h) in the rotated basis, P_t = identity, or RoPE at the
// token's position when x holds PRE-RoPE keys (then k_t = P_t x_t is the post-RoPE key and ε_t is the post-RoPE
// error R_pos(k̂_pre) − k). Keys: M_h = Σ_Q of the head's queries, w_t = 1 (relative logit MSE, as error_report.h).
// Values: M_h = I, w_t the value weighting (relative output MSE).
//
// Gradient (straight-through): rounding residuals c = (ŷ − y)/scale are frozen, so a segment's error moves only
// through its scale = (max − min)/(2^bits − 1) (the argmax and argmin coordinates), through clipped or dropped
// coordinates (∂ŷ/∂y = 0), and through Rᵀ mapping the error back. The descent uses it only as a search direction:
// every step is accepted only if the TRUE objective decreases, so the result never scores worse than the start.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "formats/kv_quant_spec.h"
#include "lib/calib/bit_allocation.h"

namespace oscar::calib {

struct ObjectiveSamples {
  int64_t heads = 0, tokens = 0, dim = 0;
  std::vector<float> x;              // [heads, tokens, d] what is quantized (pre-RoPE keys when rope_cos is set)
  std::vector<double> metric;        // [heads, d, d]; empty = identity
  std::vector<double> token_weight;  // [heads, tokens]; empty = 1
  std::vector<float> rope_cos, rope_sin;  // [tokens, d/2] (transformers' rotate_half pairing i, i + d/2); empty = none
  double energy = 0;                 // the denominator, set by finalize()
  // Checks shapes and computes `energy`. Throws oscar::Error(where, ...) on inconsistent sizes or zero energy.
  void finalize(const std::string& where);
  bool pre_rope() const { return !rope_cos.empty(); }
};

// J(R) (R row-major [d, d], orthogonal) for a tensor spec and clip ratio.
double quantization_objective(const ObjectiveSamples& s, std::span<const double> rotation,
                              const fmt::TensorQuantSpec& spec, float clip_ratio);
// J(R) and its straight-through gradient dJ/dR ([d, d] row-major).
double quantization_objective_gradient(const ObjectiveSamples& s, std::span<const double> rotation,
                                       const fmt::TensorQuantSpec& spec, float clip_ratio, std::vector<double>& grad);

// The metric the segment DP uses for head h: M_h, or for pre-RoPE samples the position average (1/T) Σ_t P_t M_h P_tᵀ.
std::vector<double> effective_metric(const ObjectiveSamples& s, int64_t head);

// The orthogonal mix applied inside one segment of `length` dims: the normalized Sylvester Hadamard when length is
// 2^k, else the orthonormal DCT-II (both spread one coordinate's energy over the whole segment, which is what makes
// a per-token min-max range fit the segment's energy rather than its largest coordinate).
std::vector<double> segment_mix(int64_t length);

// R · blockdiag(mix of each segment whose `mixed` flag is set, identity elsewhere).
std::vector<double> apply_segment_mixes(std::span<const double> rotation, int64_t d,
                                        std::span<const fmt::QuantSegment> segments, const std::vector<bool>& mixed);

// Measures every candidate segment of `basis` (R row-major; its columns are the ordered directions) at every
// width: the (absolute, unnormalized) error of quantizing those columns alone, without clipping, in the
// block of effective_metric; with try_mix the segment is scored with and without segment_mix and the better is
// kept (recorded in the table's mixed flags).
SegmentCostTable measure_segment_costs(const ObjectiveSamples& s, std::span<const double> basis, int64_t align,
                                       const std::vector<int32_t>& widths, bool try_mix);

struct CayleyOptions {
  int64_t max_iterations = 40;
  double initial_step = 0.05;  // τ·‖A‖_F of the first trial step (a rotation angle scale, in radians)
  int64_t max_halvings = 6;    // a step that fails to improve is halved this many times before the search stops
};
struct CayleyResult {
  std::vector<double> rotation;  // best R found (orthogonal; R = start when nothing improved)
  double start_objective = 0;
  double objective = 0;          // J(rotation) <= start_objective
  int64_t accepted_steps = 0;
  int64_t evaluations = 0;
};
// Descent on the orthogonal group: R(τ) = (I + τ/2·A)^(−1)(I − τ/2·A)·R with A = G·Rᵀ − R·Gᵀ (skew, so R(τ) is
// orthogonal for every τ) and G the straight-through gradient; backtracking on the true objective.
CayleyResult cayley_descent(const ObjectiveSamples& s, std::span<const double> start, const fmt::TensorQuantSpec& spec,
                            float clip_ratio, const CayleyOptions& options = {});

// Per-token clip ratio minimizing J on a grid (ties to the larger ratio).
struct ClipSearch {
  float ratio = 1.0f;
  double objective = 0;
};
ClipSearch tune_clip_ratio(const ObjectiveSamples& s, std::span<const double> rotation,
                           const fmt::TensorQuantSpec& spec, std::span<const float> grid);

}  // namespace oscar::calib
