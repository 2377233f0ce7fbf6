#pragma once
// Deterministic random bf16 inputs for the CUDA benchmarks: a hash of the element index and a seed gives u in
// [0, 1) (24 bits), the element is lo + (hi − lo)·u rounded to nearest-even bf16. The timings do not depend on the
// values; the fixed hash keeps every run's inputs the same.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/common/device_utils.cuh"

namespace oscar::bench {

__global__ void fill_uniform_bf16(uint16_t* out, int64_t n, uint32_t seed, float lo, float hi) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 15;
    x *= 0x2c1b3c6du;
    x ^= x >> 12;
    const float u = static_cast<float>(x >> 8) * (1.0f / 16777216.0f);
    out[i] = kern::detail::float_to_bf16_bits(fmaf(hi - lo, u, lo));
  }
}

}  // namespace oscar::bench
