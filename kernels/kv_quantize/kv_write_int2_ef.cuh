#pragma once
// Device code of the INT2 quantize-on-write with error-feedback rounding (issue #10; KvWriteParams::ef_order /
// ef_weights). The stored form of lib/calib/error_feedback.h, step for step in fp32, so codes are bit-identical to
// calib::error_feedback_codes_stored (and kv_write_ref).
//
// Rotation, clip threshold and fp16 (scale, zero) are the tiled RTN writer's (kv_write_int2.cuh, same helpers).
// Only the rounding differs, and it is sequential over the d steps of the table's order: step k rounds coordinate
// order[k] and feeds its error into every coordinate later in the order. A warp keeps a tile of M tokens of one KV
// head in registers and runs the d steps for all M tokens at once, so each weight row is read once per tile rather
// than once per token. Unlike the RTN writer, lane l's register slot j holds the coordinate of STEP 32*j + l
// (cols[j] = order[32*j + l]; R's columns are permuted to match when it is staged), so a block of steps belongs to
// consecutive lanes of one slot, and once a block starts in slot j0 every slot below it is finished and skipped
// (~5/8 of the updates of a layout by coordinate). The steps go in blocks of kEfBlock:
//   1. the kEfBlock owner lanes of the block's steps write their M tokens' running targets to shared memory (float4
//      stores through a warp-uniform branch on the slot), and lane t reads token t's B targets;
//   2. lane t runs the block's B steps alone: round with token t's params (the RTN arithmetic, with the reciprocal
//      of the scale where it provably gives the division's code: int2_ef_code), e = w - dequant, feed e into the
//      block's later steps; codes go to a byte array in the warp's (now free) x tile and the negated errors to
//      shared memory;
//   3. every lane applies the block's B errors to each live slot, fmaf(-e, weights[k][32*j + l], w) in increasing
//      k (a row of the table read contiguously across the warp). Every coordinate thus gets its updates in the CPU
//      loop's order, one fmaf each: bit-exact.
// min/max find the zero's sign of calib::int_params (first / last zero in dim order) through the lanes' dims.
// Then the code bytes are packed into the page rows (calib::pack_codes order). The blocks are laid out per KV head
// (gridDim.y = heads), so the head's table is staged in shared memory once per block (d <= 128; at d = 256 the
// 256 KiB table is read through L1/L2).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "formats/kv_layout.h"
#include "kernels/common/device_utils.cuh"
#include "kernels/kv_quantize/int2_ef_code.h"
#include "kernels/kv_quantize/kv_quantize.cuh"
#include "kernels/kv_quantize/kv_write_int2.cuh"

