#include "kernels/probe/wgmma_probe.h"

#include <cuda_runtime.h>

#include "kernels/common/device_utils.cuh"
#include "kernels/common/wgmma.cuh"

namespace oscar::kern {
namespace {

constexpr int kM = 64, kK = 128;
constexpr uint32_t kRegionBytes64 = 64 * 128;    // 64 rows of 64 bf16
constexpr uint32_t kRegionBytes128 = 128 * 128;  // 128 rows of 64 bf16
constexpr int kSmemBytes = 2 * kRegionBytes64 + 2 * kRegionBytes128;  // A, then B (RsT's is the larger)

__device__ __forceinline__ uint32_t pack_bf16_pair(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

__global__ void __launch_bounds__(128) wgmma_probe_kernel(WgmmaProbeArgs p) {
  extern __shared__ __align__(1024) uint8_t smem[];
  uint8_t* a_s = smem;
  uint8_t* b_s = smem + 2 * kRegionBytes64;
  const int tid = threadIdx.x;
  // A: two K-major regions (k 0..63, 64..127) of 64 rows.
  for (int i = tid; i < kM * kK; i += 128) {
    const int r = i / kK, k = i % kK;
    *reinterpret_cast<uint16_t*>(a_s + (k / 64) * kRegionBytes64 + detail::sw128_offset(r, k % 64)) = p.a[i];
  }
  if (p.mode == WgmmaProbeMode::Ss) {
    for (int i = tid; i < 64 * kK; i += 128) {  // B rows are n, K contiguous: K-major like A
      const int n = i / kK, k = i % kK;
      *reinterpret_cast<uint16_t*>(b_s + (k / 64) * kRegionBytes64 + detail::sw128_offset(n, k % 64)) = p.b[i];
    }
  } else if (p.mode == WgmmaProbeMode::Rs8) {
    for (int i = tid; i < 8 * kK; i += 128) {  // 8 n rows, K contiguous: two K regions of 8 rows (1 KB each)
      const int n = i / kK, k = i % kK;
      *reinterpret_cast<uint16_t*>(b_s + (k / 64) * 1024 + detail::sw128_offset(n, k % 64)) = p.b[i];
    }
  } else if (p.mode == WgmmaProbeMode::Rs) {
    for (int i = tid; i < 128 * kK; i += 128) {  // B rows are n, K contiguous: two K regions of 128 n rows each
      const int n = i / kK, k = i % kK;
      *reinterpret_cast<uint16_t*>(b_s + (k / 64) * kRegionBytes128 + detail::sw128_offset(n, k % 64)) = p.b[i];
    }
  } else {
    for (int i = tid; i < kK * 128; i += 128) {  // B rows are k, N contiguous: two N atoms of 128 k rows each
      const int k = i / 128, n = i % 128;
      *reinterpret_cast<uint16_t*>(b_s + (n / 64) * kRegionBytes128 + detail::sw128_offset(k, n % 64)) = p.b[i];
    }
  }
  detail::fence_proxy_async_shared();
  __syncthreads();

  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  if (p.mode == WgmmaProbeMode::Ss) {
    float d[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) d[i] = 0.f;
    detail::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kK / 16; ++ks) {
      const uint32_t off = (ks / 4) * kRegionBytes64 + (ks % 4) * 32;
      detail::wgmma_m64n64k16_ss(d, detail::wgmma_desc_sw128(a_s + off, 16, 1024),
                                 detail::wgmma_desc_sw128(b_s + off, 16, 1024), ks > 0);
    }
    detail::wgmma_commit();
    detail::wgmma_wait<0>();
    detail::wgmma_fence_operands(d);
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = 16 * warp + g + 8 * (e >> 1), col = 8 * j + 2 * c + (e & 1);
        p.c[row * 64 + col] = d[4 * j + e];
      }
  } else {
    // A fragments of all 8 K steps from global memory (the m16n8k16 A layout for rows 16w..16w+15), then one
    // register fence before the wgmmas read them.
    uint32_t af[kK / 16][4];
    const int r0 = 16 * warp + g;
#pragma unroll
    for (int ks = 0; ks < kK / 16; ++ks) {
      const int k0 = 16 * ks + 2 * c;
      af[ks][0] = pack_bf16_pair(p.a[r0 * kK + k0], p.a[r0 * kK + k0 + 1]);
      af[ks][1] = pack_bf16_pair(p.a[(r0 + 8) * kK + k0], p.a[(r0 + 8) * kK + k0 + 1]);
      af[ks][2] = pack_bf16_pair(p.a[r0 * kK + k0 + 8], p.a[r0 * kK + k0 + 9]);
      af[ks][3] = pack_bf16_pair(p.a[(r0 + 8) * kK + k0 + 8], p.a[(r0 + 8) * kK + k0 + 9]);
    }
    if (p.mode == WgmmaProbeMode::Rs8) {
      float d8[4] = {0.f, 0.f, 0.f, 0.f};
      detail::wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kK / 16; ++ks)
        detail::wgmma_m64n8k16_rs(d8, af[ks], detail::wgmma_desc_sw128(b_s + (ks / 4) * 1024 + (ks % 4) * 32, 16, 1024),
                                  ks > 0);
      detail::wgmma_commit();
      detail::wgmma_wait<0>();
      detail::wgmma_fence_operands(d8);
#pragma unroll
      for (int e = 0; e < 4; ++e) p.c[(16 * warp + g + 8 * (e >> 1)) * 8 + 2 * c + (e & 1)] = d8[e];
      return;
    }
    float d[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) d[i] = 0.f;
    detail::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kK / 16; ++ks) {
      if (p.mode == WgmmaProbeMode::Rs)  // K-major B as the attention kernels' K tiles: 16 dims = 32 bytes a step
        detail::wgmma_m64n128k16_rs<false>(
            d, af[ks], detail::wgmma_desc_sw128(b_s + (ks / 4) * kRegionBytes128 + (ks % 4) * 32, 16, 1024), ks > 0);
      else
        detail::wgmma_m64n128k16_rs<true>(
            d, af[ks], detail::wgmma_desc_sw128(b_s + ks * 16 * 128, p.mn_lbo_bytes, p.mn_sbo_bytes), ks > 0);
    }
    detail::wgmma_commit();
    detail::wgmma_wait<0>();
    detail::wgmma_fence_operands(d);
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = 16 * warp + g + 8 * (e >> 1), col = 8 * j + 2 * c + (e & 1);
        p.c[row * 128 + col] = d[4 * j + e];
      }
  }
}

}  // namespace

Status wgmma_probe(const WgmmaProbeArgs& args, Stream stream) {
  if (!args.a || !args.b || !args.c) return Status::InvalidArgument;
  if (args.mode != WgmmaProbeMode::Ss && args.mode != WgmmaProbeMode::RsT && args.mode != WgmmaProbeMode::Rs &&
      args.mode != WgmmaProbeMode::Rs8)
    return Status::InvalidArgument;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
    return Status::CudaError;
  if (major != 9) return Status::Unsupported;  // wgmma is sm_90(a) only
#if !defined(OSCAR_WGMMA)
  return Status::Unsupported;  // built without sm_90a code: the kernel body is a trap
#endif
  static const cudaError_t opted_in =
      cudaFuncSetAttribute(wgmma_probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (opted_in != cudaSuccess) return Status::CudaError;
  wgmma_probe_kernel<<<1, 128, kSmemBytes, detail::to_cuda(stream)>>>(args);
  return cudaGetLastError() == cudaSuccess ? Status::Ok : Status::CudaError;
}

}  // namespace oscar::kern
