#pragma once
// Error-feedback (GPTQ/OBQ-style) rounding of one head vector in an error metric M (issue #10; docs/method.md,
// "Error-feedback rounding"). The storage format is exactly the reference quantizer's (quantizer_ref.h): same
// rotation, same per-token clip, same fp16 scale/zero from the clipped min/max, same 2-bit codes and dequantizer —
// only WHICH code each element gets changes, so a decode kernel reads the result unchanged.
//
// Why: the error that matters for a key is the logit error q·e, i.e. the cost eᵀ M_K e with M_K = E[q qᵀ]; for a
// value it is the o_proj output error, eᵀ W_oᵀ W_o e. Round-to-nearest minimizes ‖e‖², which is the right cost
// only when M is diagonal in the storage basis. With a non-diagonal M, rounding coordinate i and pushing its error
// (through the Cholesky factor of M⁻¹) onto the coordinates not yet rounded lets later roundings cancel it along
// the directions M weighs most — noise shaping. Scale and zero are NOT recomputed (the decode reads them), so
// coordinates near the range ends cannot absorb feedback: the codes clamp to [0, 2^bits − 1].
//
// Precomputation (once per layer / KV head / tensor): H = M + damp · mean(diag M) · I, an order (descending
// diag H: "act order", or the natural order), U = the upper Cholesky factor of H⁻¹ in that order (H⁻¹ = UᵀU).
// Per token, on the clipped rotated vector y with params p = int_params(y) (the RTN parameters):
//   w = y (or the unclipped rotated vector, option feedback_clip_error);
//   for i in order: code_i = RTN code of w_i (int_codes on one element); err = (w_i − dequant(code_i)) / U_ii;
//                   w_j −= err · U_ij for every j after i in the order.
// With a diagonal M, U is diagonal and the codes are bit-identical to int_codes (tests/calib/test_error_feedback).
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "lib/calib/quantizer_ref.h"

