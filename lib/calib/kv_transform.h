#pragma once
// calib::HeadTransform — a general invertible storage transform of one KV head's vectors, the step beyond an
// orthogonal rotation that error feedback makes pay (issue #10; docs/results.md, "Beyond rotations: centering and
// partial whitening under error feedback"):
//
//   y = (x − μ) · A,   A = W · R,   W = (Σ + ε·I)^(−α/2),   x̂ = ŷ · A⁻¹ + μ
//
// x a row vector (a post-RoPE key or a value), μ and Σ its mean and centered covariance on calibration text (μ = 0
// and Σ = the second moment when uncentered), ε = kWhiteningFloor · mean eigenvalue of Σ, α in [0, 1] (0: A = R;
// 1: full whitening), R the layer's orthogonal rotation. Why it is exact for attention: any invertible A is a
// change of basis the reader undoes (keys: q' = q · A⁻ᵀ, values: o = o' · A⁻¹), and a constant μ subtracted from
// every cached key shifts each query's logits by the constant q·μ, which the softmax drops. Why it helps: with
// error-feedback rounding the error in the metric H_y = A⁻¹ M A⁻ᵀ scales with the per-token range of y and
// det(H_y)^(1/d), so spreading the source's variance evenly over y (whitening) lowers it; at 2 bits a partial
// whitening (α 0.25–0.5) beats the full one, where the feedback saturates at the clamp.
//
// In the bundle since format 2.0 (fmt::LayerCalibration::k_transform ...; `oscar calibrate --transform whiten`),
// read by the CPU cache simulation (eval::CacheFormat), the GPU engine (kern::kv_write and decode_attention with a
// matrix per KV head: A and μ_K in every write, A⁻ᵀ on q and on the output) and `oscar export`. Also used by
// error_feedback_bench's --transform-study.
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "formats/bundle.h"
#include "lib/calib/error_report.h"

namespace oscar::calib {

// ε relative to the mean eigenvalue of Σ: keeps W finite along directions the calibration text never excites.
inline constexpr double kWhiteningFloor = 1e-3;

// Weighted first and second moments of d-dimensional vectors, fp64, accumulated in call order.
class MomentAccumulator {
 public:
  explicit MomentAccumulator(int64_t d);
  void add(std::span<const float> x, double weight = 1.0);  // x.size() == d
  int64_t dim() const { return d_; }
  double total_weight() const { return total_; }
  std::vector<double> mean() const;                         // [d]
  // [d, d] row-major: E[(x − c)(x − c)ᵀ] with c = mean() when centered, else 0 (the second moment).
  std::vector<double> covariance(bool centered) const;

 private:
  int64_t d_;
  double total_ = 0;
  std::vector<double> sum_, outer_;
};

struct HeadTransform {
  int64_t dim = 0;
  std::vector<double> mean;     // [d] μ
  std::vector<double> forward;  // [d, d] row-major A
  std::vector<double> inverse;  // [d, d] row-major A⁻¹
};

// A = W·R from μ and Σ (centered covariance, or the second moment with μ all zero). rotation: R row-major [d, d]
// (orthogonal; empty = identity). Throws oscar::Error(where, ...) on sizes, a non-finite Σ, α outside [0, 1] or a
// Σ with no positive eigenvalue.
HeadTransform whitening_transform(std::span<const double> mean, std::span<const double> covariance, int64_t d,
                                  double alpha, std::span<const double> rotation, const std::string& where);

// A metric M of the original basis (row-vector errors: cost e M eᵀ) in y's basis: A⁻¹ M A⁻ᵀ (for an orthogonal
// A = R this is metric_in_basis's Rᵀ M R).
std::vector<double> metric_in_transform_basis(std::span<const double> metric, const HeadTransform& t);

// Quantize-dequantize `rows` vectors x [rows, d] through the transform: y = (x − μ)·A (fp32), quantize_y(y, rows,
// ŷ) in y's basis, x̂ = ŷ·A⁻¹ + μ. x and out may alias.
using BasisQuantizer = std::function<void(std::span<const float> y, int64_t rows, std::span<float> y_hat)>;
void transform_fake_quantize(const HeadTransform& t, std::span<const float> x, int64_t rows,
                             const BasisQuantizer& quantize_y, std::span<float> out);

// One KV head's transform in the fp32 form a bundle stores and the cache writers use, as views (not owned): A and
// A⁻¹ [d, d] row-major, μ [d] (empty = zero). The form the CPU cache simulation keeps, so a per-token call does not
// convert d² numbers.
struct HeadTransformView {
  int64_t dim = 0;
  std::span<const float> forward, inverse, mean;
};
// The same arithmetic as the HeadTransform overload (which converts to fp32 and calls this one).
void transform_fake_quantize(const HeadTransformView& t, std::span<const float> x, int64_t rows,
                             const BasisQuantizer& quantize_y, std::span<float> out);
// KV head `kv_head`'s views into a layer's stored transform of K (keys) or V; throws as stored_transform.
HeadTransformView stored_transform_view(const fmt::LayerCalibration& layer, bool keys, int64_t kv_head, int64_t d,
                                        const std::string& where);

// ---- the bundle's transforms (format 2.0)

// Whether a layer's K (keys) or V tensor stores a transform.
bool has_transform(const fmt::LayerCalibration& layer, bool keys);
// KV head `kv_head`'s stored transform of that tensor as fp64 copies of the fp32 values (so every reader quantizes
// with exactly what the bundle holds); μ is zero for values. Throws oscar::Error(where) when the tensor has none or
// the arrays are too short.
HeadTransform stored_transform(const fmt::LayerCalibration& layer, bool keys, int64_t kv_head, int64_t d,
                               const std::string& where);

// --transform / --transform-alpha (`oscar calibrate`). Off in the library (its bundles stay 1.x); the CLI's default
// `auto` turns it on with error-feedback tables. Recorded in the provenance when on.
struct TransformCalibration {
  bool enabled = false;
  double alpha = 0.5;  // W = (Σ + εI)^(−α/2); 0.5 measured best through the product (docs/results.md)
  std::optional<double> value_alpha;  // the values' α when it differs from the keys' (--transform-alpha K,V)
  double alpha_for(bool keys) const { return keys ? alpha : value_alpha.value_or(alpha); }
  // "0.5", or "0.25,0.5" with a value α of its own: the provenance's transform_alpha and the report's.
  std::string alpha_text() const;
  // Both α in [0, 1], else oscar::Error("--transform-alpha", ...).
  void check_alphas() const;
};

// Fits a transform for every whole-head INT2 tensor of every layer from the held-out samples (HeldoutLayer, the
// sink excluded): keys centered, μ_K and Σ_K the plain mean and covariance of the head's keys; values uncentered,
// Σ_V their second moment with the held-out value weights w_t (the same weighting as the rotation's Σ_V). A = W·R
// with R the layer's stored rotation of the head's group, so α = 0 with a zero mean is the rotation itself. Must run
// before the error-feedback tables are made (they are made in A's basis). Returns the number of (layer, tensor)
// pairs given a transform. Deterministic (each head accumulated in sample order; layers in parallel).
// Throws oscar::Error when the held-out data does not match the bundle or a head has no samples.
int64_t add_storage_transforms(fmt::Bundle& bundle, const std::vector<HeldoutLayer>& heldout,
                               const TransformCalibration& options);

}  // namespace oscar::calib
