#include <cmath>

#include "kernels/norm/rmsnorm.h"

namespace oscar::kern {

namespace {
void normalize_row(const float* x, int64_t n, const float* weight, float eps, float* out) {
  double sum_sq = 0;
  for (int64_t i = 0; i < n; ++i) sum_sq += static_cast<double>(x[i]) * x[i];
  const float inv_rms = static_cast<float>(1.0 / std::sqrt(sum_sq / static_cast<double>(n) + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * inv_rms);
}
}  // namespace

void rmsnorm_ref(const float* x, int64_t rows, int64_t n, const float* weight, float eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) normalize_row(x + r * n, n, weight, eps, out + r * n);
}

void add_rmsnorm_ref(float* residual, const float* delta, int64_t rows, int64_t n, const float* weight, float eps,
                     float* out) {
  for (int64_t i = 0; i < rows * n; ++i) residual[i] += delta[i];
  rmsnorm_ref(residual, rows, n, weight, eps, out);
}

void head_rmsnorm_ref(float* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
                      const float* weight, float eps) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + r * row_stride + h * head_dim;
      normalize_row(v, head_dim, weight, eps, v);  // in place is safe: the mean square is taken first
    }
}

}  // namespace oscar::kern
