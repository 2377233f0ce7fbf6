#pragma once
// Device code of decode_attention (decode_attention.h). Four kernels, in launch order:
//
//  1. rotate_q: q·R_k for every query head, pre-scaled by softmax_scale·log2 e, into the workspace. Once per
//     decode step instead of once per split block: R_k is 64 KiB, and 500+ split blocks each re-reading it from
//     L2 (behind a chain of dependent loads) cost tens of µs per call.
//  2. int2 split kernel: the INT2 tokens [sink, len - recent) on tensor cores (mma.sync m16n8k16, fp16 in, fp32
//     accumulate). See "INT2 path" below.
//  3. window split kernel: the bf16 sink / recent tokens (or every token in the bf16 baseline), one token per
//     kLanesPerToken lanes with fp32 FMAs; these are at most sink + recent + a page of tokens per sequence.
//  4. merge: combines the partial (max, sum, acc) of every split of both paths and applies R_vᵀ.
// That is the Separate variant (segmented layers, all-bf16 calls). The default Fused variant launches only 1 and
// 2: decode_attention_int2_kernel<d, true> also does 3 (each split block takes a share of the window tokens) and
// 4 (in the last split block of each sequence and KV head to finish); see "Fused variant" below.
//
// INT2 path. A 2-bit KV token costs 72 bytes (d = 128, K and V) and 2·d·group multiply-adds; at group 8 and
// HBM speed that is ~80 TFMA/s, beyond the fp32 FMA units, so both products run on tensor cores:
//  * S = Q·Kᵀ with the (up to 8) query heads of the KV group as MMA rows and 8 tokens as columns. Rows 8..15 hold
//    the fp16 rounding residual of rows 0..7 (q = hi + lo), so the query keeps ~22 bits at no extra MMA.
//  * O = V·P computed as Oᵀ = Vᵀ·Pᵀ: head dims as rows, 16 tokens as k, heads as columns. The C fragment of S
//    (head g, tokens 2c, 2c+1 in lane 4g+c) is exactly the B fragment P needs, so P never leaves registers.
//  * Codes enter the MMAs raw; the affine dequantization is applied outside: q·k̂ = s_k·(q·c) + z_k·Σq and
//    Σ_t p_t v̂_t = Σ_t (p_t s_v,t)·c_t + Σ_t p_t z_v,t (the P operand carries p·s_v, a per-token fp32 sum the zeros).
//  * Codes become fp16 with ONE lop3 per pair: a 2-bit field at bit 2e of each 16-bit half, masked out, is the
//    fp16 subnormal c·4^e·2^-24 (exact; tensor cores take subnormal inputs). Only the fields at e <= 4 are in the
//    mantissa, the three above come from the word shifted right by 6 (at 4^2..4^4). The 4^e factor of each
//    k-column of Kᵀ is folded into the matching column of Q; the 4^e of each row of Vᵀ (an output dim) is undone
//    when the accumulators are stored. Q is pre-scaled per head by a power of two so that q·4^(4-e) fills the
//    fp16 range without overflow.
//  * The order of dims inside the k-dimension of Q·Kᵀ and of the tokens inside the k-dimension of Vᵀ·Pᵀ is free
//    (it only has to agree between the two operands), which is used to make every fragment a plain load + lop3
//    from the staged page and the V reads conflict-free: the 8 tokens of an S n-tile are 0,4,1,5,2,6,3,7.
// Each warp streams its own tiles (16 tokens, one page's codes + fp16 (scale, zero) pairs for K and V) through a
// private cp.async ring in shared memory; the online softmax updates once per stage of kInt2TilesPerStage tiles.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "formats/kv_layout.h"
#include "kernels/attention_decode/decode_attention.h"  // kDecodePhaseTraceWords
#include "kernels/common/device_utils.cuh"
#include "kernels/common/tma.cuh"

namespace oscar::kern::detail {

inline constexpr int kDecodeWarps = 4;
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr int kInt2TileTokens = 16;
inline constexpr int kInt2TilesPerStage = 4;
inline constexpr int kInt2Stages = 3;
// The INT2 kernel's ring is filled by TMA bulk copies on sm_90 and by cp.async below it (decode_attention_int2_kernel).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
inline constexpr bool kDecodeBulkCopies = true;
#else
inline constexpr bool kDecodeBulkCopies = false;
#endif

// Device view of one tensor's segmented page layout (formats/kv_layout.h SegmentedPageGeometry), precomputed per
// 16-dim block on the host (decode_attention.cu); read by decode_attention_seg.cuh.
inline constexpr int kSegMaxBlocks = 16;  // head_dim 256 / 16
struct SegDecodeLayout {
  int32_t page_bytes;
  int32_t record_bytes;
  int32_t param_pairs;
  int32_t params_tile_off;  // 16 * code_bytes: the pairs in a 16-token tile
  int32_t num_regions;      // code regions of segments with bits > 0, then the pairs
  int32_t region_rec_off[fmt::kMaxPageSegments + 1];    // in the record (a region starts at page_tokens times it)
  int32_t region_row_bytes[fmt::kMaxPageSegments + 1];
  int8_t blk_bits[kSegMaxBlocks];
  int8_t blk_param[kSegMaxBlocks];      // pair index of the block's segment
  int8_t blk_first[kSegMaxBlocks];      // block starts its segment
  int8_t blk_last[kSegMaxBlocks];       // block ends its segment
  int16_t blk_tile_off[kSegMaxBlocks];  // token 0's word of the block in the tile
  int16_t blk_row_bytes[kSegMaxBlocks];
};

struct DecodeArgs {
  int32_t num_q_heads;
  int32_t num_kv_heads;
  int32_t group;
  int32_t page_tokens;
  uint32_t page_magic;  // floor(2^32 / page_tokens) + 1, for page_index()
  const uint16_t* q;
  const float* rotation_k;
  const float* rotation_v;
  int64_t rotation_k_head_stride;  // DecodeAttentionParams: 0 = one matrix, head_dim² = one per KV head
  int64_t rotation_v_head_stride;
  float q_scale;  // softmax_scale * log2 e
  const int32_t* seq_lens;
  int64_t sink_tokens;
  int64_t recent_tokens;
  const uint8_t* k_int2_pool;
  const uint8_t* v_int2_pool;
  const uint16_t* k_bf16_pool;
  const uint16_t* v_bf16_pool;
  const int32_t* int2_page_table;
  const int32_t* bf16_page_table;
  int32_t max_pages;
  int32_t int2_splits;     // blocks per (sequence, KV head) of the INT2 kernel; 0 when it is not launched
  int32_t window_splits;   // same for the window kernel
  int32_t slot_stride;     // partial slots per (sequence, query head): INT2 slots first, then window slots
  int32_t window_slot0;    // first window slot
  float* q_rot;         // [batch, num_q_heads, head_dim]: rotated, pre-scaled query
  float* partial_ml;    // [batch, num_q_heads, slot_stride, 2]: running max (log2 domain) and sum of exp2
  float* partial_acc;   // [batch, num_q_heads, slot_stride, head_dim]: unnormalized rotated-basis output
  float* out;
  uint16_t* out_bf16;
  SegDecodeLayout k_seg;  // segmented layers only (decode_attention_seg.cuh)
  SegDecodeLayout v_seg;
  unsigned int* tickets;  // [batch, num_kv_heads]: split blocks done (fused INT2 kernel), zeroed by rotate_q
  unsigned long long* phase_trace;  // DecodeAttentionParams::phase_trace
};

// Phase timestamps of the fused INT2 kernel (DecodeAttentionParams::phase_trace): thread 0 of each block.
__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
static_assert(kDecodePhaseTraceWords == 10, "PhaseTrace writes words 0..9 of its row (decode_attention.h)");
struct PhaseTrace {
  unsigned long long* row = nullptr;  // this block's words, null when not tracing or not thread 0
  long long start = 0;
  __device__ void begin(const DecodeArgs& a) {
    if (a.phase_trace == nullptr || threadIdx.x != 0) return;
    row = a.phase_trace +
          (blockIdx.x + static_cast<size_t>(gridDim.x) * (blockIdx.y + static_cast<size_t>(gridDim.y) * blockIdx.z)) *
              kDecodePhaseTraceWords;
    row[0] = global_timer_ns();
    start = clock64();
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    row[8] = sm;
    row[7] = 0;
    row[9] = 0;
  }
  __device__ void mark(int word) {
    if (row) row[word] = static_cast<unsigned long long>(clock64() - start);
  }
  __device__ void end(bool merged) {
    if (!row) return;
    row[9] = merged;
    row[1] = global_timer_ns();
  }
};

// floor(t / page_tokens) without an integer division: a runtime divisor costs ~20 instructions, and the INT2 loop
// needs two page indices per 16-token tile. umulhi(t, floor(2^32/d) + 1) over-estimates by at most one for any
// t < 2^32 (the error is t·(m - 2^32/d)/2^32 < 1), which the one multiply-compare corrects.
__device__ __forceinline__ int page_index(const DecodeArgs& a, int t) {
  uint32_t q = __umulhi(static_cast<uint32_t>(t), a.page_magic);
  if (q * static_cast<uint32_t>(a.page_tokens) > static_cast<uint32_t>(t)) --q;
  return static_cast<int>(q);
}

// 2^x as one MUFU.EX2 with results below 2^-126 flushed to 0. exp2f adds a range test and two multiplies around
// it to return those denormals (4 instructions instead of 1): 16 of them per stage of the INT2 loop, for
// probabilities that no fp16 P fragment or fp32 sum can resolve next to the running maximum's 1. exp2(-inf) = 0.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float warp_max_reduce(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Programmatic dependent launch (sm_90): the fused INT2 kernel is launched while rotate_q still runs, streams its
// first K/V tiles (inputs written before rotate_q started) and waits here only before reading q_rot/tickets.
// Both are no-ops for a kernel launched without the programmatic-serialization attribute.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Tokens of sequence b that are read from bf16 pages: [0, sink_count) and [len - recent_count, len).
struct WindowCounts {
  int32_t sink_count;
  int32_t recent_count;
};
__device__ __forceinline__ WindowCounts window_counts(const DecodeArgs& a, int32_t len) {
  const int64_t sc = a.sink_tokens < len ? a.sink_tokens : len;
  const int64_t rest = len - sc;
  const int64_t rc = a.recent_tokens < rest ? a.recent_tokens : rest;
  return {static_cast<int32_t>(sc), static_cast<int32_t>(rc)};
}

// ---------------------------------------------------------------------------------------------------------------
// 1. q·R_k. Block (column chunk of 32, KV head, sequence), 8 warps: warp w sums rows [w·d/8, (w+1)·d/8) of R_k
// for its 32 columns with every load of the slice in flight at once (a loop of dependent L2 round trips here
// used to cost ~35 µs per decode step), then warp 0 adds the 8 slices in a fixed order.
inline constexpr int kRotateColumns = 32;
inline constexpr int kRotateSlices = 8;
template <int kHeadDim, int kMaxGroup>
__global__ void __launch_bounds__(kRotateSlices * 32) decode_rotate_q_kernel(DecodeArgs a) {
  constexpr int kRows = kHeadDim / kRotateSlices;
  __shared__ float q_raw[kMaxGroup][kHeadDim];
  __shared__ float partial[kRotateSlices][kMaxGroup][kRotateColumns];
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int group = a.group;
  // The dependent (fused INT2) grid may launch once every block of this one has passed this point, i.e. has
  // started, so it cannot take SM slots this grid still needs; its griddepcontrol.wait still waits for this
  // grid's completion and sees every write below.
  pdl_launch_dependents();
  if (blockIdx.x == 0 && threadIdx.x == 0 && a.tickets) a.tickets[static_cast<size_t>(b) * a.num_kv_heads + h] = 0u;
  for (int idx = threadIdx.x; idx < kMaxGroup * kHeadDim; idx += blockDim.x) {
    const int g = idx / kHeadDim;
    const int i = idx - g * kHeadDim;
    q_raw[g][i] = g < group ? bf16_bits_to_float(
                                  a.q[(static_cast<size_t>(b) * a.num_q_heads + h * group + g) * kHeadDim + i])
                            : 0.f;
  }
  __syncthreads();
  const int jj = threadIdx.x & 31;
  const int slice = threadIdx.x >> 5;
  const int j = blockIdx.x * kRotateColumns + jj;
  float acc[kMaxGroup];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) acc[g] = 0.f;
  if (a.rotation_k) {
    const float* rot = a.rotation_k + h * a.rotation_k_head_stride;  // KV head h's matrix
    float r[kRows];
#pragma unroll
    for (int ii = 0; ii < kRows; ++ii) r[ii] = __ldg(rot + static_cast<size_t>(slice * kRows + ii) * kHeadDim + j);
#pragma unroll
    for (int ii = 0; ii < kRows; ++ii)
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) acc[g] = fmaf(q_raw[g][slice * kRows + ii], r[ii], acc[g]);
  } else if (slice == 0) {
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) acc[g] = q_raw[g][j];
  }
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) partial[slice][g][jj] = acc[g];
  __syncthreads();
  if (slice == 0) {
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g >= group) break;
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kRotateSlices; ++w) sum += partial[w][g][jj];
      a.q_rot[(static_cast<size_t>(b) * a.num_q_heads + h * group + g) * kHeadDim + j] = sum * a.q_scale;
    }
  }
}

