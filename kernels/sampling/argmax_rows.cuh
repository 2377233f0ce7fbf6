#pragma once
#include "kernels/common/device_utils.cuh"
#include "kernels/sampling/argmax_rows_rule.h"

namespace oscar::kern::detail {

inline constexpr int kArgmaxMaxThreads = 1024;
// float4 loads each thread has in flight per loop trip. One block per row means one block per SM at small batches,
// so the SM's bytes in flight (threads x kArgmaxUnroll x 16) set its share of memory bandwidth.
inline constexpr int kArgmaxUnroll = 4;

// A butterfly (xor) rather than a shift-down reduction: combine is commutative, so both lanes of every exchange
// compute the same candidate and all lanes end with the warp's result.
__device__ __forceinline__ ArgmaxCandidate warp_argmax(ArgmaxCandidate c) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    ArgmaxCandidate other;
    other.value = __shfl_xor_sync(0xffffffffu, c.value, offset);
    other.index = __shfl_xor_sync(0xffffffffu, c.index, offset);
    c = argmax_combine(c, other);
  }
  return c;
}

__device__ __forceinline__ void argmax_scan_float4(ArgmaxCandidate& acc, float4 v, int32_t first) {
  argmax_scan_step(acc, v.x, first);
  argmax_scan_step(acc, v.y, first + 1);
  argmax_scan_step(acc, v.z, first + 2);
  argmax_scan_step(acc, v.w, first + 3);
}

// One block per row; blockDim.x a multiple of 32 (full-mask shuffles). Each thread walks its elements in increasing
// index order with argmax_scan_step (the exactness argument is in argmax_rows_rule.h): first the scalar head up to
// the row's first 16-byte boundary, then float4s, then the scalar tail. Thread 0 also folds in x[0] through the full
// combine, which is what makes a NaN at index 0 win.
__global__ void __launch_bounds__(kArgmaxMaxThreads)
    argmax_rows_kernel(const float* __restrict__ logits, int64_t cols, int64_t row_stride, int32_t* __restrict__ out) {
  __shared__ ArgmaxCandidate scratch[32];
  const float* row = logits + static_cast<int64_t>(blockIdx.x) * row_stride;
  const int64_t tid = threadIdx.x, nthreads = blockDim.x;

  // A row start that is not even 4-byte aligned can never reach a 16-byte boundary in whole floats: all scalar.
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  const int64_t head = addr % 4 != 0 ? cols : min(cols, static_cast<int64_t>((16 - addr % 16) % 16 / 4));
  const int64_t n4 = (cols - head) / 4;
  const float4* body = reinterpret_cast<const float4*>(row + head);

  ArgmaxCandidate acc = argmax_scan_start();
  for (int64_t i = tid; i < head; i += nthreads) argmax_scan_step(acc, row[i], static_cast<int32_t>(i));
  int64_t k = tid;
  for (; k + (kArgmaxUnroll - 1) * nthreads < n4; k += kArgmaxUnroll * nthreads) {
    float4 v[kArgmaxUnroll];
#pragma unroll
    for (int u = 0; u < kArgmaxUnroll; ++u) v[u] = __ldg(body + k + u * nthreads);  // all loads before any compare
#pragma unroll
    for (int u = 0; u < kArgmaxUnroll; ++u)
      argmax_scan_float4(acc, v[u], static_cast<int32_t>(head + 4 * (k + u * nthreads)));
  }
  for (; k < n4; k += nthreads) argmax_scan_float4(acc, __ldg(body + k), static_cast<int32_t>(head + 4 * k));
  for (int64_t i = head + 4 * n4 + tid; i < cols; i += nthreads)
    argmax_scan_step(acc, row[i], static_cast<int32_t>(i));
  if (tid == 0) acc = argmax_combine(acc, ArgmaxCandidate{row[0], 0});

  acc = warp_argmax(acc);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = (blockDim.x + 31) >> 5;
  if (lane == 0) scratch[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = warp_argmax(lane < num_warps ? scratch[lane] : argmax_identity());
    if (lane == 0) out[blockIdx.x] = acc.index;
  }
}

}  // namespace oscar::kern::detail
