#pragma once
// Device code of the INT2 quantize-on-write (kv_write, KvWriteMode::Int2). Replaces the per-token matrix-vector
// rotation of kv_write_kernel (kv_quantize.cuh), which the H100 profile showed instruction-bound (an R load and an
// x load per 4 FMAs, a 31-round select as costly as the rotation itself, y spilled to local memory).
//
// One warp owns a tile of kTokens tokens of one KV head; lane l owns the kPerLane CONTIGUOUS dims
// kPerLane*l .. kPerLane*l + kPerLane-1 of every token of the tile. The rotation is a [kTokens x d]·[d x d] GEMM:
// R sits in shared memory for the whole (persistent) block, x of the tile in shared memory, and every step of four
// k loads four R rows (one vector load per row) and one float4 of x per token, then does 16·kPerLane·... FMAs from
// registers. Each output is still one fp32 fmaf chain over k = 0 .. d-1 in increasing k, the order
// calib::rotate uses, so codes stay bit-identical to kv_write_ref.
// Clip threshold: the rank-th smallest |y| is the (d-1-rank)-th LARGEST, and the published ratios put it near the
// top (K 0.96 -> 5, V 0.92 -> 10 at d = 128), so the select pops the warp maximum (one REDUX per round) r+1 times
// over per-lane descending lists; large r falls back to the 31-round bitwise select. Both return the same element
// (the multiset's order statistic), ties and ±0 included.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "formats/kv_layout.h"
#include "kernels/common/device_utils.cuh"
#include "kernels/kv_quantize/kv_quantize.cuh"

namespace oscar::kern::detail {

inline constexpr int kInt2MaxWarps = 16;
// Above this many pops the 31-round bitwise select is cheaper (a pop round costs about 13 instructions per token,
// a bitwise round about 10 at kPerLane 4).
inline constexpr int kInt2TopSelectMax = 24;

template <int kHeadDim>
struct Int2TileShape {
  static constexpr int kPerLane = kHeadDim / 32;
  // 16 x 4 accumulators at d = 128 (64 registers); d = 256 halves the tile to keep the same register budget.
  static constexpr int kTokens = kHeadDim <= 128 ? 16 : 8;
  // R (d*d fp32) fits shared memory next to the x tiles up to d = 128; d = 256 (256 KiB) reads R through L1/L2.
  static constexpr bool kRInShared = kHeadDim <= 128;
  static constexpr int kTokenGroup = 4;  // tokens whose selects are interleaved (ILP over the REDUX latency)
  static_assert(kTokens % kTokenGroup == 0);
};

// Dynamic shared memory of one block: R (when kept there and rotating) + one x tile per warp.
template <int kHeadDim>
constexpr size_t int2_smem_bytes(bool rotate, int warps) {
  using S = Int2TileShape<kHeadDim>;
  const size_t r = rotate && S::kRInShared ? static_cast<size_t>(kHeadDim) * kHeadDim : 0;
  return (r + static_cast<size_t>(warps) * S::kTokens * kHeadDim) * sizeof(float);
}

// Order-preserving map of a float onto a signed int (negative floats have their magnitude bits flipped), so a
// warp min/max of floats is one REDUX. -0 maps below +0; int2_min_max repairs the zero sign afterwards.
__device__ __forceinline__ int float_order_key(float f) {
  const int b = __float_as_int(f);
  return b ^ ((b >> 31) & 0x7fffffff);
}
__device__ __forceinline__ float float_from_order_key(int k) { return __int_as_float(k ^ ((k >> 31) & 0x7fffffff)); }

// lo = first minimum and hi = last maximum in dim order (std::minmax_element's choice, what calib::int_params
// uses): values that compare equal but differ in bits are only ±0, so the min/max VALUE comes from the REDUX and
// only a zero result needs the sign of the first (last) zero, found with a ballot over the lanes in dim order.
template <int kPerLane>
__device__ __forceinline__ void int2_min_max(const float (&v)[kPerLane], int lane, float& lo, float& hi) {
  float l = v[0], h = v[0];
#pragma unroll
  for (int j = 1; j < kPerLane; ++j) {
    if (v[j] < l) l = v[j];     // strict: keeps the first minimum of this lane
    if (!(v[j] < h)) h = v[j];  // keeps the last maximum of this lane
  }
  lo = float_from_order_key(__reduce_min_sync(0xffffffffu, float_order_key(l)));
  hi = float_from_order_key(__reduce_max_sync(0xffffffffu, float_order_key(h)));
  (void)lane;
  if (lo == 0.0f) {  // warp-uniform; all values >= 0 here, and ±0 compare equal
    const uint32_t zeros = __ballot_sync(0xffffffffu, l == 0.0f);
    lo = __shfl_sync(0xffffffffu, l, __ffs(zeros) - 1);
  }
  if (hi == 0.0f) {
    const uint32_t zeros = __ballot_sync(0xffffffffu, h == 0.0f);
    hi = __shfl_sync(0xffffffffu, h, 31 - __clz(zeros));
  }
}

// Clip thresholds (as bits of the non-negative float) of kGroup tokens: the element at position `top` of the
// descending multiset of the warp's magnitudes. Every lane sorts its kPerLane magnitudes descending; each round
// takes the warp maximum of the list heads, counts the lanes holding it and pops one element from each of them,
// so a round consumes >= 1 element and top + 1 rounds always reach position `top`. Rounds have a fixed count, so
// the kGroup tokens' rounds interleave.
template <int kPerLane, int kGroup>
__device__ __forceinline__ void select_top(uint32_t (&m)[kGroup][kPerLane], int top, uint32_t (&c)[kGroup]) {
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    // Odd-even transposition sort, descending (kPerLane passes sort kPerLane elements).
#pragma unroll
    for (int pass = 0; pass < kPerLane; ++pass)
#pragma unroll
      for (int j = pass & 1; j + 1 < kPerLane; j += 2) {
        const uint32_t a = m[g][j], b = m[g][j + 1];
        m[g][j] = max(a, b);
        m[g][j + 1] = min(a, b);
      }
  }
  int left[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    left[g] = top;
    c[g] = 0;
  }
  for (int round = 0; round <= top; ++round) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const uint32_t head = m[g][0];
      const uint32_t mx = __reduce_max_sync(0xffffffffu, head);
      const bool mine = head == mx;
      const int count = __popc(__ballot_sync(0xffffffffu, mine));
      // Found in the first round whose run of equal values covers position `top`. A 0 sentinel refills exhausted
      // lists: it can only inflate the count of a 0 maximum, when every remaining element is 0 and so is c.
      if (left[g] >= 0 && left[g] < count) c[g] = mx;
      left[g] -= count;
      if (mine) {
#pragma unroll
        for (int j = 0; j + 1 < kPerLane; ++j) m[g][j] = m[g][j + 1];
        m[g][kPerLane - 1] = 0;
      }
    }
  }
}

