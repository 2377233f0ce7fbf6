#pragma once
// Hopper TMA (cp.async.bulk.tensor) and mbarrier building blocks, sm_90 (`__CUDA_ARCH__ >= 900`): what a kernel
// with a producer (a thread or a warp) needs to stream tiles into shared memory and hand them to its consumers.
//
// Protocol (one stage of a ring): the producer arms full[s] with the bytes it expects (arrive.expect_tx, count 1)
// and issues the tensor copies, which complete the transaction on full[s]; consumers wait on full[s]'s parity,
// read the stage, and arrive on empty[s] (count = consumer threads); the producer waits on empty[s] before it
// refills the stage. Use n of a barrier completes its phase n, so a waiter asks for parity n & 1.
// The descriptor (CUtensorMap) is made on the host with cuTensorMapEncodeTiled and passed as a __grid_constant__
// kernel parameter; its address is what the copy instruction takes.
#include <cstdint>

namespace oscar::kern::detail::tma {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
#endif
}

// Makes the initialized barriers visible to the async proxy (the TMA unit) and to the other threads, before the
// block-wide barrier that follows it.
__device__ __forceinline__ void fence_mbarrier_init() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// The barrier by its shared-memory address (smem_addr), for kernels that keep 32-bit shared addresses in registers.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  mbarrier_arrive_expect_tx(smem_addr(bar), bytes);
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}

// Spins until the phase of the given parity has completed. A C++ loop around try_wait rather than labels in the
// asm: an inlined asm block may appear many times in one function, and PTX labels must be unique.
// kClusterScope: acquire at cluster scope, for a barrier that peer CTAs arrive on (their reads of a stage happen
// before this thread's refill of it); CTA scope otherwise.
template <bool kClusterScope = false>
__device__ __forceinline__ void mbarrier_wait(uint32_t addr, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t done = 0;
  do {
    if constexpr (kClusterScope)
      asm volatile(
          "{\n.reg .pred p;\nmbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
          "selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(addr), "r"(parity)
          : "memory");
    else
      asm volatile(
          "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(addr), "r"(parity)
          : "memory");
  } while (!done);
#endif
}
// The same wait as one asm statement with its loop inside (labels in a { } block are local to it, as CUTLASS's
// ClusterBarrier::wait has them): the calling loop's body stays one basic block for the register allocator.
__device__ __forceinline__ void mbarrier_wait_asm_loop(uint32_t addr, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n.reg .pred p;\nWAIT_%=:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra WAIT_%=;\n}\n" ::"r"(addr),
      "r"(parity)
      : "memory");
#endif
}
template <bool kClusterScope = false>
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  mbarrier_wait<kClusterScope>(smem_addr(bar), parity);
}

// One box of a 2-D tensor map at coordinates (c0 = innermost, c1) into shared memory `dst` (aligned as the
// descriptor's swizzle requires: 1024 bytes for 128B), completing `bytes of the box` on `bar`. Rows outside the
// tensor are zero-filled by the hardware.
__device__ __forceinline__ void load_2d(void* dst, const void* tensor_map, int32_t c0, int32_t c1, uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(smem_addr(bar))
      : "memory");
#endif
}

// Orders this thread's generic-proxy shared-memory accesses before later async-proxy ones (a TMA copy refilling
// memory the threads just read).
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// `bytes` contiguous bytes from global `src` into shared `dst` (both 16-byte aligned, bytes a multiple of 16) by
// the TMA unit, completing `bytes` on `bar`: a non-tensor bulk copy, one instruction for what takes a warp
// bytes/512 rounds of cp.async (and their address arithmetic) otherwise.
// dst and bar are shared-memory addresses (smem_addr).
__device__ __forceinline__ void load_bulk(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
#endif
}

// --- Clusters (prefill v12: two CTAs share each K/V tile through a multicast copy) ---

// This CTA's rank in its cluster.
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t rank = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
#endif
  return rank;
}

// Every thread of every CTA of the cluster: arrive (release) and wait (acquire). Orders the barrier inits before the
// peers' remote arrivals and multicast copies, and keeps a CTA's shared memory alive until its peers are done
// writing to it.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

// Arrive on the barrier at the same shared-memory offset as `bar` in cluster CTA `rank` (release at cluster scope:
// this thread's earlier reads of the stage happen before the peer's refill).
__device__ __forceinline__ void mbarrier_arrive_cluster(uint64_t* bar, uint32_t rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [remote];\n}\n" ::"r"(smem_addr(bar)),
      "r"(rank)
      : "memory");
#endif
}

// load_2d into the same offset `dst` of every CTA in `cta_mask` (bit r = cluster rank r), completing the box's bytes
// on the barrier at `bar`'s offset in each of them.
__device__ __forceinline__ void load_2d_multicast(void* dst, const void* tensor_map, int32_t c0, int32_t c1,
                                                  uint64_t* bar, uint16_t cta_mask) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(smem_addr(bar)), "h"(cta_mask)
      : "memory");
#endif
}

}  // namespace oscar::kern::detail::tma
