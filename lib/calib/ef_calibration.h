#pragma once
// Error-feedback tables for a calibrated bundle (bundle format 1.2, issue #10; docs/method.md "Error-feedback
// rounding"): `oscar calibrate --error-feedback k|kv` turns each whole-head INT2 tensor's error metric into the
// stored table (order + fp32 weights) every cache writer rounds with (lib/calib/error_feedback.h).
//   keys    M_K[h] = Σ_Q of KV head h's query group (post-RoPE queries, the calibrator's statistics)
//   values  M_V[h] = Σ_{g ∈ G(h)} W_gᵀ W_g, W_g = the o_proj columns [hidden, d] of query head g: the layer output
//           error of a value error e read by head g is W_g e (cross-head terms and attention weights ignored)
// Both are moved into the storage basis of the layer's rotation (Rᵀ M R, per KV head) before the factorization.
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/bundle.h"
#include "lib/calib/error_report.h"
#include "formats/model_config.h"

namespace oscar::fmt {
class TensorStore;
}

namespace oscar::calib {

enum class ErrorFeedbackMode : uint8_t { Off = 0, K = 1, KV = 2 };
std::string_view error_feedback_mode_name(ErrorFeedbackMode m);                          // "off", "k", "kv"
ErrorFeedbackMode parse_error_feedback_mode(std::string_view name, const std::string& where);  // throws oscar::Error

// --error-feedback, --ef-damp, --ef-clip-feedback. The library default is Off (bundles byte-identical to before);
// the CLI's default is kv, damp 0.1, clip feedback on (docs/results.md, "Error-feedback tables in the bundle").
struct ErrorFeedbackCalibration {
  ErrorFeedbackMode mode = ErrorFeedbackMode::Off;
  double damp = 0.1;          // relative to mean(diag M)
  bool clip_feedback = true;  // target = the unclipped rotated vector (the clipping error is fed back too)
  // --ef-context: the positions 0..context-1 the key metric is averaged over (key_metrics_for_context); 0 = the
  // calibration sequences' own length (the metric as collected).
  int64_t context = 0;
  // Format 1.3: store the collected key metric beside the key tables (store_key_metrics), so they can be rebuilt for
  // any context (retarget_key_tables). Off: --no-ef-key-metric (a 1.2 bundle, tables for one context only).
  bool store_key_metric = true;
  // Per layer [num_kv_heads, d, d] M_V in the ORIGINAL value basis (value_output_metrics); required for kv.
  std::vector<std::vector<double>> value_metrics;
};

// M_V of one layer from its o_proj weight [hidden, num_heads · d] (row-major fp32): [num_kv_heads, d, d] fp64.
// Throws oscar::Error(where, ...) on a shape mismatch.
std::vector<double> value_output_metric(std::span<const float> o_proj, int64_t hidden, int64_t num_heads,
                                        int64_t num_kv_heads, int64_t d, const std::string& where);
// M_V of every layer from a checkpoint (model.layers.{l}.self_attn.o_proj.weight).
std::vector<std::vector<double>> value_output_metrics(const fmt::TensorStore& weights, const fmt::ModelConfig& cfg);

// The key metric for another context length (--ef-context, docs/method.md "The key metric's context"). Σ_Q is the
// second moment of POST-RoPE queries averaged over the calibration positions 0..T-1; a query at position t is
// P_t q̃ (rotate_half pairing: pair p = coordinates p and p + d/2, angle inv_freq[p]·t). With the pre-RoPE moment Σ̃
// taken as position-independent, each 2 x 2 block (row pair a, column pair b) splits into a rotation-like part that
// the average multiplies by S_T(θ_a − θ_b) and a reflection-like part multiplied by S_T(θ_a + θ_b), with
// S_T(ω) = (1/T) Σ_{t<T} e^{iωt}. So the metric of positions 0..T'-1 follows from the calibration one part by part
// as z · S_T'(ω) / S_T(ω); a part whose |S_T(ω)| < 0.1 carries nothing recoverable and is set to zero (for T' > T
// its S_T'(ω) is ~T/(πT') or less). A result with negative eigenvalues (Σ̃ is not exactly position-independent,
// and T' < T can amplify that) has them set to zero. metrics: per layer [num_kv_heads, d, d] (as add_error_feedback_tables takes);
// returns the same shape. T' == T returns the input unchanged. Throws oscar::Error on shape mismatches.
std::vector<std::vector<double>> key_metrics_for_context(const std::vector<std::vector<double>>& metrics,
                                                         std::span<const float> inv_freq, int64_t head_dim,
                                                         int64_t calibration_positions, int64_t serving_positions);

// The positions 0..N-1 the bundle's key tables were made for: Bundle::ef_key_context when set (format 1.3, or a
// bundle retargeted in memory), else the provenance option ef_context when calibrate had --ef-context, else the
// calibration sequences' length (calibration.seq_len). 0 when no layer has a table.
int64_t error_feedback_context(const fmt::Bundle& bundle);

// Adds tables to every whole-head INT2 tensor of `bundle` (K for k, K and V for kv) from per-layer metrics in the
// original basis: key_metrics[l] and value_metrics[l] are [num_kv_heads, d, d]. Segmented tensors keep RTN.
// Sets bundle.ef_clip_feedback. Returns how many (layer, tensor) pairs got a table. Deterministic.
int64_t add_error_feedback_tables(fmt::Bundle& bundle, const std::vector<std::vector<double>>& key_metrics,
                                  const ErrorFeedbackCalibration& options);

// Makes per-head metrics [heads, d, d] exactly symmetric (each off-diagonal pair -> its mean). A collected second
// moment is symmetric only up to the rounding of its accumulation order; the calibrator symmetrizes before making
// tables, so the stored metric (store_key_metrics) rebuilds the same tables.
void symmetrize_metric(std::vector<double>& metric, int64_t d);

// Format 1.3: stores each layer's collected key metric (per layer [num_kv_heads, d, d], the original basis, averaged
// over positions 0..positions-1, BEFORE any --ef-context carry) beside its key table, with the damping and the
// context the present key tables serve, so retarget_key_tables can rebuild them for another context. Layers
// without a key table store nothing. The stored metric is made exactly symmetric (symmetrize_metric).
void store_key_metrics(fmt::Bundle& bundle, const std::vector<std::vector<double>>& collected, int64_t positions,
                       int64_t key_context, double damp);

// Throws oscar::Error(where, why) unless the bundle's key tables can be rebuilt for another context: it has
// error-feedback tables and stores their key metric (not format 1.2, not calibrate --no-ef-key-metric).
void require_key_metric(const fmt::Bundle& bundle, const std::string& where);

// Rebuilds the key tables of every layer with a stored key metric for positions 0..context-1:
// key_metrics_for_context(stored, inv_freq, d, ef_metric_positions, context), then the factorization
// add_error_feedback_tables runs, with the stored damping. For the same context this gives the tables
// `oscar calibrate --ef-context context` writes, bit for bit. Value tables do not depend on positions and stay.
// Sets ef_key_context. Returns how many key tables were rebuilt (0 when context is already the tables' context).
// Throws oscar::Error when the bundle stores no key metric (format 1.2 or --no-ef-key-metric) or context <= 0.
int64_t retarget_key_tables(fmt::Bundle& bundle, std::span<const float> inv_freq, int64_t context);

// A copy of `bundle` whose key tables serve positions 0..context-1: retarget_key_tables with the RoPE frequencies
// of `cfg` (the bundle's checkpoint). Throws as retarget_key_tables.
fmt::Bundle bundle_for_context(const fmt::Bundle& bundle, const fmt::ModelConfig& cfg, int64_t context);

// Whether the layer's K (keys) or V tensor is stored as one whole-head INT2 segment (what a table needs).
bool whole_head_int2(const fmt::Bundle& bundle, size_t layer, bool keys);

// What the tables buy on held-out data, in their own metrics: per tensor kind, the relative error of round to
// nearest and of the bundle's error-feedback rounding (same rotation, clip, scale/zero), averaged over the layers
// whose tensor has a table (0 layers: both 0). Keys: Σ_h Σ_t eᵀ Σ_Q[h] e / Σ_h Σ_t yᵀ Σ_Q[h] y with the held-out
// queries' Σ_Q (HeldoutLayer::sigma_q); values: the same with the value weights w_t and value_metrics[l] (M_V, the
// original basis, as ErrorFeedbackCalibration::value_metrics; empty = no value row). At most 2048 samples per
// (layer, KV head), evenly strided. Deterministic (layers in parallel, summed in order).
struct ErrorFeedbackHeldout {
  double k_rtn = 0, k_ef = 0, v_rtn = 0, v_ef = 0;
  int64_t k_layers = 0, v_layers = 0;
};
ErrorFeedbackHeldout error_feedback_heldout_error(const fmt::Bundle& bundle, const std::vector<HeldoutLayer>& heldout,
                                                  const std::vector<std::vector<double>>& value_metrics);

}  // namespace oscar::calib
