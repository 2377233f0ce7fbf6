#include "kernels/probe/tma_probe.h"

#include <cuda.h>
#include <cuda_runtime.h>

#include "kernels/common/device_utils.cuh"
#include "kernels/common/tma.cuh"
#include "kernels/common/tma_host.h"
#include "kernels/common/wgmma.cuh"  // sw128_offset: the layout the copies write

namespace oscar::kern {
namespace {

constexpr int kRows = 64, kCols = 128, kThreads = 256, kStages = 2;
constexpr uint32_t kRegionBytes = kRows * 128;          // 64 rows of 64 bf16
constexpr uint32_t kStageBytes = 2 * kRegionBytes;      // columns 0..63, 64..127
constexpr uint32_t kBarrierOffset = kStages * kStageBytes;
constexpr uint32_t kSmemBytes = kBarrierOffset + 2 * kStages * 8 + 1024;  // + full/empty, + alignment slack

__global__ void __launch_bounds__(kThreads, 1)
    tma_cluster_probe_kernel(TmaClusterProbeArgs p, const __grid_constant__ CUtensorMap map) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kBarrierOffset);
  uint64_t* empty = full + kStages;
  const int tid = threadIdx.x, lane = tid & 31;
  const uint32_t rank = detail::tma::cluster_ctarank();
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      detail::tma::mbarrier_init(full + s, 1);
      detail::tma::mbarrier_init(empty + s, 2 * kThreads / 32);
    }
    detail::tma::fence_mbarrier_init();
  }
  detail::tma::cluster_sync();
  // Thread 0: this CTA's half of tile r (its 64 columns) into stage r % 2 of both CTAs; its own barrier expects both
  // halves.
  auto issue = [&](int r) {
    const int s = r % kStages;
    detail::tma::mbarrier_arrive_expect_tx(full + s, kStageBytes);
    detail::tma::load_2d_multicast(smem + s * kStageBytes + rank * kRegionBytes, &map, 64 * static_cast<int>(rank),
                                   r * kRows, full + s, 0x3);
  };
  if (tid == 0)
    for (int r = 0; r < kStages && r < p.rounds; ++r) issue(r);
  for (int r = 0; r < p.rounds; ++r) {
    const int s = r % kStages;
    detail::tma::mbarrier_wait(full + s, (r / kStages) & 1);
    const uint8_t* stage = smem + s * kStageBytes;
    uint16_t* out = p.dst + (static_cast<int64_t>(rank) * p.rounds + r) * kRows * kCols;
    for (int i = tid; i < kRows * kCols; i += kThreads) {
      const int row = i / kCols, col = i % kCols;
      out[i] = *reinterpret_cast<const uint16_t*>(stage + (col / 64) * kRegionBytes +
                                                  detail::sw128_offset(row, col % 64));
    }
    __syncwarp();
    if (lane == 0) {
      detail::tma::mbarrier_arrive(empty + s);
      detail::tma::mbarrier_arrive_cluster(empty + s, rank ^ 1u);
    }
    if (tid == 0 && r + kStages < p.rounds) {
      detail::tma::mbarrier_wait<true>(empty + s, (r / kStages) & 1);
      issue(r + kStages);
    }
  }
  detail::tma::cluster_sync();  // the peer's last arrivals on this CTA's barriers have landed
#else
  __trap();
#endif
}

}  // namespace

Status tma_cluster_probe(const TmaClusterProbeArgs& args, Stream stream) {
  if (!args.src || !args.dst || args.rounds < 1) return Status::InvalidArgument;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
    return Status::CudaError;
  if (major < 9 || !detail::tma_encode_available()) return Status::Unsupported;
  CUtensorMap map{};
  if (!detail::tma_encode_bf16_sw128(&map, args.src, kCols, static_cast<uint64_t>(args.rounds) * kRows, kCols, 64,
                                     kRows))
    return Status::InvalidArgument;
  if (cudaFuncSetAttribute(tma_cluster_probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes) !=
      cudaSuccess)
    return Status::CudaError;
  return detail::launch_cta_pairs(tma_cluster_probe_kernel, 2, kThreads, kSmemBytes, detail::to_cuda(stream), args,
                                  map) == cudaSuccess
             ? Status::Ok
             : Status::CudaError;
}

}  // namespace oscar::kern
