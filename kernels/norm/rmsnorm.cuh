#pragma once
#include "kernels/common/device_utils.cuh"

namespace oscar::kern::detail {

// One block per row. With kAddResidual the block first folds delta into the residual row (and writes it back),
// then normalizes the updated row; the second pass re-reads the row, which is still in L1/L2.
template <bool kAddResidual>
__global__ void rmsnorm_kernel(float* __restrict__ x, const float* __restrict__ delta, int64_t n,
                               const uint16_t* __restrict__ weight, float eps, uint16_t* __restrict__ out) {
  __shared__ float scratch[32];
  float* row = x + static_cast<int64_t>(blockIdx.x) * n;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    float v = row[i];
    if constexpr (kAddResidual) {
      v += delta[static_cast<int64_t>(blockIdx.x) * n + i];
      row[i] = v;
    }
    sum_sq += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq, scratch) / static_cast<float>(n) + eps);
  uint16_t* out_row = out + static_cast<int64_t>(blockIdx.x) * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    out_row[i] = float_to_bf16_bits(bf16_bits_to_float(weight[i]) * (row[i] * inv_rms));
}

// One warp per (row, head): head_dim <= 256 means at most 8 values per lane, kept in registers between the
// reduction and the scaling.
__global__ void head_rmsnorm_kernel(float* __restrict__ x, int64_t rows, int64_t row_stride, int heads,
                                    int head_dim, const uint16_t* __restrict__ weight, float eps) {
  const int64_t warp_global = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp_global >= rows * heads) return;
  const int64_t r = warp_global / heads;
  const int h = static_cast<int>(warp_global % heads);
  float* v = x + r * row_stride + static_cast<int64_t>(h) * head_dim;
  float vals[8];
  float sum_sq = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int i = lane + 32 * j;
    vals[j] = i < head_dim ? v[i] : 0.f;
    sum_sq += vals[j] * vals[j];
  }
  const float inv_rms = warp_inv_rms(sum_sq, head_dim, eps);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int i = lane + 32 * j;
    if (i < head_dim) v[i] = bf16_bits_to_float(weight[i]) * (vals[j] * inv_rms);
  }
}

}  // namespace oscar::kern::detail