// Block epilogue shared by both split kernels: combines kDecodeWarps per-warp partials (max, sum, acc over the
// warp's tokens, stored in shared memory) into the block's slot of the workspace.
template <int kHeadDim, int kMaxGroup, int kWarps = kDecodeWarps>
__device__ __forceinline__ void write_block_partial(const DecodeArgs& a, int b, int h, int slot, const float* warp_acc,
                                                    const float (*warp_max)[kMaxGroup],
                                                    const float (*warp_sum_l)[kMaxGroup]) {
  const int group = a.group;
  for (int idx = threadIdx.x; idx < group * kHeadDim; idx += blockDim.x) {
    const int g = idx / kHeadDim;
    const int j = idx - g * kHeadDim;
    float block_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) block_max = fmaxf(block_max, warp_max[w][g]);
    float sum_l = 0.f, value = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (warp_max[w][g] == -INFINITY) continue;  // a warp without tokens: its accumulators were never written
      const float weight = exp2f(warp_max[w][g] - block_max);
      sum_l = fmaf(weight, warp_sum_l[w][g], sum_l);
      value = fmaf(weight, warp_acc[(w * kMaxGroup + g) * kHeadDim + j], value);
    }
    const size_t partial = (static_cast<size_t>(b) * a.num_q_heads + h * group + g) * a.slot_stride + slot;
    a.partial_acc[partial * kHeadDim + j] = value;
    if (j == 0) {
      a.partial_ml[2 * partial] = block_max;
      a.partial_ml[2 * partial + 1] = sum_l;
    }
  }
}

