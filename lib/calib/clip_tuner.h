#pragma once
// Per-layer clip ratios: a grid search on held-out calibration data. K and V are tuned independently (the key
// error is scored with exact values and vice versa). Ties go to the larger ratio (less clipping), so a flat error
// curve keeps the data unclipped.
//
// Two objectives (--clip-objective, docs/method.md §5):
//   attention   the layer's attention output on whole held-out sequences, read through the decode cache's windows
//               (AttentionClipScorer below): a key error counts by the attention its token receives.
//   logit_mse   the relative logit / output MSE of error_report.h (every held-out key weighted equally by Σ_Q).
// On qwen3-tiny-trained (docs/results.md, "Clip objective vs KL (cliptune)") logit_mse-tuned ratios lose 1.34x in
// KL to the fixed published 0.96 / 0.92 (it clips V to 0.86 everywhere), attention-tuned ones tie with them
// (0.97x); `oscar calibrate` therefore keeps the fixed ratios unless --tune-clip asks.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/kv_quant_spec.h"
#include "lib/calib/error_report.h"

namespace oscar::calib {

struct AttentionSequence;  // lib/calib/spectral_calibration.h

struct ClipGrid {
  float min_ratio = 0.80f;
  float max_ratio = 1.00f;
  float step = 0.01f;
  // min_ratio + i * step for i = 0 .. round((max − min) / step), computed in double, then rounded to float.
  // Throws oscar::Error("clip grid", ...) unless 0 < min <= max <= 1 and step > 0.
  std::vector<float> ratios() const;
};

enum class ClipObjective : uint8_t { Attention = 0, LogitMse = 1 };
std::string_view clip_objective_name(ClipObjective o);                                // "attention", "logit_mse"
ClipObjective parse_clip_objective(std::string_view name, const std::string& where);  // throws oscar::Error(where)

struct ClipChoice {
  float k_ratio = 1.0f;
  float v_ratio = 1.0f;
  double k_error = 0;            // at k_ratio
  double v_error = 0;            // at v_ratio
  double k_error_reference = 0;  // at the reference ratios (the published 0.96 / 0.92, or the spec's)
  double v_error_reference = 0;
};

// Scores every grid ratio on `rotated` (the logit_mse objective) and keeps the best; the reference ratios are
// scored too, for the report.
ClipChoice tune_clip(const RotatedHeldout& rotated, const ClipGrid& grid, float k_reference, float v_reference);

// The attention objective of one layer. For every scored query s of every sequence (positions >= sink + recent,
// every stride-th so at most max_queries per sequence) and query head, the cache reads key/value t quantized iff
// sink <= t <= s − recent (eval's decode-cache rule) and exact otherwise; with o_s = softmax(q_s Kᵀ/√d) V:
//   key_error(r)   = Σ ‖ô_s − o_s‖² / Σ ‖o_s‖²,  ô_s with k̂ (clip r) and exact V
//   value_error(r) = the same with exact K and v̂ (clip r)
// Why not Σ_Q-weighted MSE: the logit error of key t matters in proportion to the attention t receives, and the
// tokens that receive it are the large-|k·q| ones whose outlier coordinates clipping cuts; an output error also
// lets independent per-token value errors average out as attention does. Exact logits and outputs are computed
// once; a ratio costs one quantization of the layer's K or V plus two [queries × tokens × d] products per head.
class AttentionClipScorer {
 public:
  // `sequences`: one layer's whole held-out sequences; rotations [groups, d, d] (groups 1 or num_kv_heads);
  // `k_spec`/`v_spec` the tensor formats (their clip ratios are ignored). Keeps a reference to `sequences`.
  AttentionClipScorer(const std::vector<AttentionSequence>& sequences, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, std::span<const float> k_rotation, std::span<const float> v_rotation,
                      int64_t groups, const fmt::TensorQuantSpec& k_spec, const fmt::TensorQuantSpec& v_spec,
                      int64_t sink, int64_t recent, int64_t max_queries);
  ~AttentionClipScorer();
  AttentionClipScorer(const AttentionClipScorer&) = delete;
  AttentionClipScorer& operator=(const AttentionClipScorer&) = delete;

  double key_error(float clip_ratio) const;
  double value_error(float clip_ratio) const;
  // Σ ‖o_s‖² > 0: some query reads the quantized cache (otherwise every ratio scores 0).
  bool reads_quantized() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Grid search with the attention objective (ties to the larger ratio); the reference ratios are scored too.
ClipChoice tune_clip(const AttentionClipScorer& scorer, const ClipGrid& grid, float k_reference, float v_reference);

}  // namespace oscar::calib
