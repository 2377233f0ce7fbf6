#pragma once
// Device code of decode_attention (decode_attention.h).
//
// Split kernel: one block (4 warps) per (split, KV head, sequence). A token is handled by kLanesPerToken lanes,
// each owning kDimsPerLane consecutive rotated dims, so an INT2 lane reads one aligned uint32 (16 codes) or
// uint16 (8 codes) plus the token's (scale, zero) pair, and a bf16 lane one or two 16-byte vectors. The key is
// dequantized once in registers and serves all query heads of the group (GQA), which is why the query heads'
// rotated vectors live in registers: kDimsPerLane drops to 8 for groups above 4 to keep them there.
// Online softmax runs in the log2 domain (q pre-scaled by softmax_scale * log2 e, exp2f).
// Merge kernel: one block per (sequence, query head) combines the splits and applies R_vᵀ.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "formats/kv_layout.h"
#include "kernels/common/device_utils.cuh"

namespace oscar::kern::detail {

inline constexpr int kDecodeWarps = 4;
inline constexpr float kLog2e = 1.4426950408889634f;

struct DecodeArgs {
  int32_t num_q_heads;
  int32_t num_kv_heads;
  int32_t group;
  int32_t page_tokens;
  const uint16_t* q;
  const float* rotation_k;
  const float* rotation_v;
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
  int32_t splits;
  float* partial_ml;   // [batch, num_q_heads, splits, 2]: running max (log2 domain) and sum of exp2
  float* partial_acc;  // [batch, num_q_heads, splits, head_dim]: unnormalized rotated-basis output
  float* out;
  uint16_t* out_bf16;
};

// Loads this lane's kDims dims of the rotated key or value of token t as fp32.
template <int kHeadDim, int kDims>
__device__ __forceinline__ void load_cached_dims(const DecodeArgs& a, bool value, int b, int h, int t, int len,
                                                 int sub, float (&out)[kDims]) {
  const int logical_page = t / a.page_tokens;
  const int offset = t - logical_page * a.page_tokens;
  const size_t table_row = static_cast<size_t>(b) * a.max_pages;
  if (fmt::is_high_precision_token(t, len, a.sink_tokens, a.recent_tokens)) {
    const int page = a.bf16_page_table[table_row + logical_page];
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
    return;
  }
  const int page = a.int2_page_table[table_row + logical_page];
  const fmt::Int2PageGeometry geo{kHeadDim, a.page_tokens};
  const uint8_t* block = (value ? a.v_int2_pool : a.k_int2_pool) +
                         fmt::page_block_offset(page, h, a.num_kv_heads, geo.page_bytes());
  const uint8_t* codes_row = block + static_cast<size_t>(offset) * geo.code_row_bytes();
  uint32_t codes;
  if constexpr (kDims == 16)
    codes = __ldg(reinterpret_cast<const uint32_t*>(codes_row) + sub);
  else
    codes = __ldg(reinterpret_cast<const unsigned short*>(codes_row) + sub);
  const uint32_t pair = __ldg(reinterpret_cast<const uint32_t*>(block + geo.params_offset()) + offset);
  const float scale = __half2float(__ushort_as_half(static_cast<unsigned short>(pair & 0xffffu)));
  const float zero = __half2float(__ushort_as_half(static_cast<unsigned short>(pair >> 16)));
#pragma unroll
  for (int i = 0; i < kDims; ++i) out[i] = fmaf(static_cast<float>((codes >> (2 * i)) & 3u), scale, zero);
}

template <int kHeadDim, int kMaxGroup>
__global__ void __launch_bounds__(kDecodeWarps * 32) decode_attention_split_kernel(DecodeArgs a) {
  constexpr int kDims = kMaxGroup <= 4 ? 16 : 8;
  constexpr int kLanesPerToken = kHeadDim / kDims;
  constexpr int kTokensPerWarp = 32 / kLanesPerToken;
  static_assert(kLanesPerToken >= 1 && kLanesPerToken <= 32 && 32 % kLanesPerToken == 0);
  constexpr int kScratch = kDecodeWarps * kMaxGroup * kHeadDim;

  __shared__ float q_rot[kMaxGroup][kHeadDim];
  __shared__ float scratch[kScratch];  // raw query in the prologue, per-warp partials in the epilogue
  __shared__ float warp_max[kDecodeWarps][kMaxGroup];
  __shared__ float warp_sum_l[kDecodeWarps][kMaxGroup];

  const int split = blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int sub = lane % kLanesPerToken;
  const int token_in_warp = lane / kLanesPerToken;
  const int group = a.group;
  const int len = a.seq_lens[b];

  // Query heads h*group .. h*group+group-1, rotated once into the cache basis and pre-scaled.
  for (int idx = tid; idx < kMaxGroup * kHeadDim; idx += blockDim.x) {
    const int g = idx / kHeadDim;
    const int i = idx - g * kHeadDim;
    scratch[idx] = g < group ? bf16_bits_to_float(
                                   a.q[(static_cast<size_t>(b) * a.num_q_heads + h * group + g) * kHeadDim + i])
                             : 0.f;
  }
  __syncthreads();
  for (int j = tid; j < kHeadDim; j += blockDim.x) {
    float acc[kMaxGroup];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) acc[g] = a.rotation_k ? 0.f : scratch[g * kHeadDim + j];
    if (a.rotation_k) {
      for (int i = 0; i < kHeadDim; ++i) {
        const float r = __ldg(a.rotation_k + static_cast<size_t>(i) * kHeadDim + j);
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) acc[g] = fmaf(scratch[g * kHeadDim + i], r, acc[g]);
      }
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) q_rot[g][j] = acc[g] * a.q_scale;
  }
  __syncthreads();

  float q[kMaxGroup][kDims];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
    for (int i = 0; i < kDims; ++i) q[g][i] = q_rot[g][sub * kDims + i];

  // This split's token range: whole pages, the sequence's pages shared evenly among the splits.
  const int pages = (len + a.page_tokens - 1) / a.page_tokens;
  const int pages_per_split = (pages + a.splits - 1) / a.splits;
  const int begin = min(len, split * pages_per_split * a.page_tokens);
  const int end = min(len, begin + pages_per_split * a.page_tokens);

  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][kDims];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < kDims; ++i) acc[g][i] = 0.f;
  }

  for (int base = begin + warp * kTokensPerWarp; base < end; base += kDecodeWarps * kTokensPerWarp) {
    const int t = base + token_in_warp;
    const bool valid = t < end;
    float k[kDims], v[kDims];
#pragma unroll
    for (int i = 0; i < kDims; ++i) k[i] = v[i] = 0.f;
    if (valid) {
      load_cached_dims<kHeadDim, kDims>(a, false, b, h, t, len, sub, k);
      load_cached_dims<kHeadDim, kDims>(a, true, b, h, t, len, sub, v);
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

  // Sum over the warp's token slots (lanes with the same `sub`); m is already warp-uniform.
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
#pragma unroll
    for (int o = kLanesPerToken; o < 32; o <<= 1) {
      l[g] += __shfl_xor_sync(0xffffffffu, l[g], o);
#pragma unroll
      for (int i = 0; i < kDims; ++i) acc[g][i] += __shfl_xor_sync(0xffffffffu, acc[g][i], o);
    }
  }
  __syncthreads();  // scratch switches from raw query to per-warp partials
  if (token_in_warp == 0) {
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
      for (int i = 0; i < kDims; ++i) scratch[(warp * kMaxGroup + g) * kHeadDim + sub * kDims + i] = acc[g][i];
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      warp_max[warp][g] = m[g];
      warp_sum_l[warp][g] = l[g];
    }
  }
  __syncthreads();

  for (int idx = tid; idx < group * kHeadDim; idx += blockDim.x) {
    const int g = idx / kHeadDim;
    const int j = idx - g * kHeadDim;
    float block_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) block_max = fmaxf(block_max, warp_max[w][g]);
    float sum_l = 0.f, value = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float weight = warp_max[w][g] == -INFINITY ? 0.f : exp2f(warp_max[w][g] - block_max);
      sum_l = fmaf(weight, warp_sum_l[w][g], sum_l);
      value = fmaf(weight, scratch[(w * kMaxGroup + g) * kHeadDim + j], value);
    }
    const size_t partial = (static_cast<size_t>(b) * a.num_q_heads + h * group + g) * a.splits + split;
    a.partial_acc[partial * kHeadDim + j] = value;
    if (j == 0) {
      a.partial_ml[2 * partial] = block_max;
      a.partial_ml[2 * partial + 1] = sum_l;
    }
  }
}

