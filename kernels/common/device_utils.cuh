#pragma once
// Small device helpers shared by the forward-pass kernels: bf16 bit casts and warp reductions.
// Activations cross kernel boundaries as bf16 *bits* (uint16_t) in the launcher headers, so host code needs no
// CUDA headers; device code reinterprets them as __nv_bfloat16 here.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/common/status.h"

namespace oscar::kern::detail {

__device__ __forceinline__ float bf16_bits_to_float(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}
__device__ __forceinline__ uint16_t float_to_bf16_bits(float x) {
  // __float2bfloat16_rn rounds to nearest-even, as torch's .to(bfloat16) and fmt::f32_to_bf16 do.
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// 1/rms of a vector whose squares are spread over a warp (each lane passes its partial sum).
__device__ __forceinline__ float warp_inv_rms(float partial_sum_sq, int n, float eps) {
  return rsqrtf(warp_sum(partial_sum_sq) / static_cast<float>(n) + eps);
}

// Block-wide sum in a fixed order (warp butterflies, then warp 0 over the per-warp partials), so a row always
// reduces the same way for a given block size: results are bit-reproducible run to run.
__device__ __forceinline__ float block_sum(float x, float* scratch /* >= 32 floats of shared memory */) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = (blockDim.x + 31) >> 5;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float total = 0.f;
  if (warp == 0) {
    total = lane < num_warps ? scratch[lane] : 0.f;
    total = warp_sum(total);
    if (lane == 0) scratch[0] = total;
  }
  __syncthreads();
  total = scratch[0];
  __syncthreads();  // scratch may be reused right after
  return total;
}

inline Status launch_status() {
  return cudaGetLastError() == cudaSuccess ? Status::Ok : Status::CudaError;
}

inline cudaStream_t to_cuda(Stream s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace oscar::kern::detail