// The rank-th smallest (ascending) of the warp's magnitudes by building its bit pattern from the top: the answer
// is the largest pattern u with #{v < u} <= rank. 31 rounds, kGroup tokens interleaved.
template <int kPerLane, int kGroup>
__device__ __forceinline__ void select_radix(const uint32_t (&m)[kGroup][kPerLane], int rank, uint32_t (&c)[kGroup]) {
#pragma unroll
  for (int g = 0; g < kGroup; ++g) c[g] = 0;
#pragma unroll 1
  for (int bit = 30; bit >= 0; --bit) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const uint32_t candidate = c[g] | (1u << bit);
      int below = 0;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) below += m[g][j] < candidate;
      below = __reduce_add_sync(0xffffffffu, below);
      if (below <= rank) c[g] = candidate;
    }
  }
}

// int2_min_max for a lane whose value j is coordinate dims[j] (any distinct dims across the warp): the zero sign
// comes from the first (last) zero in dim order, found with a warp min (max) over the zeros' dims.
template <int kPerLane>
__device__ __forceinline__ void int2_min_max_dims(const float (&v)[kPerLane], const int (&dims)[kPerLane], float& lo,
                                                  float& hi) {
  float l = v[0], h = v[0];
#pragma unroll
  for (int j = 1; j < kPerLane; ++j) {
    l = fminf(l, v[j]);  // the value only: a zero's sign is resolved below
    h = fmaxf(h, v[j]);
  }
  lo = float_from_order_key(__reduce_min_sync(0xffffffffu, float_order_key(l)));
  hi = float_from_order_key(__reduce_max_sync(0xffffffffu, float_order_key(h)));
  if (lo == 0.0f || hi == 0.0f) {  // warp-uniform
    int first = 0x7fffffff, last = -1;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
      if (v[j] == 0.0f) {
        first = min(first, dims[j]);
        last = max(last, dims[j]);
      }
    first = __reduce_min_sync(0xffffffffu, first);
    last = __reduce_max_sync(0xffffffffu, last);
    bool first_negative = false, last_negative = false;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      first_negative |= dims[j] == first && signbit(v[j]);
      last_negative |= dims[j] == last && signbit(v[j]);
    }
    if (lo == 0.0f) lo = __any_sync(0xffffffffu, first_negative) ? -0.0f : 0.0f;
    if (hi == 0.0f) hi = __any_sync(0xffffffffu, last_negative) ? -0.0f : 0.0f;
  }
}

