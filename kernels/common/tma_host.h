#pragma once
// Host side of kernels/common/tma.cuh: the 2-D bf16 tensor maps the TMA copies read, made with the driver's
// cuTensorMapEncodeTiled fetched through the runtime (no libcuda link). Shared by prefill attention v7+ and the TMA
// probe (kernels/probe/tma_probe.h).
#include <cuda.h>  // CUtensorMap
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

namespace oscar::kern::detail {

// Whether the driver the runtime loaded has cuTensorMapEncodeTiled.
bool tma_encode_available();

// A [rows][cols] bf16 matrix at `base` (row stride in elements), boxes of box_cols × box_rows, 128-byte swizzle (the
// layout the wgmma SW128 descriptors read; box_cols must be 64: one 128-byte swizzle span). Rows past `rows` read
// as zeros. False when the driver has no encoder or refuses the layout.
bool tma_encode_bf16_sw128(CUtensorMap* map, const void* base, uint64_t cols, uint64_t rows, uint64_t row_stride,
                           uint32_t box_cols, uint32_t box_rows);

// Launches `kernel` on `blocks` blocks (an even count) as clusters of two consecutive blocks, the shape the
// multicast kernels pair their CTAs in (prefill v12+, the TMA probe). The launch's error, as cudaLaunchKernelEx
// returns it (and leaves it for cudaGetLastError).
template <typename... Params, typename... Args>
cudaError_t launch_cta_pairs(void (*kernel)(Params...), unsigned blocks, unsigned threads, size_t smem_bytes,
                             cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = 2;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace oscar::kern::detail