namespace oscar::calib {

struct ErrorFeedbackOptions {
  double damp = 0.01;        // relative to mean(diag M); keeps H⁻¹ well conditioned (GPTQ's percdamp)
  bool act_order = true;     // round the coordinates M weighs most first (they get no feedback, all others do)
  // Feed back the clipping error of clipped coordinates too (target = unclipped rotated vector): the clipped
  // outlier's loss is then partly recovered by its neighbours. Off = target is the clipped vector (the RTN target).
  bool feedback_clip_error = false;
  // Alternate rounding with a refit of the token's (scale, zero) by least squares in H (both fp16), at most this many
  // times, keeping a refit only while it lowers the token's error (y - x̂)ᵀ H (y - x̂) against the unclipped y.
  // 0 = the RTN (scale, zero) of the clipped vector, the stored form's rule.
  int refit_iters = 0;
  // With refits: round again with the refitted (scale, zero) (true), or keep the first rounding's codes and only
  // replace the params (false: one least-squares solve per token, no second rounding pass).
  bool refit_reround = true;
  // Per-token clip search: besides the tensor's clip ratio, round each token at each of these clip ratios too and
  // keep the rounding with the least error in H against the unclipped vector. With clip feedback that error is
  // Σ_k (e_k / U_kk)², e_k the fed-back error of step k (w − ŵ = Uᵀ·(e/diag U) and U H Uᵀ = I), so a writer needs
  // only U's diagonal beside the stored weights. Requires feedback_clip_error (otherwise the targets differ).
  std::vector<float> token_clips;
};

// The per-(layer, KV head, tensor) table a cache writer needs: order + U (what a bundle would store).
struct ErrorFeedbackTable {
  int64_t dim = 0;
  std::vector<int32_t> order;  // [d] coordinate rounded at step k
  std::vector<double> u;       // [d, d] row-major, upper triangular, in `order` coordinates: u[k*d + m], m >= k
  bool feedback_clip_error = false;
  int refit_iters = 0;
  bool refit_reround = true;
  std::vector<float> token_clips;
  std::vector<double> metric;  // [d, d] H = M + damping, natural coordinates (used by the refit only)
  bool diagonal() const;       // no off-diagonal term: the rounding is plain RTN
};

// metric: [d, d] row-major symmetric positive semi-definite, in the STORAGE (rotated) basis. Throws
// oscar::Error(where, ...) on a non-finite metric, a non-positive diagonal mean or a failed factorization.
ErrorFeedbackTable error_feedback_table(std::span<const double> metric, int64_t d, const ErrorFeedbackOptions& options,
                                        const std::string& where);

// M in the storage basis of rotation R (row-major [d, d]; empty = identity): Rᵀ M R (y = x R, so e_x = e_y Rᵀ).
std::vector<double> metric_in_basis(std::span<const double> metric, std::span<const double> rotation, int64_t d);

// Codes of one rotated vector y (d floats, NOT yet clipped) for a whole-head segment of `bits`: clips a copy of y
// with clip_ratio exactly as the reference quantizer, takes the RTN params of the clipped vector, then rounds with
// feedback. codes.size() == d; returns the params (bit-identical to quantize_int2's for bits 2 when refit_iters is
// 0; with refits, the params of the best refit).
IntParams error_feedback_codes(std::span<const float> y, float clip_ratio, int32_t bits,
                               const ErrorFeedbackTable& table, std::span<uint8_t> codes);

// Quantize-dequantize `rows` head vectors x [rows, d] (original basis) with rotation (row-major float [d, d] or
// empty), whole-head `bits`, clip and table; out in the original basis (x and out may alias).
void error_feedback_fake_quantize(std::span<const float> x, int64_t rows, std::span<const float> rotation,
                                  float clip_ratio, int32_t bits, const ErrorFeedbackTable& table, std::span<float> out);

// ---------------------------------------------------------------------------------------------------------------
// The stored form (bundle format 1.2, fmt::LayerCalibration::*_ef_order / *_ef_weights) and the rounding every
// cache writer runs from it: the engine's kv_write kernel, its CPU reference and eval's simulated cache. fp32 and
// one fixed operation order, so the GPU writer can match the CPU bit for bit:
//   weights[k*d + m] = U[k][m] / U[k][k] for m > k (zero otherwise), U in `order` coordinates as above;
//   w = target (unclipped rotated vector with clip_feedback, else the clipped one), fp32;
//   for k = 0..d-1: i = order[k]; code_i = int_codes of w[i] with the RTN params of the clipped vector;
//                   e = w[i] - int_dequant(code_i); for m = k+1..d-1 ascending: w[order[m]] = fmaf(-e, weights[k*d+m], w[order[m]]).
void stored_error_feedback(const ErrorFeedbackTable& table, std::span<int32_t> order, std::span<float> weights);

// KV head `head`'s slice of a layer's stored tables (order [kv_heads, d], weights [kv_heads, d, d], as the bundle,
// the engine's and eval's cache formats keep them): the spans error_feedback_codes_stored and
// error_feedback_encode_record take.
struct HeadTable {
  std::span<const int32_t> order;
  std::span<const float> weights;
};
inline HeadTable head_table(std::span<const int32_t> order, std::span<const float> weights, int64_t head, int64_t d) {
  return {order.subspan(static_cast<size_t>(head * d), static_cast<size_t>(d)),
          weights.subspan(static_cast<size_t>(head * d * d), static_cast<size_t>(d * d))};
}

// Codes of one rotated, not yet clipped vector y (d floats) from a stored table (order [d], weights [d, d]).
// Returns the RTN params of the clipped vector (what the record stores). Throws oscar::Error on size mismatches.
IntParams error_feedback_codes_stored(std::span<const float> y, float clip_ratio, int32_t bits,
                                      std::span<const int32_t> order, std::span<const float> weights,
                                      bool clip_feedback, std::span<uint8_t> codes);

// The whole-head record (formats/kv_layout.h: the layout HeadQuantizer writes for one `bits`-wide segment [0, d) —
// packed codes, then fp16 scale and zero) of x (original basis, d floats) written with a stored table: the bytes
// every error-feedback writer stores. rotation row-major [d, d] or empty (identity); record holds
// fmt::packed_bytes(d, bits) + 4 bytes. Throws oscar::Error on size mismatches.
void error_feedback_encode_record(std::span<const float> x, std::span<const float> rotation, float clip_ratio,
                                  int32_t bits, std::span<const int32_t> order, std::span<const float> weights,
                                  bool clip_feedback, std::span<uint8_t> record);

// error_feedback_fake_quantize with a stored table: quantize-dequantize `rows` head vectors x [rows, d] (original
// basis) through rotation (row-major [d, d] or empty), clip and error_feedback_codes_stored; x and out may alias.
void error_feedback_fake_quantize_stored(std::span<const float> x, int64_t rows, std::span<const float> rotation,
                                         float clip_ratio, int32_t bits, std::span<const int32_t> order,
                                         std::span<const float> weights, bool clip_feedback, std::span<float> out);

}  // namespace oscar::calib