// Quantizes one clipped token (the lane's kPerLane dims) and returns its fp16 (scale, zero) pair; writes the code
// word(s) of the lane group to `row` (the token's code row) when row != nullptr.
template <int kPerLane>
__device__ __forceinline__ uint32_t int2_quantize_store(const float (&v)[kPerLane], int lane, uint8_t* row) {
  float lo, hi;
  int2_min_max<kPerLane>(v, lane, lo, hi);
  // fp16 first, codes from the rounded values: decode reads exactly these parameters (calib::int_params/int_codes).
  const __half scale_h = __float2half_rn(__fdiv_rn(hi - lo, 3.0f));
  const __half zero_h = __float2half_rn(lo);
  const float scale = __half2float(scale_h);
  const float zero = __half2float(zero_h);
  uint32_t bits = 0;
  if (scale != 0.f) {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const float q = fminf(fmaxf(rintf(__fdiv_rn(v[j] - zero, scale)), 0.f), 3.f);
      bits |= static_cast<uint32_t>(q) << (2 * j);
    }
  }
  // A 32-bit word holds dims 16w .. 16w+15 (calib::pack_codes order: dim i at bits 2i of the row), i.e. the codes
  // of kLanes consecutive lanes; OR them together within the group and let its first lane store the word.
  constexpr int kLanes = 16 / kPerLane;
  bits <<= 2 * kPerLane * (lane % kLanes);
#pragma unroll
  for (int o = 1; o < kLanes; o <<= 1) bits |= __shfl_xor_sync(0xffffffffu, bits, o);
  if (row != nullptr && lane % kLanes == 0) reinterpret_cast<uint32_t*>(row)[lane / kLanes] = bits;
  return static_cast<uint32_t>(__half_as_ushort(scale_h)) | (static_cast<uint32_t>(__half_as_ushort(zero_h)) << 16);
}

// Lane t < M resolves token t0 + t's destination once (the division by page_tokens is not cheap): its page block
// (nullptr when the token is not stored: slot < 0, or past the end) and its row within the page. Returns the slot.
template <int M>
__device__ __forceinline__ int32_t int2_tile_destination(const KvWriteArgs& a, int64_t t0, int lane, int head,
                                                         int32_t page_bytes, uint8_t*& block, int32_t& offset) {
  int32_t slot = -1;
  if (lane < M && t0 + lane < a.tokens) slot = a.slots[t0 + lane];
  block = nullptr;
  offset = 0;
  if (slot >= 0) {
    offset = slot % a.page_tokens;
    block = a.int2_pool + fmt::page_block_offset(slot / a.page_tokens, head, a.num_kv_heads, page_bytes);
  }
  return slot;
}

// std::min(std::max(y, -c), c) of calib::clip_in_place on one lane's values, compare for compare (keeps ±0 and NaN
// as they are).
template <int N>
__device__ __forceinline__ void int2_clip_values(float (&v)[N], float c) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    float y = v[j];
    y = y < -c ? -c : y;
    y = c < y ? c : y;
    v[j] = y;
  }
}