namespace oscar::kern::detail {

// Steps per block of the rounding loop (divides every supported head_dim).
inline constexpr int kEfBlock = 8;

template <int kHeadDim>
struct Int2EfShape {
  static constexpr bool kWInShared = kHeadDim <= 128;
  // Warps per block, one block per SM: as many as shared memory (R and the table, 2 x 64 KiB at d = 128, plus one
  // 8 KiB x tile per warp: 225 KiB at 12) and registers (162 at d = 128, <= 168 for 12 x 32 threads; 16 warps at
  // d = 64 would cap them at 128 and spill) allow, because the sequential part of each step block runs on half the
  // lanes and needs other warps to hide it.
  static constexpr int kWarps = kHeadDim <= 128 ? 12 : 8;
};

// R' (when kept and rotating) + the head's weights (d <= 128) + order + one x tile per warp.
template <int kHeadDim>
constexpr size_t int2_ef_smem_bytes(bool rotate, int warps) {
  using S = Int2TileShape<kHeadDim>;
  const size_t r = rotate && S::kRInShared ? static_cast<size_t>(kHeadDim) * kHeadDim : 0;
  const size_t w = Int2EfShape<kHeadDim>::kWInShared ? static_cast<size_t>(kHeadDim) * kHeadDim : 0;
  return (r + w + static_cast<size_t>(kHeadDim) + static_cast<size_t>(warps) * S::kTokens * kHeadDim) *
         sizeof(float);
}

template <int kHeadDim, bool kRotate, int kSelect>
__global__ void __launch_bounds__(Int2EfShape<kHeadDim>::kWarps * 32, 1) kv_write_int2_ef_kernel(KvWriteArgs a) {
  using S = Int2TileShape<kHeadDim>;
  constexpr int N = S::kPerLane, M = S::kTokens, G = S::kTokenGroup;
  constexpr int kRowBytes = kHeadDim / 4;
  constexpr int kWords = kHeadDim / 16;  // 32-bit code words per token row
  static_assert((M * kWords) % 32 == 0, "the pack loop keeps every lane busy");
  extern __shared__ float4 smem_f4[];
  float* smem = reinterpret_cast<float*>(smem_f4);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const int head = static_cast<int>(blockIdx.y);

  // Shared memory: [R' (d <= 128, rotating)] [weights (d <= 128)] [order] [x tiles]. Lane l's slot j holds the
  // coordinate of step 32*j + l (cols[j] = order[32*j + l]), so a block of kEfBlock steps is owned by kEfBlock
  // consecutive lanes of one slot and the steps before it leave whole slots dead: step block k0 updates only
  // slots j >= k0 / 32, about 5/8 of the updates of a layout by coordinate. R' is R with its columns in step order
  // (R'[i][p] = R[i][order[p]]), read conflict-free as column 32*j + l.
  float* next = smem;
  float* rot_smem = next;
  if constexpr (kRotate && S::kRInShared) next += kHeadDim * kHeadDim;
  const float* wts = a.ef_weights + static_cast<int64_t>(head) * kHeadDim * kHeadDim;
  float* wts_smem = next;
  if constexpr (Int2EfShape<kHeadDim>::kWInShared) next += kHeadDim * kHeadDim;
  int32_t* order = reinterpret_cast<int32_t*>(next);
  for (int i = threadIdx.x; i < kHeadDim; i += blockDim.x)
    order[i] = __ldg(a.ef_order + static_cast<int64_t>(head) * kHeadDim + i);  // a permutation (checked by the caller)
  if constexpr (Int2EfShape<kHeadDim>::kWInShared) {
    const float4* src = reinterpret_cast<const float4*>(wts);  // 16-byte aligned: kv_write_can_implement
    float4* dst = reinterpret_cast<float4*>(wts_smem);
    for (int i = threadIdx.x; i < kHeadDim * kHeadDim / 4; i += blockDim.x) dst[i] = __ldg(src + i);
    wts = wts_smem;
  }
  __syncthreads();
  // This block's head: its own matrix with per-head transforms (bundle 2.0), else the layer's R.
  const float* rot = head_rotation(a, head);
  if constexpr (kRotate && S::kRInShared) {
    const float* src = rot;
    for (int i = threadIdx.x; i < kHeadDim * kHeadDim; i += blockDim.x) {
      const int k = i / kHeadDim, p = i - k * kHeadDim;
      rot_smem[i] = __ldg(src + k * kHeadDim + order[p]);
    }
    rot = rot_smem;
    __syncthreads();
  }
  int cols[N];
#pragma unroll
  for (int j = 0; j < N; ++j) cols[j] = order[32 * j + lane];
  float* xs = next + kHeadDim + warp * M * kHeadDim;

  const int64_t tiles = (a.tokens + M - 1) / M;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps;
  const fmt::Int2PageGeometry geo{kHeadDim, a.page_tokens};
  const int32_t page_bytes = geo.page_bytes();

  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * warps + warp; tile < tiles; tile += stride) {
    const int64_t t0 = tile * M;
    uint8_t* my_block;
    int32_t my_offset;
    const int32_t slot = int2_tile_destination<M>(a, t0, lane, head, page_bytes, my_block, my_offset);
    if (__all_sync(0xffffffffu, slot < 0)) continue;

    float acc[M][N];
    int2_tile_rotate<kHeadDim, kRotate, true>(a, rot, xs, head, t0, lane, acc, cols);

    // Params of the clipped vectors (RTN's); the running target is the clipped vector, or the unclipped one with
    // ef_clip_feedback. Lane t keeps token t's params.
    float my_scale = 0.f, my_zero = 0.f, my_inv_scale = 0.f;
    uint32_t my_pair = 0;
#pragma unroll
    for (int g0 = 0; g0 < M; g0 += G) {
      uint32_t c[G];
      if (a.clip_rank >= 0) int2_clip_thresholds<kHeadDim, kSelect>(acc, g0, a.clip_rank, c);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const int t = g0 + g;
        float v[N];
#pragma unroll
        for (int j = 0; j < N; ++j) v[j] = acc[t][j];
        if (a.clip_rank >= 0) int2_clip_values<N>(v, __uint_as_float(c[g]));
        if (!a.ef_clip_feedback) {
#pragma unroll
          for (int j = 0; j < N; ++j) acc[t][j] = v[j];
        }
        float lo, hi;
        int2_min_max_dims<N>(v, cols, lo, hi);
        const __half scale_h = __float2half_rn(__fdiv_rn(hi - lo, 3.0f));
        const __half zero_h = __float2half_rn(lo);
        if (lane == t) {
          my_scale = __half2float(scale_h);
          my_zero = __half2float(zero_h);
          my_inv_scale = my_scale != 0.f ? __frcp_rn(my_scale) : 0.f;
          my_pair = static_cast<uint32_t>(__half_as_ushort(scale_h)) |
                    (static_cast<uint32_t>(__half_as_ushort(zero_h)) << 16);
        }
      }
    }