// Warp epilogue of the CUDA-core split kernels (window, FP8), where a token is spread over kLanesPerToken lanes
// and lane `sub` owns kDims dims: sums the warp's token slots (lanes with the same `sub`; m is already
// warp-uniform) and stores the warp's partial for write_block_partial.
template <int kHeadDim, int kMaxGroup, int kLanesPerToken, int kDims>
__device__ __forceinline__ void store_warp_partial(const float (&m)[kMaxGroup], float (&l)[kMaxGroup],
                                                   float (&acc)[kMaxGroup][kDims], float* warp_acc,
                                                   float (*warp_max)[kMaxGroup], float (*warp_sum_l)[kMaxGroup]) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int sub = lane % kLanesPerToken;
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
#pragma unroll
    for (int o = kLanesPerToken; o < 32; o <<= 1) {
      l[g] += __shfl_xor_sync(0xffffffffu, l[g], o);
#pragma unroll
      for (int i = 0; i < kDims; ++i) acc[g][i] += __shfl_xor_sync(0xffffffffu, acc[g][i], o);
    }
  }
  if (lane < kLanesPerToken) {  // token slot 0
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
      for (int i = 0; i < kDims; ++i) warp_acc[(warp * kMaxGroup + g) * kHeadDim + sub * kDims + i] = acc[g][i];
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      warp_max[warp][g] = m[g];
      warp_sum_l[warp][g] = l[g];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// 2. INT2 path (see the header comment).

// Shared-memory image of one stage of kInt2TilesPerStage 16-token tiles, planar: the stage's K code rows (tile by
// tile), its V code rows, its K (scale, zero) pairs, its V pairs. A stage is four consecutive tiles, so where they
// sit in one page (64-token aligned, pages of a multiple of 64 tokens) each plane is one contiguous run in the pool
// too, and the TMA unit fills the stage with four bulk copies. Offsets below are from the stage's start; tile tt's
// codes are at plane + tt·kCodeBytes, its pairs at plane + tt·kParamBytes.
template <int kHeadDim>
struct Int2TileSmem {
  static constexpr int kRowBytes = kHeadDim / 4;
  static constexpr int kCodeBytes = kInt2TileTokens * kRowBytes;
  static constexpr int kParamBytes = kInt2TileTokens * 4;
  static constexpr int kKCodes = 0;
  static constexpr int kVCodes = kInt2TilesPerStage * kCodeBytes;
  static constexpr int kKParams = 2 * kInt2TilesPerStage * kCodeBytes;
  static constexpr int kVParams = kKParams + kInt2TilesPerStage * kParamBytes;
  static constexpr int kBytes = 2 * kCodeBytes + 2 * kParamBytes;  // one tile's share
  static constexpr int kStageBytes = kInt2TilesPerStage * kBytes;
  static constexpr int kWarpBytes = kInt2Stages * kStageBytes;
  static constexpr int kBlockBytes = kDecodeWarps * kWarpBytes;
  static_assert(kBytes % 16 == 0 && kCodeBytes % 16 == 0 && kParamBytes % 16 == 0);
  static_assert(kVParams + kInt2TilesPerStage * kParamBytes == kStageBytes);
  // Token `tok` of tile `tt`'s (scale, zero) fp16 pair in a stage (K or V), widened to fp32.
  __device__ __forceinline__ static float2 pair(const uint8_t* stage, bool value, int tt, int tok);
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const auto s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// D = A·B + D, m16n8k16, A row-major fp16, B col-major fp16, fp32 accumulators.
__device__ __forceinline__ void mma_f16_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                              uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Field e (0..7) of a word holding two runs of eight 2-bit codes (one per 16-bit half), as an fp16x2 pair of
// subnormals c·4^code_pow4(e)·2^-24. `w6` is w >> 6.
__host__ __device__ constexpr int code_pow4(int e) { return e <= 4 ? e : e - 3; }
// e is a compile-time constant after unrolling, so the select and the shifts fold away.
__device__ __forceinline__ uint32_t code_pair(uint32_t w, uint32_t w6, int e) {
  return e <= 4 ? (w & (0x00030003u << (2 * e))) : (w6 & (0x00030003u << (2 * e - 6)));
}

// N consecutive 32-bit words from shared memory in one vector load (N*4 bytes aligned).
template <int N>
__device__ __forceinline__ void lds_words(const uint8_t* p, uint32_t (&w)[N]) {
  if constexpr (N == 1) {
    w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else if constexpr (N == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x;
    w[1] = v.y;
  } else {
    static_assert(N == 4);
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  }
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ float2 half2_bits_to_float2(uint32_t bits) {
  __half2 h;
  *reinterpret_cast<uint32_t*>(&h) = bits;
  return __half22float2(h);
}

template <int kHeadDim>
__device__ __forceinline__ float2 Int2TileSmem<kHeadDim>::pair(const uint8_t* stage, bool value, int tt, int tok) {
  return half2_bits_to_float2(
      *reinterpret_cast<const uint32_t*>(stage + (value ? kVParams : kKParams) + tt * kParamBytes + tok * 4));
}

// ---------------------------------------------------------------------------------------------------------------
// Fused variant (DecodeAttentionVariant::Fused): the INT2 kernel's blocks also take the bf16 window tokens and the
// last block of each (sequence, KV head) merges the splits. Both run after the INT2 tiles, in the freed ring:
//   [per-warp partials: kDecodeWarps INT2 warps + 1 window "warp"] [q: 8 x d fp32] [p: 8 x chunk fp32]
//   [page ids: chunk] [K rows: chunk x d bf16] [V rows: chunk x d bf16]
// The window is a block-wide two-pass softmax per chunk of kWinChunk tokens (scores to shared memory, then each
// thread owns (head, dim) outputs and sums p·v over the chunk), so it holds a few registers, not a d-wide query
// and accumulator per head; its rows arrive with one round of cp.async per chunk.
inline constexpr int kWinChunk = 48;
template <int kHeadDim>
struct FusedSmem {
  static constexpr int kMaxGroup = 8;
  static constexpr int kPartWarps = kDecodeWarps + 1;
  static constexpr int kAcc = 0;
  static constexpr int kQ = kAcc + kPartWarps * kMaxGroup * kHeadDim * 4;
  static constexpr int kP = kQ + kMaxGroup * kHeadDim * 4;
  static constexpr int kPages = kP + kMaxGroup * kWinChunk * 4;
  static constexpr int kKRows = kPages + kWinChunk * 4;
  static constexpr int kVRows = kKRows + kWinChunk * kHeadDim * 2;
  static constexpr int kBytes = kVRows + kWinChunk * kHeadDim * 2;
  static_assert(kKRows % 16 == 0 && kVRows % 16 == 0);
  static_assert(kBytes <= Int2TileSmem<kHeadDim>::kBlockBytes, "the fused window/merge scratch must fit the ring");
};

// Outputs (head g, dim j) owned by a thread of a 128-thread block when it walks all kHeads x kHeadDim of them:
// r-th output is head head(r), dim dim(r). Heads vary slowest so a warp shares one head (broadcast reads). kHeads
// is the launch's bound on the query group (4 for the narrow layout, 8 otherwise), so a group of 4 does not carry
// (and issue predicated-off instructions for) four empty heads.
template <int kHeadDim, int kHeads = 8>
struct BlockOutputs {
  static constexpr int kThreads = kDecodeWarps * 32;
  static constexpr int kCount = kHeads * kHeadDim / kThreads;     // kHeads = 8: 4, 8, 16; kHeads = 4: 2, 4, 8
  static constexpr int kDimsPer = kHeadDim >= kThreads ? kHeadDim / kThreads : 1;  // distinct dims per thread
  static_assert(kCount >= 1 && kCount % kDimsPer == 0);
  __device__ static int head(int r, int tid) {
    if constexpr (kHeadDim >= kThreads) return r / kDimsPer;
    else return r * (kThreads / kHeadDim) + tid / kHeadDim;
  }
  __device__ static int dim(int r, int tid) {
    if constexpr (kHeadDim >= kThreads) return tid + kThreads * (r % kDimsPer);
    else return tid % kHeadDim;
  }
};

// The block's share of sequence b's window tokens (virtual index v in [0, sink_count + recent_count)) into
// partial slot kDecodeWarps of the shared partials. Block-uniform control flow (barriers inside). kHeads bounds the
// group (see BlockOutputs).
template <int kHeadDim, int kHeads>
__device__ __forceinline__ void fused_window_partial(const DecodeArgs& a, uint8_t* smem, int b, int h, int split,
                                                     int len, const WindowCounts& wc, int win_page0,
                                                     float (*warp_max)[8], float (*warp_sum_l)[8]) {
  using L = FusedSmem<kHeadDim>;
  using Out = BlockOutputs<kHeadDim, kHeads>;
  constexpr int kMaxGroup = 8;
  constexpr int kThreads = kDecodeWarps * 32;
  static_assert(kWinChunk % 4 == 0, "p is read four tokens at a time");
  constexpr int kRowChunks = kHeadDim * 2 / 16;  // 16-byte pieces of a bf16 row
  constexpr int kSubDims = kHeadDim / 8;         // dims per lane in the score pass (8 lanes per token)
  __shared__ float win_m[kMaxGroup], win_l[kMaxGroup], win_corr[kMaxGroup];
  float* acc_s = reinterpret_cast<float*>(smem + L::kAcc) + kDecodeWarps * kMaxGroup * kHeadDim;
  float* q_s = reinterpret_cast<float*>(smem + L::kQ);
  float* p_s = reinterpret_cast<float*>(smem + L::kP);
  int* page_s = reinterpret_cast<int*>(smem + L::kPages);
  uint16_t* k_rows = reinterpret_cast<uint16_t*>(smem + L::kKRows);
  uint16_t* v_rows = reinterpret_cast<uint16_t*>(smem + L::kVRows);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int group = a.group;
  const int count = wc.sink_count + wc.recent_count;
  const int recent_shift = len - wc.recent_count - wc.sink_count;
  const int per = (count + a.int2_splits - 1) / a.int2_splits;
  const int wbeg = min(count, split * per);
  const int wend = min(count, wbeg + per);
  const fmt::Bf16PageGeometry geo{kHeadDim, a.page_tokens};
  const size_t table_row = static_cast<size_t>(b) * a.max_pages;

  // All of the group's query loads in flight at once (a loop of load-then-store would be `group` L2 round trips
  // on this block's critical path); heads group .. kHeads-1 are zeros, so the score pass can run every head.
  {
    constexpr int kPer = kHeads * kHeadDim / kThreads;
    float qv[kPer];
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      const int idx = tid + r * kThreads;
      qv[r] = idx < group * kHeadDim
                  ? a.q_rot[(static_cast<size_t>(b) * a.num_q_heads + h * group) * kHeadDim + idx]
                  : 0.f;
    }
#pragma unroll
    for (int r = 0; r < kPer; ++r) q_s[tid + r * kThreads] = qv[r];
  }
  if (tid < kMaxGroup) {
    win_m[tid] = -INFINITY;
    win_l[tid] = 0.f;
  }
  float acc[Out::kCount];
#pragma unroll
  for (int r = 0; r < Out::kCount; ++r) acc[r] = 0.f;

  for (int c0 = wbeg; c0 < wend; c0 += kWinChunk) {
    const int n = min(kWinChunk, wend - c0);
    if (tid < n) {
      const int v = c0 + tid;
      const int t = v < wc.sink_count ? v : v + recent_shift;
      page_s[tid] = c0 == wbeg ? win_page0 : a.bf16_page_table[table_row + page_index(a, t)];
    }
    __syncthreads();
    for (int item = tid; item < n * 2 * kRowChunks; item += kThreads) {
      const int tok = item / (2 * kRowChunks);
      const int rem = item - tok * 2 * kRowChunks;
      const bool value = rem >= kRowChunks;
      const int piece = value ? rem - kRowChunks : rem;
      const int v = c0 + tok;
      const int t = v < wc.sink_count ? v : v + recent_shift;
      const int offset = t - page_index(a, t) * a.page_tokens;
      const uint16_t* src = (value ? a.v_bf16_pool : a.k_bf16_pool) +
                            fmt::page_block_offset(page_s[tok], h, a.num_kv_heads, geo.page_bytes()) / 2 +
                            static_cast<size_t>(offset) * kHeadDim + piece * 8;
      cp_async16((value ? v_rows : k_rows) + tok * kHeadDim + piece * 8, src);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    // Scores (log2 domain: q_rot is pre-scaled): 8 lanes per token, kSubDims dims each.
    {
      const int sub = lane & 7;
      const unsigned mask = 0xffu << (lane & 24);
      for (int tok = tid >> 3; tok < n; tok += kThreads / 8) {
        float k[kSubDims];
#pragma unroll
        for (int v8 = 0; v8 < kSubDims / 8; ++v8) {
          const uint4 raw = *reinterpret_cast<const uint4*>(k_rows + tok * kHeadDim + sub * kSubDims + 8 * v8);
          const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            k[8 * v8 + 2 * w] = __uint_as_float(words[w] << 16);
            k[8 * v8 + 2 * w + 1] = __uint_as_float(words[w] & 0xffff0000u);
          }
        }
        // Every head of the bound, without a branch on the group (heads past it have zero queries and their
        // scores are never read), so the heads' FMA chains and shuffles interleave.
        // Four heads at a time: eight dot products live at once spilled more at the 128-register bound.
#pragma unroll
        for (int g0 = 0; g0 < kHeads; g0 += 4) {
          float dot[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const float* qg = q_s + (g0 + u) * kHeadDim + sub * kSubDims;
            dot[u] = 0.f;
#pragma unroll
            for (int i = 0; i < kSubDims; ++i) dot[u] = fmaf(qg[i], k[i], dot[u]);
          }
#pragma unroll
          for (int off = 1; off < 8; off <<= 1)
#pragma unroll
            for (int u = 0; u < 4; ++u) dot[u] += __shfl_xor_sync(mask, dot[u], off);
          if (sub == 0) {
#pragma unroll
            for (int u = 0; u < 4; ++u) p_s[(g0 + u) * kWinChunk + tok] = dot[u];
          }
        }
      }
    }
    __syncthreads();
    // Per head: chunk max, running max/sum, p = exp2(s - max) in place. A warp per head.
    for (int g = warp; g < group; g += kDecodeWarps) {
      static_assert(kWinChunk <= 64);
      float* pg = p_s + g * kWinChunk;
      const float x0 = lane < n ? pg[lane] : -INFINITY;
      const float x1 = lane + 32 < n ? pg[lane + 32] : -INFINITY;
      const float chunk_max = warp_max_reduce(fmaxf(x0, x1));
      const float m_old = win_m[g];
      const float m_new = fmaxf(m_old, chunk_max);  // finite: the chunk has a token
      const float corr = exp2f(m_old - m_new);      // 0 on the first chunk
      const float p0 = lane < n ? exp2f(x0 - m_new) : 0.f;
      const float p1 = lane + 32 < n ? exp2f(x1 - m_new) : 0.f;
      // The whole chunk's p, zeros past n: the p·v loop reads four tokens at a time.
      pg[lane] = p0;
      if (lane + 32 < kWinChunk) pg[lane + 32] = p1;
      const float chunk_sum = warp_sum(p0 + p1);
      __syncwarp();
      if (lane == 0) {
        win_l[g] = fmaf(win_l[g], corr, chunk_sum);
        win_m[g] = m_new;
        win_corr[g] = corr;
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < Out::kCount; ++r) {
      const int g = Out::head(r, tid);
      if (g < group) acc[r] *= win_corr[g];
    }
    // p·v four tokens at a time: one broadcast float4 of p per head and the thread's dims of four V rows loaded
    // before any FMA (the loop was one dependent shared-memory round trip per token and head). Each accumulator
    // still adds its tokens in order. Rows past n hold stale bytes (maybe NaN patterns): selected to 0, and p
    // is 0 there too.
    for (int t4 = 0; t4 < n; t4 += 4) {
      float vv[Out::kDimsPer][4];
#pragma unroll
      for (int dd = 0; dd < Out::kDimsPer; ++dd)
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const float v = __uint_as_float(static_cast<uint32_t>(v_rows[(t4 + u) * kHeadDim + Out::dim(dd, tid)]) << 16);
          vv[dd][u] = t4 + u < n ? v : 0.f;
        }
#pragma unroll
      for (int r = 0; r < Out::kCount; ++r) {
        const int g = Out::head(r, tid);
        if (g >= group) continue;
        const float4 p4 = *reinterpret_cast<const float4*>(p_s + g * kWinChunk + t4);
        const float* v = vv[r % Out::kDimsPer];
        acc[r] = fmaf(p4.x, v[0], acc[r]);
        acc[r] = fmaf(p4.y, v[1], acc[r]);
        acc[r] = fmaf(p4.z, v[2], acc[r]);
        acc[r] = fmaf(p4.w, v[3], acc[r]);
      }
    }
    __syncthreads();  // the next chunk overwrites the rows, the page ids and p
  }

#pragma unroll
  for (int r = 0; r < Out::kCount; ++r) {
    const int g = Out::head(r, tid);
    if (g < group) acc_s[g * kHeadDim + Out::dim(r, tid)] = acc[r];
  }
  __syncthreads();  // win_m / win_l of the last chunk (or their initial values when the share is empty)
  if (tid < kMaxGroup) {
    warp_max[kDecodeWarps][tid] = win_m[tid];  // -inf: no window token in this block, the slot is skipped
    warp_sum_l[kDecodeWarps][tid] = win_l[tid];
  }
}

// Merge of all split partials of (b, h) by the block that finished last, in split order (the arrival order does
// not enter the arithmetic, so the output bits are the same every run), then R_vᵀ. Reads other blocks' stores, so
// the loads go to L2 (__ldcg), never a stale L1 line. This block's latency is the tail of the whole call, so the
// loads are batched: split weights for a chunk of splits go to shared memory in one parallel pass, then each
// thread loads kU splits' accumulators for all its outputs before it does any arithmetic (at batch 1 there are
// ~66 splits: ~17 L2 round trips instead of one per split and output).
inline constexpr int kMergeChunk = 256;
template <int kHeadDim, int kHeads>
__device__ __forceinline__ void fused_merge(const DecodeArgs& a, uint8_t* smem, int b, int h) {
  using Out = BlockOutputs<kHeadDim, kHeads>;
  constexpr int kMaxGroup = 8;
  constexpr int kThreads = kDecodeWarps * 32;
  // Splits per batch of loads (kU x kCount registers, live only here): at batch 1 there are ~66 splits, and each
  // batch is one L2 round trip on the tail of the whole call.
  constexpr int kU = Out::kCount <= 4 ? 16 : 4;
  __shared__ float head_max[kMaxGroup];
  float* o_rot = reinterpret_cast<float*>(smem);  // [kMaxGroup][kHeadDim]
  float* w_s = o_rot + kMaxGroup * kHeadDim;      // [kMaxGroup][kMergeChunk]: exp2(m_s - max)
  float* l_s = w_s + kMaxGroup * kMergeChunk;     // [kMaxGroup][kMergeChunk]: l_s
  static_assert((2 * kMergeChunk + kHeadDim) * kMaxGroup * 4 <= Int2TileSmem<kHeadDim>::kBlockBytes);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int group = a.group;
  const int splits = a.int2_splits;
  const size_t row0 = static_cast<size_t>(b) * a.num_q_heads + static_cast<size_t>(h) * group;
  for (int g = warp; g < group; g += kDecodeWarps) {
    const float* ml = a.partial_ml + (row0 + g) * a.slot_stride * 2;
    float mx = -INFINITY;
    for (int s = lane; s < splits; s += 32) mx = fmaxf(mx, __ldcg(ml + 2 * s));
    mx = warp_max_reduce(mx);
    if (lane == 0) head_max[g] = mx;
  }
  float sum_l[Out::kCount], value[Out::kCount];
#pragma unroll
  for (int r = 0; r < Out::kCount; ++r) sum_l[r] = value[r] = 0.f;
  for (int c0 = 0; c0 < splits; c0 += kMergeChunk) {
    const int n = min(kMergeChunk, splits - c0);
    __syncthreads();  // head_max (first chunk); the previous chunk's weights are consumed
    // Four (head, split) pairs per thread per round, their loads issued before any use.
    for (int idx0 = tid; idx0 < group * n; idx0 += 4 * kThreads) {
      float2 ml[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int idx = idx0 + u * kThreads;
        const int g = idx / n;
        ml[u] = idx < group * n
                    ? __ldcg(reinterpret_cast<const float2*>(a.partial_ml) + (row0 + g) * a.slot_stride + c0 + idx - g * n)
                    : make_float2(0.f, 0.f);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int idx = idx0 + u * kThreads;
        if (idx >= group * n) break;
        const int g = idx / n;
        const int s = idx - g * n;
        // A head no split saw a token for (max -inf) gets weight 0 everywhere: output 0. An empty split: 0.
        w_s[g * kMergeChunk + s] = head_max[g] == -INFINITY ? 0.f : exp2f(ml[u].x - head_max[g]);
        l_s[g * kMergeChunk + s] = ml[u].y;
      }
    }
    __syncthreads();
    for (int s0 = 0; s0 < n; s0 += kU) {
      float av[kU][Out::kCount];
#pragma unroll
      for (int u = 0; u < kU; ++u)
#pragma unroll
        for (int r = 0; r < Out::kCount; ++r) {
          const int g = Out::head(r, tid);
          av[u][r] = g < group && s0 + u < n
                         ? __ldcg(a.partial_acc + ((row0 + g) * a.slot_stride + c0 + s0 + u) * kHeadDim +
                                  Out::dim(r, tid))
                         : 0.f;
        }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (s0 + u >= n) break;
#pragma unroll
        for (int r = 0; r < Out::kCount; ++r) {
          const int g = Out::head(r, tid);
          if (g >= group) continue;
          const float w = w_s[g * kMergeChunk + s0 + u];
          sum_l[r] = fmaf(w, l_s[g * kMergeChunk + s0 + u], sum_l[r]);
          value[r] = fmaf(w, av[u][r], value[r]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < Out::kCount; ++r) {
    const int g = Out::head(r, tid);
    if (g < group) o_rot[g * kHeadDim + Out::dim(r, tid)] = sum_l[r] > 0.f ? value[r] / sum_l[r] : 0.f;
  }
  __syncthreads();
  for (int j = tid; j < kHeadDim; j += kThreads) {
    float x[kHeads];
    if (!a.rotation_v) {
#pragma unroll
      for (int g = 0; g < kHeads; ++g) x[g] = o_rot[g * kHeadDim + j];
    } else {
      // x_j = Σ_i y_i R[j][i], i ascending: thread j walks row j of R_v (float4, L1-cached), y broadcast. The row's
      // loads are issued in batches before any FMA (a branch on the group inside the loop kept the compiler from
      // hoisting them: 32 dependent L2 round trips, ~10 us of every call's tail); heads past the group compute
      // on stale shared memory and are never stored.
#pragma unroll
      for (int g = 0; g < kHeads; ++g) x[g] = 0.f;
      const float4* row = reinterpret_cast<const float4*>(a.rotation_v + h * a.rotation_v_head_stride +
                                                          static_cast<size_t>(j) * kHeadDim);
      constexpr int kBatch = 16;
      static_assert((kHeadDim / 4) % kBatch == 0);
#pragma unroll 1
      for (int i0 = 0; i0 < kHeadDim / 4; i0 += kBatch) {
        float4 rv[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) rv[u] = __ldg(row + i0 + u);
#pragma unroll
        for (int u = 0; u < kBatch; ++u)
#pragma unroll
          for (int g = 0; g < kHeads; ++g) {
            const float4 y = *reinterpret_cast<const float4*>(o_rot + g * kHeadDim + 4 * (i0 + u));
            x[g] = fmaf(y.x, rv[u].x, x[g]);
            x[g] = fmaf(y.y, rv[u].y, x[g]);
            x[g] = fmaf(y.z, rv[u].z, x[g]);
            x[g] = fmaf(y.w, rv[u].w, x[g]);
          }
      }
    }
#pragma unroll
    for (int g = 0; g < kHeads; ++g) {
      if (g >= group) break;
      const size_t o = (row0 + g) * kHeadDim + j;
      if (a.out) a.out[o] = x[g];
      else a.out_bf16[o] = float_to_bf16_bits(x[g]);
    }
  }
}

// 8x8 b16 matrix transpose across the warp (sm_75+): the fragment "lane holds row lane/4, columns 2(lane%4) and
// +1" becomes the same fragment of the transpose.
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// Oᵀ += Vᵀ·Pᵀ for one 16-token tile of the INT2 kernel: this lane's V code bytes (dims g·d/8 .. (g+1)·d/8) of
// tokens tok[0..3], which are the value MMA's k = 2c, 2c+1, 2c+8, 2c+9 in the order the P fragments pb0 / pb1 were
// built (the narrow and the wide score layouts order the tile's tokens differently), dequantized in the MMA: rows g,
// g+8 of m-tile mt = 4ch + e2 are lane dims 8ch + 2e2 (+1). `tile` is the tile's K code rows in its stage; its V
// rows are at tile + Tile::kVCodes (Int2TileSmem's planes).
template <int kHeadDim, class Tile>
__device__ __forceinline__ void value_tile_mma(float (&o)[kHeadDim / 16][4], const uint8_t* tile, int g,
                                               const int (&tok)[4], uint32_t pb0, uint32_t pb1) {
  constexpr int kVBytes = kHeadDim / 32;   // V code bytes per lane and token (lane owns d/8 dims)
  constexpr int kVChunks = kHeadDim / 64;  // 16-bit (8-dim) V chunks per lane and token
  uint32_t vw[4][(kVChunks + 1) / 2];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint8_t* src = tile + Tile::kVCodes + tok[q] * Tile::kRowBytes + g * kVBytes;
    if constexpr (kVBytes == 2) {
      vw[q][0] = *reinterpret_cast<const uint16_t*>(src);
    } else {
      lds_words<kVBytes / 4>(src, vw[q]);
    }
  }
#pragma unroll
  for (int ch = 0; ch < kVChunks; ++ch) {
    const uint32_t sel = (ch & 1) ? 0x7632u : 0x5410u;
    const uint32_t y0 = __byte_perm(vw[0][ch / 2], vw[1][ch / 2], sel);  // tokens tok[0] | tok[1]
    const uint32_t y1 = __byte_perm(vw[2][ch / 2], vw[3][ch / 2], sel);  // tokens tok[2] | tok[3]
    const uint32_t y0s = y0 >> 6, y1s = y1 >> 6;
#pragma unroll
    for (int e2 = 0; e2 < 4; ++e2)
      mma_f16_16816(o[4 * ch + e2], code_pair(y0, y0s, 2 * e2), code_pair(y0, y0s, 2 * e2 + 1),
                    code_pair(y1, y1s, 2 * e2), code_pair(y1, y1s, 2 * e2 + 1), pb0, pb1);
  }
}

// kNarrow (groups of at most 4 query heads, fused launch only): S is computed transposed, Sᵀ = K·Qᵀ, with the 16
// tokens of a tile as MMA rows and 8 columns = the group's (up to 4) heads' fp16 hi parts, then their lo parts.
// The default layout puts heads on the 16 rows (8 hi + 8 lo), so at group <= 4 half its rows are empty and a
// tile costs 16 score MMAs; transposed it costs 8, and the query operand (B) takes 2 registers per k-step instead
// of 4. The price: the hi and lo columns sit in lanes c and c^2 (one shuffle each), and P, which leaves the score
// MMA as (token rows, head columns), is moved into the value MMA's B layout (tokens as k) with movmatrix.trans.
template <int kHeadDim, bool kFused = false, bool kNarrow = false>
__global__ void __launch_bounds__(kDecodeWarps * 32, kHeadDim <= 128 ? 4 : 2)
    decode_attention_int2_kernel(DecodeArgs a) {
  static_assert(!kNarrow || kFused, "the narrow layout is instantiated for the fused launch only");
  using Tile = Int2TileSmem<kHeadDim>;
  constexpr int kKSteps = kHeadDim / 16;   // k-steps of Q·Kᵀ = m-tiles of Vᵀ·Pᵀ
  constexpr int kKWords = kHeadDim / 64;   // 32-bit K code words per lane and token (lane owns d/4 dims)
  constexpr int kMaxGroup = 8;
  constexpr int kPartWarps = kDecodeWarps + (kFused ? 1 : 0);  // + the window's partial
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float warp_max[kPartWarps][kMaxGroup];
  __shared__ float warp_sum_l[kPartWarps][kMaxGroup];

  const int split = blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;  // MMA group id: query head of S rows / P columns, V row owner
  const int c = lane & 3;   // thread in group
  const int group = a.group;
  PhaseTrace trace;
  if constexpr (kFused) trace.begin(a);
  const int len = a.seq_lens[b];

  // This block's tiles: the sequence's INT2 token range [lo, hi) in 16-token tiles, shared evenly by the splits.
  const WindowCounts wc = window_counts(a, len);
  const int lo = wc.sink_count;
  const int hi = len - wc.recent_count;
  int begin = 0, end = 0, tile_begin = 0, tile_end = 0;
  if (hi > lo) {
    const int first = lo / kInt2TileTokens;
    const int tiles = (hi - 1) / kInt2TileTokens + 1 - first;
    // Whole stages of tiles per split, so that a split starting on a 64-token boundary keeps every stage on one.
    const int per_split = ((tiles + a.int2_splits - 1) / a.int2_splits + kInt2TilesPerStage - 1) /
                          kInt2TilesPerStage * kInt2TilesPerStage;
    tile_begin = first + min(tiles, split * per_split);
    tile_end = first + min(tiles, (split + 1) * per_split);
    begin = max(lo, tile_begin * kInt2TileTokens);
    end = min(hi, tile_end * kInt2TileTokens);
  }
  // Warp w takes the stages (groups of kInt2TilesPerStage consecutive tiles) w, w + kDecodeWarps, ... of the split.
  const int split_stages = (tile_end - tile_begin + kInt2TilesPerStage - 1) / kInt2TilesPerStage;
  const int stages = split_stages > warp ? (split_stages - warp + kDecodeWarps - 1) / kDecodeWarps : 0;
  // First tile of this warp's stage `stage`; its tiles are stage_tile0 .. + kInt2TilesPerStage - 1 (those at or past
  // tile_end hold stale bytes and are masked like tokens outside [begin, end)).
  auto stage_tile0 = [&](int stage) { return tile_begin + kInt2TilesPerStage * (warp + stage * kDecodeWarps); };
  uint8_t* ring = smem + warp * Tile::kWarpBytes;

  const fmt::Int2PageGeometry geo{kHeadDim, a.page_tokens};
  const size_t table_row = static_cast<size_t>(b) * a.max_pages;
  // Page ids are loaded one stage before their cp.async is issued (lane tt holds tile tt's), so issuing never
  // waits on a page-table round trip.
  auto load_stage_pages = [&](int stage) {
    const int tile = stage_tile0(stage) + lane;
    if (lane >= kInt2TilesPerStage || stage >= stages || tile >= tile_end) return 0;
    return a.int2_page_table[table_row + page_index(a, tile * kInt2TileTokens)];
  };
  // V records sit at the same offset in the V pool as K records in the K pool.
  const int64_t kv_delta =
      reinterpret_cast<intptr_t>(a.v_int2_pool) - reinterpret_cast<intptr_t>(a.k_int2_pool);
  // sm_90 with stages that are page runs (use_bulk below): each warp's ring stages are filled by the TMA unit (four
  // bulk copies onto one full barrier per stage) instead of per-lane cp.async, which took ~175 of the loop's ~830
  // instructions per 4-tile stage (the address broadcast, 64-bit address arithmetic and three issue-slot-taking
  // placeholders per LDGSTS; ncu SASS at 8 x 128K) in a loop bound by instruction issue. A desk count of the SASS
  // puts the bulk version's stage at ~780.
  __shared__ __align__(8) uint64_t stage_full[kDecodeWarps][kInt2Stages];
  // 32-bit shared addresses, formed where used from the static base and the warp index (fewer live registers:
  // the wide layout's instantiation is at its 128-register bound).
  auto full_bar = [&](int stage) {
    return tma::smem_addr(&stage_full[0][0]) + 8u * static_cast<uint32_t>(warp * kInt2Stages + stage % kInt2Stages);
  };
  if constexpr (kDecodeBulkCopies) {
    if (lane == 0) {
#pragma unroll
      for (int s = 0; s < kInt2Stages; ++s) tma::mbarrier_init(&stage_full[warp][s], 1);
      tma::fence_mbarrier_init();
    }
    __syncwarp();
  }
  // sm_90, where the split starts on a stage boundary and pages hold whole stages (the default 64-token pages and
  // sink): every stage's four tiles are consecutive tokens of one page, each of the four planes one run in the
  // pool, and the TMA unit fills the stage (block-uniform choice).
  const bool use_bulk = kDecodeBulkCopies && a.page_tokens % (kInt2TilesPerStage * kInt2TileTokens) == 0 &&
                        tile_begin % kInt2TilesPerStage == 0;
  auto issue_stage = [&](int stage, int stage_pages) {
    if (stage < stages) {
      const int tile0 = stage_tile0(stage);
      const int tiles_here = min(kInt2TilesPerStage, tile_end - tile0);
      uint8_t* st = ring + (stage % kInt2Stages) * Tile::kStageBytes;
      // Lane tt < tiles_here forms tile tt's K code address (and the distance from it to the tile's (scale, zero)
      // pairs) from the page id it loaded.
      intptr_t my_codes = 0;
      int32_t my_params_delta = 0;
      if (lane < tiles_here) {
        const int t0 = (tile0 + lane) * kInt2TileTokens;
        const int offset = t0 - page_index(a, t0) * a.page_tokens;
        my_codes = reinterpret_cast<intptr_t>(a.k_int2_pool) +
                   static_cast<intptr_t>(fmt::page_block_offset(stage_pages, h, a.num_kv_heads, geo.page_bytes())) +
                   static_cast<intptr_t>(offset) * Tile::kRowBytes;
        my_params_delta = geo.params_offset() + offset * (4 - Tile::kRowBytes);
      }
      if (use_bulk) {
        // Four copies for the whole stage by lane 0, onto the stage's barrier, which lane 0 arms with the stage's
        // bytes first. Bulk copies take warp-uniform operands: per-lane addresses (a copy per tile by its own lane)
        // compile to a loop issuing one lane at a time, which cost more than the cp.async below (desk review of
        // the SASS), so stages that may straddle pages stay on cp.async.
        if (lane == 0) {
          const uint32_t bar = full_bar(stage);
          const uint32_t st_s = tma::smem_addr(st);
          // The V record from the pools' distance, read from the kernel parameters here rather than held in two
          // registers across the loop (the wide layout's instantiation is at its 128-register bound).
          const int64_t v_delta =
              reinterpret_cast<intptr_t>(a.v_int2_pool) - reinterpret_cast<intptr_t>(a.k_int2_pool);
          const uint8_t* codes = reinterpret_cast<const uint8_t*>(my_codes);
          const uint32_t code_bytes = static_cast<uint32_t>(tiles_here * Tile::kCodeBytes);
          const uint32_t param_bytes = static_cast<uint32_t>(tiles_here * Tile::kParamBytes);
          tma::mbarrier_arrive_expect_tx(bar, 2 * (code_bytes + param_bytes));
          tma::load_bulk(st_s + Tile::kKCodes, codes, code_bytes, bar);
          tma::load_bulk(st_s + Tile::kVCodes, codes + v_delta, code_bytes, bar);
          tma::load_bulk(st_s + Tile::kKParams, codes + my_params_delta, param_bytes, bar);
          tma::load_bulk(st_s + Tile::kVParams, codes + my_params_delta + v_delta, param_bytes, bar);
        }
      } else {
        // The tiles broadcast the lanes' addresses and the warp copies 16 bytes per lane.
#pragma unroll
        for (int tt = 0; tt < kInt2TilesPerStage; ++tt) {
          if (tt >= tiles_here) break;
          const intptr_t codes = static_cast<intptr_t>(
              __shfl_sync(0xffffffffu, static_cast<unsigned long long>(my_codes), tt));
          const int32_t params_delta = __shfl_sync(0xffffffffu, my_params_delta, tt);
#pragma unroll
          for (int chunk = lane; chunk < Tile::kCodeBytes / 16; chunk += 32) {
            cp_async16(st + Tile::kKCodes + tt * Tile::kCodeBytes + chunk * 16,
                       reinterpret_cast<const uint8_t*>(codes + chunk * 16));
            cp_async16(st + Tile::kVCodes + tt * Tile::kCodeBytes + chunk * 16,
                       reinterpret_cast<const uint8_t*>(codes + kv_delta + chunk * 16));
          }
          // Lanes 0-3: the K pairs, 4-7: the V pairs.
          if (lane < 8)
            cp_async16(st + (lane < 4 ? Tile::kKParams : Tile::kVParams) + tt * Tile::kParamBytes + (lane & 3) * 16,
                       reinterpret_cast<const uint8_t*>(codes + params_delta + (lane & 3) * 16 + (lane < 4 ? 0 : kv_delta)));
        }
      }
    }
    if (!use_bulk) cp_async_commit();  // an empty group keeps the wait count uniform
  };
  // Stage `stage`'s tiles are in the ring and visible to every lane of the warp.
  auto wait_stage = [&](int stage) {
    if (use_bulk) {
      tma::mbarrier_wait_asm_loop(full_bar(stage), static_cast<uint32_t>(stage / kInt2Stages) & 1u);
    } else {
      cp_async_wait<kInt2Stages - 1>();
      __syncwarp();
    }
  };
  // The slot just read is refilled by the next iteration's issue_stage: every lane's reads of it come first. With
  // bulk copies the refill is an async-proxy write after generic-proxy reads, which the PTX memory model orders
  // only through a proxy fence (CUTLASS's TMA pipelines rely on the barrier alone; one instruction per stage).
  auto end_stage = [&]() {
    if (use_bulk) tma::fence_proxy_async();
    __syncwarp();
  };
  // Start streaming before the query arrives in registers: the first loads' latency hides the setup below.
#pragma unroll
  for (int s = 0; s < kInt2Stages - 1; ++s) issue_stage(s, load_stage_pages(s));
  int pages_ahead = load_stage_pages(kInt2Stages - 1);

  // The window share's first page ids, loaded now so that their round trip hides behind the INT2 tiles.
  int win_page0 = 0;
  if constexpr (kFused) {
    const int count = wc.sink_count + wc.recent_count;
    const int per = (count + a.int2_splits - 1) / a.int2_splits;
    const int wbeg = min(count, split * per);
    const int v = wbeg + static_cast<int>(threadIdx.x);
    if (static_cast<int>(threadIdx.x) < kWinChunk && v < min(count, wbeg + per)) {
      const int t = v < wc.sink_count ? v : len - wc.recent_count + (v - wc.sink_count);
      win_page0 = a.bf16_page_table[table_row + t / a.page_tokens];
    }
    pdl_wait();  // q_rot and the tickets come from rotate_q
  }

  // Q fragments (A operand of S = Q·Kᵀ) of head g, for the dims this lane's k-columns stand for: in k-step ks,
  // columns 2c, 2c+1 are dims base+e, base+8+e and columns 2c+8, 2c+9 are base+e+1, base+9+e with
  // base = c·d/4 + 16·(ks/4), e = 2·(ks%4) (the K code word layout, see code_pair).
  // Narrow: lane (g, c) holds the B operand (k rows 2c, 2c+1 | 2c+8, 2c+9 of column g) of Sᵀ = K·Qᵀ for the same
  // dims; column g is head g & 3, its hi part for g < 4 and its lo part for g >= 4.
  constexpr int kQRegs = kNarrow ? 2 : 4;
  uint32_t qa[kKSteps][kQRegs];
  float q_sum = 0.f, dot_scale = 1.f;
  const int q_head = kNarrow ? (g & 3) : g;
  {
    float qv[kHeadDim / 4];
    float q_max = 0.f;
    if (q_head < group) {
      const float4* src = reinterpret_cast<const float4*>(
          a.q_rot + (static_cast<size_t>(b) * a.num_q_heads + h * group + q_head) * kHeadDim + c * (kHeadDim / 4));
#pragma unroll
      for (int i = 0; i < kHeadDim / 16; ++i) {
        const float4 v = src[i];
        qv[4 * i] = v.x;
        qv[4 * i + 1] = v.y;
        qv[4 * i + 2] = v.z;
        qv[4 * i + 3] = v.w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kHeadDim / 4; ++i) qv[i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < kHeadDim / 4; ++i) {
      q_sum += qv[i];
      q_max = fmaxf(q_max, fabsf(qv[i]));
    }
    q_sum += __shfl_xor_sync(0xffffffffu, q_sum, 1);
    q_sum += __shfl_xor_sync(0xffffffffu, q_sum, 2);
    q_max = fmaxf(q_max, __shfl_xor_sync(0xffffffffu, q_max, 1));
    q_max = fmaxf(q_max, __shfl_xor_sync(0xffffffffu, q_max, 2));
    // Power-of-two head scale σ with max|q|·σ in [64, 128): q·σ·4^4 stays below fp16's 65504.
    int exponent = 0;
    frexpf(q_max, &exponent);
    const float sigma = q_max > 0.f ? ldexpf(1.f, 7 - exponent) : 1.f;
    dot_scale = 65536.f / sigma;  // Σ q·c = (S_hi + S_lo)·2^16/σ, the 2^-24 of the subnormals included
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      const int base = 16 * (ks / 4);
      const int e = 2 * (ks % 4);
      float x[4];
      x[0] = qv[base + e] * sigma * static_cast<float>(1 << (2 * (4 - code_pow4(e))));
      x[1] = qv[base + 8 + e] * sigma * static_cast<float>(1 << (2 * (4 - code_pow4(e))));
      x[2] = qv[base + e + 1] * sigma * static_cast<float>(1 << (2 * (4 - code_pow4(e + 1))));
      x[3] = qv[base + 9 + e] * sigma * static_cast<float>(1 << (2 * (4 - code_pow4(e + 1))));
      __half hi[4], lo_part[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        hi[i] = __float2half_rn(x[i]);
        lo_part[i] = __float2half_rn(x[i] - __half2float(hi[i]));
      }
      if constexpr (kNarrow) {
        float part[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) part[i] = __half2float(g < 4 ? hi[i] : lo_part[i]);
        qa[ks][0] = pack_half2(part[0], part[1]);  // k rows 2c, 2c+1 of column g
        qa[ks][1] = pack_half2(part[2], part[3]);  // k rows 2c+8, 2c+9
      } else {
        qa[ks][0] = pack_half2(__half2float(hi[0]), __half2float(hi[1]));          // row g, cols 2c, 2c+1
        qa[ks][1] = pack_half2(__half2float(lo_part[0]), __half2float(lo_part[1]));  // row g+8
        qa[ks][2] = pack_half2(__half2float(hi[2]), __half2float(hi[3]));          // row g, cols 2c+8, 2c+9
        qa[ks][3] = pack_half2(__half2float(lo_part[2]), __half2float(lo_part[3]));
      }
    }
  }

  trace.mark(2);
  float o[kKSteps][4];  // Oᵀ accumulators: m-tile mt, rows (dims) g / g+8, columns (heads) 2c / 2c+1
#pragma unroll
  for (int mt = 0; mt < kKSteps; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[mt][i] = 0.f;
  float* warp_acc = reinterpret_cast<float*>(smem);  // the ring, once every warp is done with it
  if constexpr (kNarrow) {
    // Narrow layout. Lane (g, c) holds Sᵀ rows (tokens) g and g+8 of a tile, columns 2c, 2c+1: heads
    // head_a = 2c & 3, head_b = head_a + 1. After the hi + lo sum lanes c and c ^ 2 hold the same values, so they
    // split the softmax work by token row: lanes c < 2 take row g, lanes c >= 2 row g + 8 (`my_row`), and lanes
    // c < 2 fetch the other row's P from lane c + 2. Their running sums l, z cover one row each and are added
    // across the pair at the end; the running maxima are reduced over the pair every stage.
    const int head_a = (2 * c) & 3;
    const int my_row = c >> 1;
    const float scale_a = __shfl_sync(0xffffffffu, dot_scale, 4 * head_a);
    const float scale_b = __shfl_sync(0xffffffffu, dot_scale, 4 * head_a + 4);
    const float qsum_a = __shfl_sync(0xffffffffu, q_sum, 4 * head_a);
    const float qsum_b = __shfl_sync(0xffffffffu, q_sum, 4 * head_a + 4);
    const bool own_columns = c < 2;  // lanes c >= 2 leave their P columns 0: Oᵀ columns 4..7 stay 0
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f, z_a = 0.f, z_b = 0.f;

    for (int stage = 0; stage < stages; ++stage) {
      issue_stage(stage + kInt2Stages - 1, pages_ahead);
      pages_ahead = load_stage_pages(stage + kInt2Stages);
      wait_stage(stage);
      const uint8_t* st = ring + (stage % kInt2Stages) * Tile::kStageBytes;

      // Masked with selects as in the wide layout below (one basic block per stage).
      float s[kInt2TilesPerStage][2];  // token g + 8·my_row: head a, head b
      float max_a = -INFINITY, max_b = -INFINITY;
      const uint32_t span = static_cast<uint32_t>(end - begin);
      const int tok = g + 8 * my_row;
#pragma unroll
      for (int tt = 0; tt < kInt2TilesPerStage; ++tt) {
        const uint8_t* tile = st + tt * Tile::kCodeBytes;  // tile tt's K code rows (V rows at + kVCodes)
        const int t0 = (stage_tile0(stage) + tt) * kInt2TileTokens;  // >= end for tiles past tile_end
        uint32_t kw0[kKWords], kw1[kKWords];
        lds_words<kKWords>(tile + Tile::kKCodes + g * Tile::kRowBytes + c * (kHeadDim / 16), kw0);
        lds_words<kKWords>(tile + Tile::kKCodes + (g + 8) * Tile::kRowBytes + c * (kHeadDim / 16), kw1);
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int wi = 0; wi < kKWords; ++wi) {
          const uint32_t w0 = kw0[wi], w06 = kw0[wi] >> 6, w1 = kw1[wi], w16 = kw1[wi] >> 6;
#pragma unroll
          for (int e2 = 0; e2 < 4; ++e2) {
            const int ks = 4 * wi + e2;
            mma_f16_16816(acc, code_pair(w0, w06, 2 * e2), code_pair(w1, w16, 2 * e2), code_pair(w0, w06, 2 * e2 + 1),
                          code_pair(w1, w16, 2 * e2 + 1), qa[ks][0], qa[ks][1]);
          }
        }
        // hi + lo columns of this lane's row: the partner (lane c ^ 2) sends its part of that row and receives
        // this lane's part of the other row. (a + b == b + a, so the sums equal those of a full exchange.)
        const float send_a = my_row ? acc[0] : acc[2], send_b = my_row ? acc[1] : acc[3];
        const float recv_a = __shfl_xor_sync(0xffffffffu, send_a, 2), recv_b = __shfl_xor_sync(0xffffffffu, send_b, 2);
        const float dot_a = (my_row ? acc[2] : acc[0]) + recv_a, dot_b = (my_row ? acc[3] : acc[1]) + recv_b;
        const bool valid = static_cast<uint32_t>(t0 + tok - begin) < span;
        const float2 kp = Tile::pair(st, false, tt, tok);
        s[tt][0] = valid ? fmaf(dot_a * scale_a, kp.x, kp.y * qsum_a) : -INFINITY;
        s[tt][1] = valid ? fmaf(dot_b * scale_b, kp.x, kp.y * qsum_b) : -INFINITY;
        max_a = fmaxf(max_a, s[tt][0]);
        max_b = fmaxf(max_b, s[tt][1]);
      }
#pragma unroll
      for (int off = 2; off < 32; off <<= 1) {  // both rows (lane c ^ 2), then the 8 row groups; not c ^ 1
        max_a = fmaxf(max_a, __shfl_xor_sync(0xffffffffu, max_a, off));
        max_b = fmaxf(max_b, __shfl_xor_sync(0xffffffffu, max_b, off));
      }
      const float m_new_a = fmaxf(m_a, max_a), m_new_b = fmaxf(m_b, max_b);
      if (__any_sync(0xffffffffu, m_new_a > m_a || m_new_b > m_b)) {
        const float corr_a = exp2_ftz(m_a - m_new_a), corr_b = exp2_ftz(m_b - m_new_b);  // 0 on the first stage
        l_a *= corr_a;
        l_b *= corr_b;
        z_a *= corr_a;
        z_b *= corr_b;
#pragma unroll
        for (int mt = 0; mt < kKSteps; ++mt) {
          o[mt][0] *= corr_a;
          o[mt][1] *= corr_b;
          o[mt][2] *= corr_a;
          o[mt][3] *= corr_b;
        }
        m_a = m_new_a;
        m_b = m_new_b;
      }

#pragma unroll
      for (int tt = 0; tt < kInt2TilesPerStage; ++tt) {
        const uint8_t* tile = st + tt * Tile::kCodeBytes;  // V rows at tile + kVCodes
        const float p_a = exp2_ftz(s[tt][0] - m_a), p_b = exp2_ftz(s[tt][1] - m_b);  // 0 when masked
        const float2 vp_raw = Tile::pair(st, true, tt, tok);
        const bool masked = s[tt][0] == -INFINITY;
        const float v_scale = masked ? 0.f : vp_raw.x;
        const float v_zero = masked ? 0.f : vp_raw.y;
        l_a += p_a;
        l_b += p_b;
        z_a = fmaf(p_a, v_zero, z_a);
        z_b = fmaf(p_b, v_zero, z_b);
        // Sᵀ fragment rows g and g+8 as fp16 (p·s_v): two 8x8 matrices, token rows; lanes c < 2 own the columns.
        const uint32_t mine = pack_half2(p_a * v_scale, p_b * v_scale);
        const uint32_t theirs = __shfl_xor_sync(0xffffffffu, mine, 2);  // row g + 8, from lane c + 2
        uint32_t p_rows[2];
        p_rows[0] = own_columns ? mine : 0u;
        p_rows[1] = own_columns ? theirs : 0u;
        // Transposed: lane (g, c) holds column (head) g at tokens 2c, 2c+1 (+8): the B operand of Oᵀ = Vᵀ·Pᵀ
        // with the tile's tokens in natural order as k.
        const uint32_t pb0 = movmatrix_trans(p_rows[0]);
        const uint32_t pb1 = movmatrix_trans(p_rows[1]);
        const int toks[4] = {2 * c, 2 * c + 1, 2 * c + 8, 2 * c + 9};
        value_tile_mma<kHeadDim, Tile>(o, tile, g, toks, pb0, pb1);
      }
      end_stage();
    }
    cp_async_wait<0>();

    // Head totals over the warp's tokens (lanes c and c ^ 2 hold the same two heads, one token row each).
#pragma unroll
    for (int off = 2; off < 32; off <<= 1) {
      l_a += __shfl_xor_sync(0xffffffffu, l_a, off);
      l_b += __shfl_xor_sync(0xffffffffu, l_b, off);
      z_a += __shfl_xor_sync(0xffffffffu, z_a, off);
      z_b += __shfl_xor_sync(0xffffffffu, z_b, off);
    }
    trace.mark(3);
    __syncthreads();  // every warp is done with its ring: it becomes the per-warp partials
    trace.mark(4);
    if (stages > 0) {
#pragma unroll
      for (int mt = 0; mt < kKSteps; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float unscale = static_cast<float>(1 << (24 - 2 * code_pow4((2 * mt + r) % 8)));
          const int dim = g * (kHeadDim / 8) + 2 * mt + r;
          if (2 * c < group) warp_acc[(warp * kMaxGroup + 2 * c) * kHeadDim + dim] = fmaf(o[mt][2 * r], unscale, z_a);
          if (2 * c + 1 < group)
            warp_acc[(warp * kMaxGroup + 2 * c + 1) * kHeadDim + dim] = fmaf(o[mt][2 * r + 1], unscale, z_b);
        }
      }
    }
    if (g == 0) {  // heads 2c, 2c+1; lanes c >= 2 mark heads 4..7 empty
      warp_max[warp][2 * c] = own_columns ? m_a : -INFINITY;
      warp_max[warp][2 * c + 1] = own_columns ? m_b : -INFINITY;
      warp_sum_l[warp][2 * c] = own_columns ? l_a : 0.f;
      warp_sum_l[warp][2 * c + 1] = own_columns ? l_b : 0.f;
    }
  } else {
    float m = -INFINITY, l = 0.f, z_sum = 0.f;  // head g, over this lane's tokens (m is the head's, warp-wide)

    // Tile token owned by S n-tile j column n: 8j + (n >> 1) + 4(n & 1), so this lane's S/P values are tokens
    // c, c+4 (n-tile 0) and 8+c, 12+c (n-tile 1), and the K rows it loads are token perm(g) of each n-tile.
    const int k_token = (g >> 1) + 4 * (g & 1);

    for (int stage = 0; stage < stages; ++stage) {
      issue_stage(stage + kInt2Stages - 1, pages_ahead);
      pages_ahead = load_stage_pages(stage + kInt2Stages);
      wait_stage(stage);
      const uint8_t* st = ring + (stage % kInt2Stages) * Tile::kStageBytes;

      // The stage is one basic block: tokens outside [begin, end) (and whole tiles past tile_end in the last
      // stage, whose slots hold stale or never-written bytes) are masked with selects, not branches. Per-token
      // branches here used to cut the stage into ~20 blocks, so each tile's chain of 8 dependent MMAs ran alone
      // instead of overlapping the other tiles' chains. Masked tokens get s = -inf, so p = 0 and their V
      // parameters are replaced by 0 below: their codes (finite by construction) then add exact zeros.
      float s[kInt2TilesPerStage][4];  // tokens c, c+4, 8+c, 12+c of each tile
      float stage_max = -INFINITY;
      const uint32_t span = static_cast<uint32_t>(end - begin);
#pragma unroll
      for (int tt = 0; tt < kInt2TilesPerStage; ++tt) {
        const uint8_t* tile = st + tt * Tile::kCodeBytes;  // tile tt's K code rows (V rows at + kVCodes)
        const int t0 = (stage_tile0(stage) + tt) * kInt2TileTokens;  // >= end for tiles past tile_end
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          uint32_t kw[kKWords];
          lds_words<kKWords>(tile + Tile::kKCodes + (8 * j + k_token) * Tile::kRowBytes + c * (kHeadDim / 16), kw);
          float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int wi = 0; wi < kKWords; ++wi) {
            const uint32_t w = kw[wi], w6 = kw[wi] >> 6;
#pragma unroll
            for (int e2 = 0; e2 < 4; ++e2) {
              const int ks = 4 * wi + e2;
              mma_f16_16816(acc, qa[ks][0], qa[ks][1], qa[ks][2], qa[ks][3], code_pair(w, w6, 2 * e2),
                            code_pair(w, w6, 2 * e2 + 1));
            }
          }
#pragma unroll
          for (int col = 0; col < 2; ++col) {
            const int tok = 8 * j + c + 4 * col;
            const bool valid = static_cast<uint32_t>(t0 + tok - begin) < span;
            const float2 kp = Tile::pair(st, false, tt, tok);
            const float dot = (acc[col] + acc[2 + col]) * dot_scale;
            s[tt][2 * j + col] = valid ? fmaf(dot, kp.x, kp.y * q_sum) : -INFINITY;
            stage_max = fmaxf(stage_max, s[tt][2 * j + col]);
          }
        }
      }
      stage_max = fmaxf(stage_max, __shfl_xor_sync(0xffffffffu, stage_max, 1));
      stage_max = fmaxf(stage_max, __shfl_xor_sync(0xffffffffu, stage_max, 2));
      // Every stage holds at least one valid token, so stage_max is finite. Rescaling is skipped while no head's
      // maximum grows (the common case deep into a sequence); the decision is a function of the data only.
      const float m_new = fmaxf(m, stage_max);
      if (__any_sync(0xffffffffu, m_new > m)) {
        const float corr = exp2_ftz(m - m_new);  // 0 on the first stage (m = -inf), where l, z_sum and o are 0
        l *= corr;
        z_sum *= corr;
        const float corr_a = __shfl_sync(0xffffffffu, corr, 8 * c);      // head 2c
        const float corr_b = __shfl_sync(0xffffffffu, corr, 8 * c + 4);  // head 2c+1
#pragma unroll
        for (int mt = 0; mt < kKSteps; ++mt) {
          o[mt][0] *= corr_a;
          o[mt][1] *= corr_b;
          o[mt][2] *= corr_a;
          o[mt][3] *= corr_b;
        }
        m = m_new;
      }

#pragma unroll
      for (int tt = 0; tt < kInt2TilesPerStage; ++tt) {
        const uint8_t* tile = st + tt * Tile::kCodeBytes;  // V rows at tile + kVCodes
        float pv[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int tok = 8 * (q >> 1) + c + 4 * (q & 1);
          const float p = exp2_ftz(s[tt][q] - m);  // 0 for masked tokens (s = -inf)
          // Masked tokens may sit on never-written bytes: their scale/zero must not reach the sums (0·NaN).
          const float2 vp_raw = Tile::pair(st, true, tt, tok);
          const bool masked = s[tt][q] == -INFINITY;
          const float v_scale = masked ? 0.f : vp_raw.x;
          const float v_zero = masked ? 0.f : vp_raw.y;
          l += p;
          z_sum = fmaf(p, v_zero, z_sum);
          pv[q] = p * v_scale;
        }
        const uint32_t pb0 = pack_half2(pv[0], pv[1]);  // PV k = 2c, 2c+1: tokens c, c+4
        const uint32_t pb1 = pack_half2(pv[2], pv[3]);  // k = 2c+8, 2c+9: tokens 8+c, 12+c
        // V code bytes of this lane's dims [g·d/8, (g+1)·d/8) for tokens c, c+4, 8+c, 12+c, paired by token.
        const int toks[4] = {c, c + 4, 8 + c, 12 + c};
        value_tile_mma<kHeadDim, Tile>(o, tile, g, toks, pb0, pb1);
      }
      end_stage();
    }
    cp_async_wait<0>();

    // Warp totals of head g, then Oᵀ to dims: row g of m-tile mt is dim g·d/8 + 2mt (code field e = 2mt % 8),
    // row g+8 is the next dim; columns are heads 2c, 2c+1, whose z_sum sits in lanes 8c and 8c+4.
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    z_sum += __shfl_xor_sync(0xffffffffu, z_sum, 1);
    z_sum += __shfl_xor_sync(0xffffffffu, z_sum, 2);
    const float z_a = __shfl_sync(0xffffffffu, z_sum, 8 * c);
    const float z_b = __shfl_sync(0xffffffffu, z_sum, 8 * c + 4);
    trace.mark(3);
    __syncthreads();  // every warp is done with its ring: it becomes the per-warp partials
    trace.mark(4);
    if (stages > 0) {
#pragma unroll
      for (int mt = 0; mt < kKSteps; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float unscale = static_cast<float>(1 << (24 - 2 * code_pow4((2 * mt + r) % 8)));
          const int dim = g * (kHeadDim / 8) + 2 * mt + r;
          if (2 * c < group) warp_acc[(warp * kMaxGroup + 2 * c) * kHeadDim + dim] = fmaf(o[mt][2 * r], unscale, z_a);
          if (2 * c + 1 < group)
            warp_acc[(warp * kMaxGroup + 2 * c + 1) * kHeadDim + dim] = fmaf(o[mt][2 * r + 1], unscale, z_b);
        }
      }
    }
    if (c == 0) {
      warp_max[warp][g] = m;
      warp_sum_l[warp][g] = l;
    }
  }
  if constexpr (kFused) {
    fused_window_partial<kHeadDim, kNarrow ? 4 : 8>(a, smem, b, h, split, len, wc, win_page0, warp_max, warp_sum_l);
    trace.mark(5);
  }
  __syncthreads();
  write_block_partial<kHeadDim, kMaxGroup, kPartWarps>(a, b, h, split, warp_acc, warp_max, warp_sum_l);
  if constexpr (kFused) {
    // Split-K ticket, in cooperative groups' grid-sync pattern: the barrier orders every thread's partial stores
    // before thread 0's release (the atomic's release half), and thread 0's acquire (its acquire half) before the
    // barrier the other threads pass to read the partials, which they load from L2 (__ldcg). Fences
    // in every thread on top of that (as before) added two device-wide fence round trips to each block's tail.
    __shared__ bool is_last;
    __syncthreads();
    if (threadIdx.x == 0) {
      // One acq_rel atomic instead of fence.sc + relaxed atomic + fence.sc (cooperative groups' sm_70+ grid sync
      // also arrives with atom.add.release.gpu and polls with ld.acquire.gpu).
      unsigned int before;
      asm volatile("atom.add.acq_rel.gpu.u32 %0, [%1], %2;"
                   : "=r"(before)
                   : "l"(a.tickets + static_cast<size_t>(b) * a.num_kv_heads + h), "r"(1u)
                   : "memory");
      is_last = before == static_cast<unsigned>(a.int2_splits - 1);
    }
    __syncthreads();
    trace.mark(6);
    if (!is_last) {
      trace.end(false);
      return;
    }
    fused_merge<kHeadDim, kNarrow ? 4 : 8>(a, smem, b, h);
    trace.mark(7);
    trace.end(true);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Window path: a token is handled by kLanesPerToken lanes, each owning kDimsPerLane consecutive rotated dims
// (one or two 16-byte bf16 vectors). The key serves all query heads of the group from registers, which is why
// kDimsPerLane drops to 8 for groups above 4. The virtual index v in [0, sink_count + recent_count) names the
// window tokens in order; the splits share it evenly.

template <int kHeadDim, int kDims>
__device__ __forceinline__ void load_bf16_dims(const DecodeArgs& a, bool value, int b, int h, int t, int sub,
                                               float (&out)[kDims]) {
  const int logical_page = page_index(a, t);
  const int offset = t - logical_page * a.page_tokens;
  const int page = a.bf16_page_table[static_cast<size_t>(b) * a.max_pages + logical_page];
  const fmt::Bf16PageGeometry geo{kHeadDim, a.page_tokens};
  const uint16_t* row = (value ? a.v_bf16_pool : a.k_bf16_pool) +
                        fmt::page_block_offset(page, h, a.num_kv_heads, geo.page_bytes()) / 2 +
                        static_cast<size_t>(offset) * kHeadDim + sub * kDims;
#pragma unroll
  for (int v = 0; v < kDims / 8; ++v) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row) + v);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      out[8 * v + 2 * w] = __uint_as_float(words[w] << 16);
      out[8 * v + 2 * w + 1] = __uint_as_float(words[w] & 0xffff0000u);
    }
  }
}

