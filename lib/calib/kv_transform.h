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
// Not yet in the bundle or the runtime (docs/method.md says what a product version needs); used by
// error_feedback_bench's --transform-study.
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

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

}  // namespace oscar::calib
