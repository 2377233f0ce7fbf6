#pragma once
#include "kernels/common/device_utils.cuh"

namespace oscar::kern::detail {

// One block per token; threads stride over the hidden dimension so consecutive threads read consecutive
// 2-byte elements of the row (coalesced) and write consecutive floats.
__global__ void embedding_gather_kernel(const int32_t* __restrict__ ids, const uint16_t* __restrict__ table,
                                        int64_t vocab, int64_t hidden, float* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const int32_t id = ids[t];
  float* row = out + t * hidden;
  if (id < 0 || id >= vocab) {
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) row[i] = 0.f;
    return;
  }
  const uint16_t* src = table + static_cast<int64_t>(id) * hidden;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) row[i] = bf16_bits_to_float(src[i]);
}

}  // namespace oscar::kern::detail
