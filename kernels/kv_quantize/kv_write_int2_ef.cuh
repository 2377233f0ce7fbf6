#pragma once
// Device code of the INT2 quantize-on-write with error-feedback rounding (issue #10; KvWriteParams::ef_order /
// ef_weights). The stored form of lib/calib/error_feedback.h, step for step in fp32, so codes are bit-identical to
// calib::error_feedback_codes_stored (and kv_write_ref).
//
// Rotation, clip threshold and fp16 (scale, zero) are the tiled RTN writer's (kv_write_int2.cuh, same helpers).
// Only the rounding differs, and it is sequential over the d steps of the table's order: step k rounds coordinate
// order[k] and feeds its error into every coordinate later in the order. A warp keeps a tile of M tokens of one KV
// head in registers (lane l owns dims N*l .. N*l+N-1 of each token, as in the RTN writer) and runs the d steps for
// all M tokens at once, so each weight row is read once per tile rather than once per token:
//   1. the owner lane of order[k] hands token t's running target to lane t (M shuffles, static register index
//      through a warp-uniform branch on the owner's slot, no local memory);
//   2. lane t rounds it with token t's params (the RTN arithmetic) and keeps e_t = w - dequant; the code goes to a
//      byte array in the warp's (now free) x tile;
//   3. e_t is broadcast (M shuffles) and every lane applies fmaf(-e_t, weights[k][pos(c)], w_c) to each coordinate
//      c it owns whose position pos(c) in the order is after k — once per step per coordinate, as the CPU loop.
// Then the code bytes are packed into the page rows (calib::pack_codes order). The blocks are laid out per KV head
// (gridDim.y = heads), so the head's table is staged in shared memory once per block (d <= 128; at d = 256 the
// 256 KiB table is read through L1/L2).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "formats/kv_layout.h"
#include "kernels/common/device_utils.cuh"
#include "kernels/kv_quantize/kv_quantize.cuh"
#include "kernels/kv_quantize/kv_write_int2.cuh"