// Stages the x rows of tokens t0 .. t0+M-1 of `head` into the warp's tile xs and rotates them: acc[t][j] = y of
// token t, dim N*lane + j (rows past a.tokens are zeros). Shared by the RTN and the error-feedback writers.
// kStrided (the error-feedback writer): lane l's slot j holds coordinate cols[j] instead of N*l + j, with R's columns
// permuted to match where R sits in shared memory (row k: slot j of lane l at column 32*j + l, R' = R with columns
// in `cols` order), or read from R at column cols[j] where it does not.
template <int kHeadDim, bool kRotate, bool kStrided = false>
__device__ __forceinline__ void int2_tile_rotate(const KvWriteArgs& a, const float* rot, float* xs, int head,
                                                 int64_t t0, int lane,
                                                 float (&acc)[Int2TileShape<kHeadDim>::kTokens]
                                                             [Int2TileShape<kHeadDim>::kPerLane],
                                                 const int (&cols)[Int2TileShape<kHeadDim>::kPerLane]) {
  using S = Int2TileShape<kHeadDim>;
  constexpr int N = S::kPerLane, M = S::kTokens;
  // Stage x: coalesced scalar bf16 loads (x rows carry only 2-byte alignment), fp32 into this warp's tile.
  __syncwarp();  // the previous item's reads of xs are done
  float mean[N];
#pragma unroll
  for (int k = 0; k < N; ++k) mean[k] = head_mean_or_zero(a, head, kHeadDim, lane + 32 * k);
#pragma unroll
  for (int t = 0; t < M; ++t) {
    const bool live = t0 + t < a.tokens;
    const uint16_t* src = a.x + (t0 + t) * a.token_stride + static_cast<int64_t>(head) * kHeadDim;
#pragma unroll
    for (int k = 0; k < N; ++k)
      xs[t * kHeadDim + lane + 32 * k] = live ? bf16_bits_to_float(src[lane + 32 * k]) - mean[k] : 0.f;
  }
  __syncwarp();

  if constexpr (kRotate) {
#pragma unroll
    for (int t = 0; t < M; ++t)
#pragma unroll
      for (int j = 0; j < N; ++j) acc[t][j] = 0.f;
#pragma unroll 1
    for (int k = 0; k < kHeadDim; k += 4) {
      float r[4][N];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float* row = rot + (k + q) * kHeadDim + N * lane;
        if constexpr (kStrided) {
#pragma unroll
          for (int j = 0; j < N; ++j)
            r[q][j] = S::kRInShared ? rot[(k + q) * kHeadDim + 32 * j + lane] : __ldg(rot + (k + q) * kHeadDim + cols[j]);
        } else if constexpr (N == 2) {
          const float2 v2 = *reinterpret_cast<const float2*>(row);
          r[q][0] = v2.x;
          r[q][1] = v2.y;
        } else {
#pragma unroll
          for (int j = 0; j < N; j += 4) {
            const float4 v4 = S::kRInShared ? *reinterpret_cast<const float4*>(row + j)
                                            : make_float4(__ldg(row + j), __ldg(row + j + 1), __ldg(row + j + 2),
                                                          __ldg(row + j + 3));
            r[q][j] = v4.x;
            r[q][j + 1] = v4.y;
            r[q][j + 2] = v4.z;
            r[q][j + 3] = v4.w;
          }
        }
      }
#pragma unroll
      for (int t = 0; t < M; ++t) {
        const float4 xv = *reinterpret_cast<const float4*>(xs + t * kHeadDim + k);  // broadcast
        // k, k+1, k+2, k+3 in order: the fmaf chain of calib::rotate.
#pragma unroll
        for (int j = 0; j < N; ++j) acc[t][j] = fmaf(xv.x, r[0][j], acc[t][j]);
#pragma unroll
        for (int j = 0; j < N; ++j) acc[t][j] = fmaf(xv.y, r[1][j], acc[t][j]);
#pragma unroll
        for (int j = 0; j < N; ++j) acc[t][j] = fmaf(xv.z, r[2][j], acc[t][j]);
#pragma unroll
        for (int j = 0; j < N; ++j) acc[t][j] = fmaf(xv.w, r[3][j], acc[t][j]);
      }
    }
  } else {
#pragma unroll
    for (int t = 0; t < M; ++t) {
      const float* p = xs + t * kHeadDim + N * lane;
      if constexpr (kStrided) {
#pragma unroll
        for (int j = 0; j < N; ++j) acc[t][j] = xs[t * kHeadDim + cols[j]];
      } else if constexpr (N == 2) {
        const float2 v2 = *reinterpret_cast<const float2*>(p);
        acc[t][0] = v2.x;
        acc[t][1] = v2.y;
      } else {
#pragma unroll
        for (int j = 0; j < N; j += 4) {
          const float4 v4 = *reinterpret_cast<const float4*>(p + j);  // vector: N consecutive floats per lane
          acc[t][j] = v4.x;
          acc[t][j + 1] = v4.y;
          acc[t][j + 2] = v4.z;
          acc[t][j + 3] = v4.w;
        }
      }
    }
  }
}

// The RTN writer's form: lane l's slot j is coordinate N*l + j.
template <int kHeadDim, bool kRotate>
__device__ __forceinline__ void int2_tile_rotate(const KvWriteArgs& a, const float* rot, float* xs, int head,
                                                 int64_t t0, int lane,
                                                 float (&acc)[Int2TileShape<kHeadDim>::kTokens]
                                                             [Int2TileShape<kHeadDim>::kPerLane]) {
  const int natural[Int2TileShape<kHeadDim>::kPerLane] = {};  // unused without kStrided
  int2_tile_rotate<kHeadDim, kRotate, false>(a, rot, xs, head, t0, lane, acc, natural);
}