// One block of kHeadDim threads per (sequence, query head).
template <int kHeadDim>
__global__ void __launch_bounds__(kHeadDim) decode_attention_merge_kernel(DecodeArgs a) {
  __shared__ float o_rot[kHeadDim];
  const int row = blockIdx.x;  // b * num_q_heads + hq
  const int j = threadIdx.x;
  const float* ml = a.partial_ml + static_cast<size_t>(row) * a.splits * 2;
  const float* acc = a.partial_acc + static_cast<size_t>(row) * a.splits * kHeadDim;
  float global_max = -INFINITY;
  for (int s = 0; s < a.splits; ++s) global_max = fmaxf(global_max, ml[2 * s]);
  float sum_l = 0.f, value = 0.f;
  for (int s = 0; s < a.splits; ++s) {
    const float weight = ml[2 * s] == -INFINITY ? 0.f : exp2f(ml[2 * s] - global_max);
    sum_l = fmaf(weight, ml[2 * s + 1], sum_l);
    value = fmaf(weight, acc[static_cast<size_t>(s) * kHeadDim + j], value);
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
  for (int jj = warp; jj < kHeadDim; jj += kHeadDim / 32) {
    float part = 0.f;
    for (int i = lane; i < kHeadDim; i += 32) part = fmaf(o_rot[i], __ldg(a.rotation_v + static_cast<size_t>(jj) * kHeadDim + i), part);
    part = warp_sum(part);
    if (lane == 0) {
      if (out) out[jj] = part;
      else out_bf16[jj] = float_to_bf16_bits(part);
    }
  }
}

}  // namespace oscar::kern::detail