namespace oscar::kern::detail {

// Half the RTN writer's warps: R and the weight table both sit in shared memory at d = 128 (2 x 64 KiB).
inline constexpr int kInt2EfMaxWarps = 8;

template <int kHeadDim>
struct Int2EfShape {
  static constexpr bool kWInShared = kHeadDim <= 128;
};

// R (when kept and rotating) + the head's weights (d <= 128) + order and its inverse + one x tile per warp.
template <int kHeadDim>
constexpr size_t int2_ef_smem_bytes(bool rotate, int warps) {
  using S = Int2TileShape<kHeadDim>;
  const size_t r = rotate && S::kRInShared ? static_cast<size_t>(kHeadDim) * kHeadDim : 0;
  const size_t w = Int2EfShape<kHeadDim>::kWInShared ? static_cast<size_t>(kHeadDim) * kHeadDim : 0;
  return (r + w + 2 * static_cast<size_t>(kHeadDim) + static_cast<size_t>(warps) * S::kTokens * kHeadDim) *
         sizeof(float);
}

template <int kHeadDim, bool kRotate, int kSelect>
__global__ void __launch_bounds__(kInt2EfMaxWarps * 32, 1) kv_write_int2_ef_kernel(KvWriteArgs a) {
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

  const float* rot = a.rotation;
  float* next = smem;
  if constexpr (kRotate && S::kRInShared) {
    for (int i = threadIdx.x; i < kHeadDim * kHeadDim; i += blockDim.x) next[i] = __ldg(a.rotation + i);
    rot = next;
    next += kHeadDim * kHeadDim;
  }
  const float* wts = a.ef_weights + static_cast<int64_t>(head) * kHeadDim * kHeadDim;
  if constexpr (Int2EfShape<kHeadDim>::kWInShared) {
    const float4* src = reinterpret_cast<const float4*>(wts);  // 16-byte aligned: kv_write_can_implement
    float4* dst = reinterpret_cast<float4*>(next);
    for (int i = threadIdx.x; i < kHeadDim * kHeadDim / 4; i += blockDim.x) dst[i] = __ldg(src + i);
    wts = next;
    next += kHeadDim * kHeadDim;
  }
  int32_t* order = reinterpret_cast<int32_t*>(next);
  int32_t* inverse = order + kHeadDim;
  for (int i = threadIdx.x; i < kHeadDim; i += blockDim.x) {
    const int32_t c = __ldg(a.ef_order + static_cast<int64_t>(head) * kHeadDim + i);
    order[i] = c;
    inverse[c] = i;  // a permutation (checked by the caller)
  }
  __syncthreads();
  float* xs = next + 2 * kHeadDim + warp * M * kHeadDim;

  // pos(c) of the lane's coordinates: the step that rounds them.
  int pos[N];
#pragma unroll
  for (int j = 0; j < N; ++j) pos[j] = inverse[N * lane + j];

  const int64_t tiles = (a.tokens + M - 1) / M;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps;
  const fmt::Int2PageGeometry geo{kHeadDim, a.page_tokens};
  const int32_t page_bytes = geo.page_bytes();

  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * warps + warp; tile < tiles; tile += stride) {
    const int64_t t0 = tile * M;
    int32_t slot = -1;
    if (lane < M && t0 + lane < a.tokens) slot = a.slots[t0 + lane];
    if (__all_sync(0xffffffffu, slot < 0)) continue;
    uint8_t* my_block = nullptr;
    int32_t my_offset = 0;
    if (slot >= 0) {
      my_offset = slot % a.page_tokens;
      my_block = a.int2_pool + fmt::page_block_offset(slot / a.page_tokens, head, a.num_kv_heads, page_bytes);
    }

    float acc[M][N];
    int2_tile_rotate<kHeadDim, kRotate>(a, rot, xs, head, t0, lane, acc);

    // Params of the clipped vectors (RTN's); the running target is the clipped vector, or the unclipped one with
    // ef_clip_feedback. Lane t keeps token t's params.
    float my_scale = 0.f, my_zero = 0.f;
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
        if (a.clip_rank >= 0) {
          const float cf = __uint_as_float(c[g]);
#pragma unroll
          for (int j = 0; j < N; ++j) {  // calib::clip_in_place, compare for compare
            float y = v[j];
            y = y < -cf ? -cf : y;
            y = cf < y ? cf : y;
            v[j] = y;
          }
        }
        if (!a.ef_clip_feedback) {
#pragma unroll
          for (int j = 0; j < N; ++j) acc[t][j] = v[j];
        }
        float lo, hi;
        int2_min_max<N>(v, lane, lo, hi);
        const __half scale_h = __float2half_rn(__fdiv_rn(hi - lo, 3.0f));
        const __half zero_h = __float2half_rn(lo);
        if (lane == t) {
          my_scale = __half2float(scale_h);
          my_zero = __half2float(zero_h);
          my_pair = static_cast<uint32_t>(__half_as_ushort(scale_h)) |
                    (static_cast<uint32_t>(__half_as_ushort(zero_h)) << 16);
        }
      }
    }

    // The x tile is free after the rotation: it holds one code byte per (token, dim) until the pack.
    uint8_t* codes = reinterpret_cast<uint8_t*>(xs);
    __syncwarp();
#pragma unroll 1
    for (int k = 0; k < kHeadDim; ++k) {
      const int i = order[k];  // smem broadcast
      const int owner = i / N;
      const int slot_j = i % N;
      float mine = 0.f;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (j == slot_j) {  // warp-uniform
#pragma unroll
          for (int t = 0; t < M; ++t) {
            const float w = __shfl_sync(0xffffffffu, acc[t][j], owner);
            mine = lane == t ? w : mine;
          }
        }
      }
      // calib::int_codes + int_dequant on one element; scale 0 gives code 0 and dequant = zero.
      float e = 0.f;
      if (lane < M) {
        float q = 0.f;
        if (my_scale != 0.f) q = fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(mine, my_zero), my_scale)), 0.f), 3.f);
        e = __fsub_rn(mine, fmaf(q, my_scale, my_zero));
        codes[lane * kHeadDim + i] = static_cast<uint8_t>(q);
      }
      float wk[N];
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const bool later = pos[j] > k;
        const float* src = wts + k * kHeadDim + pos[j];
        if constexpr (Int2EfShape<kHeadDim>::kWInShared)
          wk[j] = later ? *src : 0.f;
        else
          wk[j] = later ? __ldg(src) : 0.f;
      }
#pragma unroll
      for (int t = 0; t < M; ++t) {
        const float et = -__shfl_sync(0xffffffffu, e, t);
#pragma unroll
        for (int j = 0; j < N; ++j)
          if (pos[j] > k) acc[t][j] = fmaf(et, wk[j], acc[t][j]);
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
        const uint8_t* src = codes + t * kHeadDim + 16 * w;
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