template <int kHeadDim, int kMaxGroup>
__global__ void __launch_bounds__(kDecodeWarps * 32) decode_attention_window_kernel(DecodeArgs a) {
  constexpr int kDims = kMaxGroup <= 4 ? 16 : 8;
  constexpr int kLanesPerToken = kHeadDim / kDims;
  constexpr int kTokensPerWarp = 32 / kLanesPerToken;
  static_assert(kLanesPerToken >= 1 && kLanesPerToken <= 32 && 32 % kLanesPerToken == 0);

  __shared__ float warp_acc[kDecodeWarps * kMaxGroup * kHeadDim];
  __shared__ float warp_max[kDecodeWarps][kMaxGroup];
  __shared__ float warp_sum_l[kDecodeWarps][kMaxGroup];

  const int split = blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int sub = lane % kLanesPerToken;
  const int token_in_warp = lane / kLanesPerToken;
  const int group = a.group;
  const int len = a.seq_lens[b];
  const WindowCounts wc = window_counts(a, len);
  const int count = wc.sink_count + wc.recent_count;
  const int recent_shift = len - wc.recent_count - wc.sink_count;  // v >= sink_count: t = v + recent_shift

  float q[kMaxGroup][kDims];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g < group) {
      const float* src = a.q_rot + (static_cast<size_t>(b) * a.num_q_heads + h * group + g) * kHeadDim + sub * kDims;
#pragma unroll
      for (int i = 0; i < kDims; ++i) q[g][i] = src[i];
    } else {
#pragma unroll
      for (int i = 0; i < kDims; ++i) q[g][i] = 0.f;
    }
  }

  const int per_split = (count + a.window_splits - 1) / a.window_splits;
  const int begin = min(count, split * per_split);
  const int end = min(count, begin + per_split);

  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][kDims];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < kDims; ++i) acc[g][i] = 0.f;
  }

  for (int base = begin + warp * kTokensPerWarp; base < end; base += kDecodeWarps * kTokensPerWarp) {
    const int v_index = base + token_in_warp;
    const bool valid = v_index < end;
    const int t = v_index < wc.sink_count ? v_index : v_index + recent_shift;
    float k[kDims], v[kDims];
#pragma unroll
    for (int i = 0; i < kDims; ++i) k[i] = v[i] = 0.f;
    if (valid) {
      load_bf16_dims<kHeadDim, kDims>(a, false, b, h, t, sub, k);
      load_bf16_dims<kHeadDim, kDims>(a, true, b, h, t, sub, v);
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g >= group) break;
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < kDims; ++i) s = fmaf(q[g][i], k[i], s);
#pragma unroll
      for (int o = kLanesPerToken / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (!valid) s = -INFINITY;
      float tile_max = s;
#pragma unroll
      for (int o = kLanesPerToken; o < 32; o <<= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o));
      const float m_new = fmaxf(m[g], tile_max);  // finite: the warp's first token of the tile is valid
      const float corr = exp2f(m[g] - m_new);     // exp2(-inf) = 0 on the first tile
      const float p = valid ? exp2f(s - m_new) : 0.f;
      l[g] = fmaf(l[g], corr, p);
