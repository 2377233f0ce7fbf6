#pragma once
// Attention-aware quantization error on held-out data (docs/method.md):
//   keys    relative logit MSE  = Σ_h Σ_t e_t Σ_Q[h] e_tᵀ / Σ_h Σ_t k_t Σ_Q[h] k_tᵀ,  e_t = k̂_t − k_t
//           (= Σ‖(k̂−k)·q‖² / Σ‖k·q‖² over all held-out (q, k) pairs of a KV head's group)
//   values  relative output MSE = Σ_h Σ_t w_t ‖v̂_t − v_t‖² / Σ_h Σ_t w_t ‖v_t‖²,  w_t as in Σ_V (ValueWeighting)
// with Σ_Q and w_t measured on the held-out sequences themselves. k̂, v̂ come from the reference quantizer
// (lib/calib/quantizer_ref.h), the same definition the CUDA kernels reproduce.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "formats/bundle.h"
#include "formats/kv_quant_spec.h"
#include "lib/calib/quantizer_ref.h"
#include "lib/calib/statistics.h"
#include "lib/model/observer.h"

namespace oscar::calib {

// Σ_t w_t x_t S x_tᵀ over the rows of x [n, d] (row-major), S [d, d] row-major; w empty = every weight 1. The
// quadratic form the error report and the error-feedback held-out score are measured in.
double quadratic_energy(std::span<const double> x, int64_t d, const double* s, std::span<const double> w = {});

// Held-out samples of one layer.
struct HeldoutLayer {
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t tokens = 0;                 // samples per KV head
  std::vector<float> k;               // [kv_heads, tokens, d] post-RoPE keys
  std::vector<float> v;               // [kv_heads, tokens, d]
  std::vector<double> value_weight;   // [kv_heads, tokens] w_t
  std::vector<double> sigma_q;        // [kv_heads, d, d] held-out Σ_Q
};

// Observer over the held-out sequences: keeps K/V of positions >= skip_first_tokens (the bf16 sink tokens are
// never quantized, so they do not count) up to max_tokens_per_layer, in sequence order, and Σ_Q of all queries.
class HeldoutCollector : public model::Observer {
 public:
  HeldoutCollector(const StatisticsShape& shape, ValueWeighting weighting, int64_t skip_first_tokens,
                   int64_t max_tokens_per_layer);
  void begin_sequence(int64_t index);
  void on_attention_inputs(const model::AttentionInputs& in) override;
  // One HeldoutLayer per model layer (weights computed now, for QueryEnergy from the held-out Σ_Q).
  std::vector<HeldoutLayer> finish();

 private:
  StatisticsShape shape_;
  ValueWeighting weighting_;
  int64_t skip_first_;
  int64_t max_tokens_;
  StatisticsCollector queries_;  // Σ_Q of the held-out queries, Uniform weighting (one pass)
  std::vector<HeldoutLayer> layers_;
};

// One layer's held-out data rotated once by a candidate rotation pair, so many clip ratios can be scored
// without re-rotating. `k_rotation`/`v_rotation` are [groups, d, d] fp32 (groups = 1 or num_kv_heads).
class RotatedHeldout {
 public:
  RotatedHeldout(const HeldoutLayer& data, std::span<const float> k_rotation, std::span<const float> v_rotation,
                 int64_t groups, const fmt::KvQuantSpec& spec);
  double key_error(float clip_ratio) const;
  double value_error(float clip_ratio) const;

 private:
  const HeldoutLayer& data_;
  int64_t groups_;
  HeadQuantizer k_quant_, v_quant_;
  std::vector<float> yk_, yv_;              // rotated samples, [kv_heads, tokens, d]
  std::vector<double> rotated_sigma_q_;     // per KV head Rᵀ Σ_Q R, [kv_heads, d, d]
  double key_energy_ = 0, value_energy_ = 0;  // the denominators
};

// The rotations one report row uses, per layer: [groups, d, d] for K and V.
struct CandidateRotations {
  std::string name;  // "none", "hadamard", "eigen", "oscar"
  int64_t groups = 1;
  std::vector<std::vector<float>> k, v;  // per layer
};

// Rows "<name>" (clip 1) and "<name>+clip" (the spec's k/v clip ratios) for every candidate, one value per layer.
fmt::ErrorReport build_error_report(const std::vector<HeldoutLayer>& heldout,
                                    const std::vector<CandidateRotations>& candidates, const fmt::KvQuantSpec& spec);

// A markdown table: one row per report row, K and V errors averaged over layers (mean of per-layer ratios).
std::string format_error_report(const fmt::ErrorReport& report);

}  // namespace oscar::calib