    // The x tile is free after the rotation: its first quarter holds one code byte per (token, dim) until the pack,
    // the rest stages one block of steps: `gathered` [B][M] (the running targets of the block's coordinates) and
    // `neg_err` [B][M] (the negated errors the block feeds forward).
    // Token rows of codes kCodeStride bytes apart: lanes t = 0..M-1 store to distinct banks.
    constexpr int kCodeStride = kHeadDim + 4;
    static_assert(M * kCodeStride + 2 * kEfBlock * M * 4 <= M * kHeadDim * 4, "the staging fits the x tile");
    uint8_t* codes = reinterpret_cast<uint8_t*>(xs);
    float* gathered = xs + M * kCodeStride / 4;
    float* neg_err = gathered + kEfBlock * M;
    __syncwarp();
    // Steps go in blocks of kEfBlock (GPTQ's lazy batch, here without changing a single rounding): every coordinate
    // still receives its updates one fmaf at a time in increasing step order, which is all the CPU loop fixes; only
    // the interleaving across coordinates changes. Inside a block the sequential part runs on lane t alone (token
    // t's B targets in registers, no shuffle on the critical path); the block's errors then reach every lane's
    // coordinates in one batch of independent fmafs. Slots below the block's are finished and skipped; rounded
    // steps inside the block's own slot keep receiving (dead) updates with the table's zero weights, no predicate.
#pragma unroll 1
    for (int k0 = 0; k0 < kHeadDim; k0 += kEfBlock) {
      // Steps k0 .. k0+B-1 are slot j0's lanes l0 .. l0+B-1 (B divides 32).
      const int j0 = k0 / 32, l0 = k0 % 32;
      int coord[kEfBlock];
#pragma unroll
      for (int s = 0; s < kEfBlock; ++s) coord[s] = order[k0 + s];  // smem broadcast
#pragma unroll
      for (int j = 0; j < N; ++j)
        if (j == j0 && lane - l0 >= 0 && lane - l0 < kEfBlock) {  // j == j0 is warp-uniform: static register index
#pragma unroll
          for (int q = 0; q < M / 4; ++q)
            reinterpret_cast<float4*>(gathered + (lane - l0) * M)[q] =
                make_float4(acc[4 * q][j], acc[4 * q + 1][j], acc[4 * q + 2][j], acc[4 * q + 3][j]);
        }
      __syncwarp();
      if (lane < M) {
        float w[kEfBlock];
#pragma unroll
        for (int s = 0; s < kEfBlock; ++s) w[s] = gathered[s * M + lane];
#pragma unroll
        for (int s = 0; s < kEfBlock; ++s) {
          // calib::int_codes + int_dequant on one element; scale 0 gives code 0 and dequant = zero.
          float q = 0.f;
          if (my_scale != 0.f) q = int2_ef_code(w[s], my_zero, my_scale, my_inv_scale);
          const float ne = -__fsub_rn(w[s], fmaf(q, my_scale, my_zero));
          codes[lane * kCodeStride + coord[s]] = static_cast<uint8_t>(q);
          neg_err[s * M + lane] = ne;
          const float* row = wts + (k0 + s) * kHeadDim + k0;
#pragma unroll
          for (int s2 = s + 1; s2 < kEfBlock; ++s2) w[s2] = fmaf(ne, row[s2], w[s2]);
        }
      }
      __syncwarp();
#pragma unroll
      for (int s = 0; s < kEfBlock; ++s) {
        float e[M];
#pragma unroll
        for (int q = 0; q < M / 4; ++q) {
          const float4 e4 = reinterpret_cast<const float4*>(neg_err + s * M)[q];  // broadcast
          e[4 * q] = e4.x;
          e[4 * q + 1] = e4.y;
          e[4 * q + 2] = e4.z;
          e[4 * q + 3] = e4.w;
        }
        const float* row = wts + (k0 + s) * kHeadDim + lane;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          if (j < j0) continue;  // warp-uniform: every step of slot j is rounded already
          const float wk = Int2EfShape<kHeadDim>::kWInShared ? row[32 * j] : __ldg(row + 32 * j);
#pragma unroll
          for (int t = 0; t < M; ++t) acc[t][j] = fmaf(e[t], wk, acc[t][j]);
        }
      }
    }
    __syncwarp();

    // Pack: word w of token t holds dims 16w .. 16w+15, dim at bits 2 * (dim - 16w).
#pragma unroll
    for (int idx = lane; idx < M * kWords; idx += 32) {
      const int t = idx / kWords, w = idx % kWords;
      uint8_t* block = reinterpret_cast<uint8_t*>(
          __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(my_block), t));
      const int32_t offset = __shfl_sync(0xffffffffu, my_offset, t);
      if (block) {
        const uint8_t* src = codes + t * kCodeStride + 16 * w;
        uint32_t bits = 0;
#pragma unroll
        for (int q = 0; q < 16; ++q) bits |= static_cast<uint32_t>(src[q]) << (2 * q);
        reinterpret_cast<uint32_t*>(block + static_cast<size_t>(offset) * kRowBytes)[w] = bits;
      }
    }
    if (my_block) *reinterpret_cast<uint32_t*>(my_block + geo.params_offset() + static_cast<size_t>(my_offset) * 4) = my_pair;
  }
}

}  // namespace oscar::kern::detail
