#pragma once
// FP8 (e4m3) split kernel of decode_attention (decode_attention.h, quant_storage = KvStorage::Fp8E4M3): the tokens
// [sink, len - recent) read from fmt::Fp8PageGeometry pages, everything else as the Separate INT2 variant
// (decode_attention.cuh): rotate_q, the bf16 window kernel, this kernel in place of the INT2 one writing the same
// partial slots, then the merge kernel.
//
// CUDA cores, the window kernel's structure: a token is handled by kLanesPerToken lanes, each owning kDims
// consecutive dims of K and V (one 16-byte vector of codes at kDims = 16, 8 bytes at 8) and the query of every head
// of the group in registers. Why not tensor cores as the INT2 kernel: an fp8 token is 2 * (d + 2) bytes, 3.6x an
// INT2 one, so at HBM speed even group 8 needs ~26 TFMA/s, within the fp32 units; and the per-token V scale would
// have to ride in an fp16 P operand (p * s_v spans far more than fp16's range, s_v = amax/448 is often < 2^-14),
// which needs an online renormalization the INT2 kernel does not have. A tensor-core version is future work.
//
// Dequantization is exact and cheap: a code byte dropped into an fp16's fields is e4m3 * 2^-8 (fp8_e4m3.h), two
// codes per prmt + two logic ops; the 2^8 and the token's scale multiply the finished dot product (K) and the
// softmax weight (V) once per token instead of once per element. Loads of the next token group are issued before
// the current one is consumed (two groups in flight per warp).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "formats/kv_layout.h"
#include "kernels/attention_decode/decode_attention.cuh"
#include "kernels/kv_quantize/fp8_e4m3.h"