#pragma unroll
      for (int i = 0; i < kDims; ++i) acc[g][i] = fmaf(p, v[i], acc[g][i] * corr);
      m[g] = m_new;
    }
  }

  store_warp_partial<kHeadDim, kMaxGroup, kLanesPerToken, kDims>(m, l, acc, warp_acc, warp_max, warp_sum_l);
  __syncthreads();
  write_block_partial<kHeadDim, kMaxGroup>(a, b, h, a.window_slot0 + split, warp_acc, warp_max, warp_sum_l);
}

// ---------------------------------------------------------------------------------------------------------------
// 4. Merge: one block of kHeadDim threads per (sequence, query head), slots in a fixed order. Every slot of the
// used ranges was written this launch (an empty split writes max -inf, sum 0, acc 0), so the slot loop has no
// data-dependent branch and its loads can all be in flight.
template <int kHeadDim>
__global__ void __launch_bounds__(kHeadDim) decode_attention_merge_kernel(DecodeArgs a) {
  __shared__ float o_rot[kHeadDim];
  __shared__ float warp_max[kHeadDim / 32];
  const int row = blockIdx.x;  // b * num_q_heads + hq
  const int j = threadIdx.x;
  const float* ml = a.partial_ml + static_cast<size_t>(row) * a.slot_stride * 2;
  const float* acc = a.partial_acc + static_cast<size_t>(row) * a.slot_stride * kHeadDim;
  const int ranges[2][2] = {{0, a.int2_splits}, {a.window_slot0, a.window_slot0 + a.window_splits}};
  float global_max = -INFINITY;
  for (int r = 0; r < 2; ++r)
    for (int s = ranges[r][0] + j; s < ranges[r][1]; s += kHeadDim) global_max = fmaxf(global_max, ml[2 * s]);
  global_max = fmaxf(global_max, __shfl_xor_sync(0xffffffffu, global_max, 16));
  global_max = fmaxf(global_max, __shfl_xor_sync(0xffffffffu, global_max, 8));
  global_max = fmaxf(global_max, __shfl_xor_sync(0xffffffffu, global_max, 4));
  global_max = fmaxf(global_max, __shfl_xor_sync(0xffffffffu, global_max, 2));
  global_max = fmaxf(global_max, __shfl_xor_sync(0xffffffffu, global_max, 1));
  if ((j & 31) == 0) warp_max[j >> 5] = global_max;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kHeadDim / 32; ++w) global_max = fmaxf(global_max, warp_max[w]);
  float sum_l = 0.f, value = 0.f;
  if (global_max != -INFINITY) {  // else no split saw a token: the output is 0
    for (int r = 0; r < 2; ++r) {
#pragma unroll 8
      for (int s = ranges[r][0]; s < ranges[r][1]; ++s) {
        const float weight = exp2f(ml[2 * s] - global_max);  // 0 for an empty split
        sum_l = fmaf(weight, ml[2 * s + 1], sum_l);
        value = fmaf(weight, acc[static_cast<size_t>(s) * kHeadDim + j], value);
      }
    }
  }
  o_rot[j] = sum_l > 0.f ? value / sum_l : 0.f;
  __syncthreads();

  float* out = a.out ? a.out + static_cast<size_t>(row) * kHeadDim : nullptr;
  uint16_t* out_bf16 = a.out_bf16 ? a.out_bf16 + static_cast<size_t>(row) * kHeadDim : nullptr;
  if (!a.rotation_v) {
    if (out) out[j] = o_rot[j];
    else out_bf16[j] = float_to_bf16_bits(o_rot[j]);
    return;
  }
  // x_j = sum_i y_i R[j][i]: a warp per output j so the row of R is read coalesced; fixed reduction order.
  const int lane = j & 31;
  const int warp = j >> 5;
  const float* rot_v = a.rotation_v + ((row % a.num_q_heads) / a.group) * a.rotation_v_head_stride;  // row's KV head
  for (int jj = warp; jj < kHeadDim; jj += kHeadDim / 32) {
    float part = 0.f;
    for (int i = lane; i < kHeadDim; i += 32) part = fmaf(o_rot[i], __ldg(rot_v + static_cast<size_t>(jj) * kHeadDim + i), part);
    part = warp_sum(part);
    if (lane == 0) {
      if (out) out[jj] = part;
      else out_bf16[jj] = float_to_bf16_bits(part);
    }
  }
}

}  // namespace oscar::kern::detail