// Clip thresholds (bits of the non-negative float) of the G = kTokenGroup tokens g0 .. g0+G-1 of the tile.
template <int kHeadDim, int kSelect>
__device__ __forceinline__ void int2_clip_thresholds(
    const float (&acc)[Int2TileShape<kHeadDim>::kTokens][Int2TileShape<kHeadDim>::kPerLane], int g0, int clip_rank,
    uint32_t (&c)[Int2TileShape<kHeadDim>::kTokenGroup]) {
  using S = Int2TileShape<kHeadDim>;
  constexpr int N = S::kPerLane, G = S::kTokenGroup;
  uint32_t mag[G][N];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int j = 0; j < N; ++j) mag[g][j] = __float_as_uint(acc[g0 + g][j]) & 0x7fffffffu;
  const int top = kHeadDim - 1 - clip_rank;
  if (kSelect == 0 && top <= kInt2TopSelectMax)
    select_top<N, G>(mag, top, c);
  else
    select_radix<N, G>(mag, clip_rank, c);
}

// kSelect: 0 = pop-the-maximum select when the position from the top is <= kInt2TopSelectMax, else bitwise;
// 1 = always bitwise (bench comparison). Grid-stride over (token tile, head) items; blockDim = 32 * warps.
template <int kHeadDim, bool kRotate, int kSelect>
__global__ void __launch_bounds__(kInt2MaxWarps * 32, 1) kv_write_int2_kernel(KvWriteArgs a) {
  using S = Int2TileShape<kHeadDim>;
  constexpr int N = S::kPerLane, M = S::kTokens, G = S::kTokenGroup;
  constexpr int kRowBytes = kHeadDim / 4;
  extern __shared__ float4 smem_f4[];
  float* smem = reinterpret_cast<float*>(smem_f4);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;

  const float* rot = a.rotation;
  float* xs = smem;
  if constexpr (kRotate && S::kRInShared) {
    // Scalar loads: the rotation pointer carries no alignment promise, and this runs once per persistent block.
    for (int i = threadIdx.x; i < kHeadDim * kHeadDim; i += blockDim.x) smem[i] = __ldg(a.rotation + i);
    __syncthreads();
    rot = smem;
    xs = smem + kHeadDim * kHeadDim;
  }
  xs += warp * M * kHeadDim;

  const int64_t tiles = (a.tokens + M - 1) / M;
  const int64_t items = tiles * a.num_kv_heads;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps;
  const fmt::Int2PageGeometry geo{kHeadDim, a.page_tokens};
  const int32_t page_bytes = geo.page_bytes();

  for (int64_t item = static_cast<int64_t>(blockIdx.x) * warps + warp; item < items; item += stride) {
    const int head = static_cast<int>(item % a.num_kv_heads);
    const int64_t t0 = (item / a.num_kv_heads) * M;

    uint8_t* my_block;
    int32_t my_offset;
    const int32_t slot = int2_tile_destination<M>(a, t0, lane, head, page_bytes, my_block, my_offset);
    if (__all_sync(0xffffffffu, slot < 0)) continue;  // e.g. the sink tokens of the INT2 pass

    float acc[M][N];
    int2_tile_rotate<kHeadDim, kRotate>(a, rot, xs, head, t0, lane, acc);

    uint32_t my_pair = 0;
#pragma unroll
    for (int g0 = 0; g0 < M; g0 += G) {
      if (a.clip_rank >= 0) {
        uint32_t c[G];
        int2_clip_thresholds<kHeadDim, kSelect>(acc, g0, a.clip_rank, c);
#pragma unroll
        for (int g = 0; g < G; ++g) int2_clip_values<N>(acc[g0 + g], __uint_as_float(c[g]));
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const int t = g0 + g;
        const int src_lane = t;
        uint8_t* block = reinterpret_cast<uint8_t*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(my_block), src_lane));
        const int32_t offset = __shfl_sync(0xffffffffu, my_offset, src_lane);
        uint8_t* row = block ? block + static_cast<size_t>(offset) * kRowBytes : nullptr;
        const uint32_t pair = int2_quantize_store<N>(acc[t], lane, row);
        if (lane == t) my_pair = pair;
      }
    }
    if (my_block) *reinterpret_cast<uint32_t*>(my_block + geo.params_offset() + static_cast<size_t>(my_offset) * 4) = my_pair;
  }
}

}  // namespace oscar::kern::detail
