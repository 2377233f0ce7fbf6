#pragma once
// Shared by the CUDA benchmarks: deterministic random bf16 inputs and the D2D copy bandwidth reference.
// Random inputs: a hash of the element index and a seed gives u in
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

// cudaMemcpy device-to-device bandwidth (read + write bytes per second, GB/s) of 10 copies of 1 GiB after one warm-up:
// the reference the benchmarks report "% of D2D" against. 0 when a CUDA call fails.
inline double measure_d2d_gbps() {
  const size_t bytes = size_t(1) << 30;
  void *a = nullptr, *b = nullptr;
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  float ms = 0;
  const int reps = 10;
  bool ok = cudaMalloc(&a, bytes) == cudaSuccess && cudaMalloc(&b, bytes) == cudaSuccess &&
            cudaEventCreate(&e0) == cudaSuccess && cudaEventCreate(&e1) == cudaSuccess &&
            cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice) == cudaSuccess && cudaEventRecord(e0) == cudaSuccess;
  for (int r = 0; ok && r < reps; ++r) ok = cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice) == cudaSuccess;
  ok = ok && cudaEventRecord(e1) == cudaSuccess && cudaEventSynchronize(e1) == cudaSuccess &&
       cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess && ms > 0;
  if (a) cudaFree(a);
  if (b) cudaFree(b);
  if (e0) cudaEventDestroy(e0);
  if (e1) cudaEventDestroy(e1);
  return ok ? 2.0 * bytes * reps / (ms * 1e-3) / 1e9 : 0.0;
}

}  // namespace oscar::bench