namespace oscar::kern::detail {

// Four e4m3 codes (byte i = dim i) -> e4m3 * 2^-8 as fp32, exactly.
__device__ __forceinline__ void e4m3x4_to_float_scaled(uint32_t w, float* out) {
  const uint32_t lo = __byte_perm(w, 0u, 0x1404);  // code 0 | code 1 in the high byte of each 16-bit half
  const uint32_t hi = __byte_perm(w, 0u, 0x3424);  // code 2 | code 3
  // Per half: sign from bit 15, exponent and mantissa shifted down one bit (e4m3_to_f16_bits_scaled).
  const float2 f0 = half2_bits_to_float2((lo & 0x80008000u) | ((lo >> 1) & 0x3f803f80u));
  const float2 f1 = half2_bits_to_float2((hi & 0x80008000u) | ((hi >> 1) & 0x3f803f80u));
  out[0] = f0.x;
  out[1] = f0.y;
  out[2] = f1.x;
  out[3] = f1.y;
}

// One lane's share of one token: kDims codes of K and of V, and the two scales (times 2^8).
template <int kDims>
struct Fp8Lane {
  uint32_t k[kDims / 4];
  uint32_t v[kDims / 4];
  float k_scale;
  float v_scale;
};

template <int kHeadDim, int kDims>
__device__ __forceinline__ void fp8_load_lane(const DecodeArgs& a, int b, int h, int t, int sub, bool valid,
                                              Fp8Lane<kDims>& out) {
#pragma unroll
  for (int i = 0; i < kDims / 4; ++i) out.k[i] = out.v[i] = 0u;
  out.k_scale = out.v_scale = 0.f;
  if (!valid) return;
  const fmt::Fp8PageGeometry geo{kHeadDim, a.page_tokens};
  const int logical_page = t / a.page_tokens;
  const int offset = t - logical_page * a.page_tokens;
  const int page = __ldg(a.int2_page_table + static_cast<size_t>(b) * a.max_pages + logical_page);
  const size_t block = fmt::page_block_offset(page, h, a.num_kv_heads, geo.page_bytes());
  const size_t row = static_cast<size_t>(offset) * geo.code_row_bytes() + static_cast<size_t>(sub) * kDims;
  if constexpr (kDims == 16) {
    const uint4 kw = __ldg(reinterpret_cast<const uint4*>(a.k_int2_pool + block + row));
    const uint4 vw = __ldg(reinterpret_cast<const uint4*>(a.v_int2_pool + block + row));
    out.k[0] = kw.x, out.k[1] = kw.y, out.k[2] = kw.z, out.k[3] = kw.w;
    out.v[0] = vw.x, out.v[1] = vw.y, out.v[2] = vw.z, out.v[3] = vw.w;
  } else {
    static_assert(kDims == 8);
    const uint2 kw = __ldg(reinterpret_cast<const uint2*>(a.k_int2_pool + block + row));
    const uint2 vw = __ldg(reinterpret_cast<const uint2*>(a.v_int2_pool + block + row));
    out.k[0] = kw.x, out.k[1] = kw.y;
    out.v[0] = vw.x, out.v[1] = vw.y;
  }
  const size_t scale = block + geo.scales_offset() + static_cast<size_t>(offset) * 2;
  const unsigned short ks = __ldg(reinterpret_cast<const unsigned short*>(a.k_int2_pool + scale));
  const unsigned short vs = __ldg(reinterpret_cast<const unsigned short*>(a.v_int2_pool + scale));
  out.k_scale = __half2float(__ushort_as_half(ks)) * kE4m3F16Unscale;
  out.v_scale = __half2float(__ushort_as_half(vs)) * kE4m3F16Unscale;
}

template <int kHeadDim, int kMaxGroup>
__global__ void __launch_bounds__(kDecodeWarps * 32) decode_attention_fp8_kernel(DecodeArgs a) {
  constexpr int kDims = kMaxGroup <= 4 ? 16 : 8;  // registers: the query and accumulator of every head per lane
  constexpr int kLanesPerToken = kHeadDim / kDims;
  constexpr int kTokensPerWarp = 32 / kLanesPerToken;
  constexpr int kStep = kDecodeWarps * kTokensPerWarp;
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
  // This split's contiguous share of the quantized tokens [lo, hi).
  const int lo = wc.sink_count;
  const int count = max(len - wc.recent_count - lo, 0);
  const int per_split = (count + a.int2_splits - 1) / a.int2_splits;
  const int begin = lo + min(count, split * per_split);
  const int end = lo + min(count, (split + 1) * per_split);

  // Issue the first token group's loads before the query: their latency hides the query loads.
  int base = begin + warp * kTokensPerWarp;
  Fp8Lane<kDims> cur;
  fp8_load_lane<kHeadDim, kDims>(a, b, h, base + token_in_warp, sub, base + token_in_warp < end, cur);

  float q[kMaxGroup][kDims];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g < group) {
      const float4* src = reinterpret_cast<const float4*>(
          a.q_rot + (static_cast<size_t>(b) * a.num_q_heads + h * group + g) * kHeadDim + sub * kDims);
#pragma unroll
      for (int i = 0; i < kDims / 4; ++i) {
        const float4 v = src[i];
        q[g][4 * i] = v.x;
        q[g][4 * i + 1] = v.y;
        q[g][4 * i + 2] = v.z;
        q[g][4 * i + 3] = v.w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kDims; ++i) q[g][i] = 0.f;
    }
  }

  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][kDims];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < kDims; ++i) acc[g][i] = 0.f;
  }

  for (; base < end; base += kStep) {
    const int t = base + token_in_warp;
    const bool valid = t < end;
    Fp8Lane<kDims> nxt;
    fp8_load_lane<kHeadDim, kDims>(a, b, h, t + kStep, sub, t + kStep < end, nxt);
    float k[kDims], v[kDims];
#pragma unroll
    for (int i = 0; i < kDims / 4; ++i) {
      e4m3x4_to_float_scaled(cur.k[i], k + 4 * i);
      e4m3x4_to_float_scaled(cur.v[i], v + 4 * i);
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g >= group) break;
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < kDims; ++i) s = fmaf(q[g][i], k[i], s);
#pragma unroll
      for (int o = kLanesPerToken / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      s = valid ? s * cur.k_scale : -INFINITY;
      float tile_max = s;
#pragma unroll
      for (int o = kLanesPerToken; o < 32; o <<= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o));
      const float m_new = fmaxf(m[g], tile_max);  // finite: the group's first token (base < end) is valid
      const float corr = exp2f(m[g] - m_new);     // exp2(-inf) = 0 on the first group
      const float p = valid ? exp2f(s - m_new) : 0.f;
      l[g] = fmaf(l[g], corr, p);
      const float pv = p * cur.v_scale;  // the token's V scale rides on its softmax weight
#pragma unroll
      for (int i = 0; i < kDims; ++i) acc[g][i] = fmaf(pv, v[i], acc[g][i] * corr);
      m[g] = m_new;
    }
    cur = nxt;
  }

  store_warp_partial<kHeadDim, kMaxGroup, kLanesPerToken, kDims>(m, l, acc, warp_acc, warp_max, warp_sum_l);
  __syncthreads();
  write_block_partial<kHeadDim, kMaxGroup>(a, b, h, split, warp_acc, warp_max, warp_sum_l);
}

// Launches the FP8 split kernel on a.int2_splits blocks per (sequence, KV head), writing INT2 slots 0..splits-1.
template <int kHeadDim>
void launch_decode_attention_fp8(const DecodeArgs& a, int batch, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.int2_splits), static_cast<unsigned>(a.num_kv_heads),
                  static_cast<unsigned>(batch));
  const dim3 block(kDecodeWarps * 32);
  if (a.group <= 1) decode_attention_fp8_kernel<kHeadDim, 1><<<grid, block, 0, stream>>>(a);
  else if (a.group <= 2) decode_attention_fp8_kernel<kHeadDim, 2><<<grid, block, 0, stream>>>(a);
  else if (a.group <= 4) decode_attention_fp8_kernel<kHeadDim, 4><<<grid, block, 0, stream>>>(a);
  else decode_attention_fp8_kernel<kHeadDim, 8><<<grid, block, 0, stream>>>(a);
}

}  // namespace oscar::kern::detail
