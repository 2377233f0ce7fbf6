#pragma once
#include "kernels/common/device_utils.cuh"

namespace oscar::kern::detail {

__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.f + expf(-g)) * u; }

// kVec8: inter % 8 == 0 and 16-byte aligned rows, so each thread moves 8 bf16 (one 128-bit load per operand);
// otherwise a scalar path. Grid-stride over all rows*inter (or rows*inter/8) elements.
template <bool kVec8>
__global__ void swiglu_kernel(const uint16_t* __restrict__ gate_up, int64_t rows, int64_t inter,
                              uint16_t* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if constexpr (kVec8) {
    const int64_t groups_per_row = inter / 8;
    for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < rows * groups_per_row;
         g += stride) {
      const int64_t r = g / groups_per_row, i = (g % groups_per_row) * 8;
      const uint4 gv = *reinterpret_cast<const uint4*>(gate_up + r * 2 * inter + i);
      const uint4 uv = *reinterpret_cast<const uint4*>(gate_up + r * 2 * inter + inter + i);
      const uint16_t* gs = reinterpret_cast<const uint16_t*>(&gv);
      const uint16_t* us = reinterpret_cast<const uint16_t*>(&uv);
      uint4 ov;
      uint16_t* os = reinterpret_cast<uint16_t*>(&ov);
#pragma unroll
      for (int k = 0; k < 8; ++k) os[k] = float_to_bf16_bits(silu_times(bf16_bits_to_float(gs[k]), bf16_bits_to_float(us[k])));
      *reinterpret_cast<uint4*>(out + r * inter + i) = ov;
    }
  } else {
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < rows * inter; e += stride) {
      const int64_t r = e / inter, i = e % inter;
      out[e] = float_to_bf16_bits(silu_times(bf16_bits_to_float(gate_up[r * 2 * inter + i]),
                                             bf16_bits_to_float(gate_up[r * 2 * inter + inter + i])));
    }
  }
}

}  // namespace oscar::kern::detail
