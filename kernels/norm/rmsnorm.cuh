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

// Vector path (n % 4 == 0, 16-byte aligned rows, n <= 4 * kVec * blockDim): each thread keeps its kVec float4s of
// the row in registers between the sum of squares and the scaling, so the row is read once and every access is 16
// bytes (8 for the bf16 output). The scalar kernel above re-reads the row and issues 4-byte accesses, which kept
// add_rmsnorm under the copy bandwidth at 16K-token batches.
template <bool kAddResidual, int kVec>
__global__ void rmsnorm_vec_kernel(float* __restrict__ x, const float* __restrict__ delta, int64_t n,
                                   const uint16_t* __restrict__ weight, float eps, uint16_t* __restrict__ out) {
  __shared__ float scratch[32];
  const int64_t n4 = n / 4;
  float4* row = reinterpret_cast<float4*>(x + static_cast<int64_t>(blockIdx.x) * n);
  const float4* drow = kAddResidual ? reinterpret_cast<const float4*>(delta + static_cast<int64_t>(blockIdx.x) * n)
                                    : nullptr;
  float4 v[kVec];
  float sum_sq = 0.f;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    v[k] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (i < n4) {
      v[k] = row[i];
      if constexpr (kAddResidual) {
        const float4 dv = drow[i];
        v[k].x += dv.x, v[k].y += dv.y, v[k].z += dv.z, v[k].w += dv.w;
        row[i] = v[k];
      }
    }
    sum_sq += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq, scratch) / static_cast<float>(n) + eps);
  uint2* out_row = reinterpret_cast<uint2*>(out + static_cast<int64_t>(blockIdx.x) * n);
  const uint2* w2 = reinterpret_cast<const uint2*>(weight);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (i >= n4) continue;
    const uint2 w = w2[i];
    const float y0 = __uint_as_float(w.x << 16) * (v[k].x * inv_rms);
    const float y1 = __uint_as_float(w.x & 0xffff0000u) * (v[k].y * inv_rms);
    const float y2 = __uint_as_float(w.y << 16) * (v[k].z * inv_rms);
    const float y3 = __uint_as_float(w.y & 0xffff0000u) * (v[k].w * inv_rms);
    uint2 o;
    o.x = static_cast<uint32_t>(float_to_bf16_bits(y0)) | (static_cast<uint32_t>(float_to_bf16_bits(y1)) << 16);
    o.y = static_cast<uint32_t>(float_to_bf16_bits(y2)) | (static_cast<uint32_t>(float_to_bf16_bits(y3)) << 16);
    out_row[i] = o;
  }
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
