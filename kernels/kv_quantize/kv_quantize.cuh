#pragma once
// Device code of kv_write (kv_quantize.h). One warp owns kTokens tokens of one KV head: rotation, clip, min/max,
// fp16 parameters, codes and packing all stay in registers; nothing crosses warps, so there is no __syncthreads.
// kv_write runs Bf16 and Segmented here; Int2 goes through kv_write_int2.cuh (the Int2 instantiation below stays
// as KvWriteInt2Impl::Legacy, the bench's baseline).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "formats/kv_layout.h"
#include "kernels/common/device_utils.cuh"

namespace oscar::kern::detail {

inline constexpr int kKvWriteWarps = 4;
// Tokens per warp: every R element loaded feeds kKvWriteTokens FMAs (register blocking of x · R), which is what
// keeps the rotation from being bound by the R reads.
inline constexpr int kKvWriteTokens = 4;

__device__ __forceinline__ float warp_min(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fminf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// The rank-th smallest of the warp's non-negative floats (kPerLane per lane), found by building its bit pattern
// from the top: non-negative IEEE floats order like their bits, and the answer is the largest pattern u with
// #{v < u} <= rank. 31 rounds of compare + warp sum; exact, no sort buffer.
template <int kPerLane>
__device__ __forceinline__ float warp_select_nonneg(const float (&v)[kPerLane], int rank) {
  uint32_t answer = 0;
  for (int bit = 30; bit >= 0; --bit) {
    const uint32_t candidate = answer | (1u << bit);
    int below = 0;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) below += __float_as_uint(v[k]) < candidate;
    below = __reduce_add_sync(0xffffffffu, below);
    if (below <= rank) answer = candidate;
  }
  return __uint_as_float(answer);
}

// Spreads the 16 low bits of x to the even bit positions (bit l -> bit 2l).
__device__ __forceinline__ uint32_t spread_bits16(uint32_t x) {
  x &= 0xffffu;
  x = (x | (x << 8)) & 0x00ff00ffu;
  x = (x | (x << 4)) & 0x0f0f0f0fu;
  x = (x | (x << 2)) & 0x33333333u;
  x = (x | (x << 1)) & 0x55555555u;
  return x;
}

struct KvWriteArgs {
  const uint16_t* x;
  int64_t tokens;
  int64_t token_stride;
  int32_t num_kv_heads;
  int32_t page_tokens;
  const float* rotation;
  int32_t clip_rank;  // -1: no clipping
  const int32_t* slots;
  uint8_t* int2_pool;
  uint16_t* bf16_pool;
  fmt::SegmentedPageGeometry seg;  // kKvWriteSeg only (by value: it lives in the kernel's parameter bank)
  const int32_t* ef_order;         // kv_write_int2_ef_kernel only (kv_write_int2_ef.cuh)
  const float* ef_weights;
  bool ef_clip_feedback;
  // KvWriteParams::rotation_head_stride / head_mean (bundle 2.0 transforms); 0 / null = one R, no mean.
  int64_t rotation_head_stride;
  const float* head_mean;
};

// The matrix KV head `head` is rotated with (null = identity).
__device__ __forceinline__ const float* head_rotation(const KvWriteArgs& a, int head) {
  return a.rotation ? a.rotation + head * a.rotation_head_stride : nullptr;
}
// μ of coordinate i of `head` (bundle 2.0 key transforms), 0 without a mean. The writers stage x − μ (fp32, the
// reference's one rounding) with the subtraction unconditional: x − 0 is x bit for bit (−0 − 0 = −0, NaN stays NaN),
// and a select per staged element (x − μ or x) cost the RTN writers 7–53 % at 32K (kv_write_bench, 2026-12-07: the
// tiled writer 331 → 508 µs per call), where one mean load per lane and item costs nothing measurable.
__device__ __forceinline__ float head_mean_or_zero(const KvWriteArgs& a, int head, int head_dim, int i) {
  return a.head_mean ? __ldg(a.head_mean + static_cast<int64_t>(head) * head_dim + i) : 0.f;
}

inline constexpr int kKvWriteBf16 = 0;
inline constexpr int kKvWriteInt2 = 1;
inline constexpr int kKvWriteSeg = 2;

// Segmented record of one token (y already clipped): per segment the same min/max -> fp16 (scale, zero) -> codes
// arithmetic as the INT2 path (calib::int_params / int_codes), codes staged per dim in shared memory, then each
// lane packs whole bytes of the segment's bitstream (any width 1..8, so 3-bit fields crossing bytes are fine).
template <int kPerLane>
__device__ __forceinline__ void write_segmented_record(const fmt::SegmentedPageGeometry& G, const float (&v)[kPerLane],
                                                       uint8_t* codes, uint8_t* block, int offset, int lane) {
  for (int s = 0; s < G.num_segments; ++s) {
    const int bits = G.seg_bits[s];
    if (bits == 0) continue;
    const int b = G.seg_begin[s], e = G.seg_end[s];
    float lo = INFINITY, hi = -INFINITY;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int dim = lane + 32 * k;
      if (dim >= b && dim < e) {
        lo = fminf(lo, v[k]);
        hi = fmaxf(hi, v[k]);
      }
    }
    lo = warp_min(lo);
    hi = warp_max(hi);
    const float levels = static_cast<float>((1 << bits) - 1);
    const __half scale_h = __float2half_rn(__fdiv_rn(hi - lo, levels));
    const __half zero_h = __float2half_rn(lo);
    const float scale = __half2float(scale_h);
    const float zero = __half2float(zero_h);
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int dim = lane + 32 * k;
      if (dim >= b && dim < e) {
        uint32_t code = 0;
        if (scale != 0.f) code = static_cast<uint32_t>(fminf(fmaxf(rintf(__fdiv_rn(v[k] - zero, scale)), 0.f), levels));
        codes[dim] = static_cast<uint8_t>(code);
      }
    }
    if (lane == 0) {
      const uint32_t pair = static_cast<uint32_t>(__half_as_ushort(scale_h)) |
                            (static_cast<uint32_t>(__half_as_ushort(zero_h)) << 16);
      *reinterpret_cast<uint32_t*>(block + G.param_offset(offset, G.seg_param[s])) = pair;
    }
  }
  __syncwarp();
  for (int s = 0; s < G.num_segments; ++s) {
    const int bits = G.seg_bits[s];
    if (bits == 0) continue;
    const int b = G.seg_begin[s], n = G.seg_end[s] - b;
    uint8_t* row = block + G.code_row_offset(s, offset);
    for (int byte = lane; byte < G.seg_code_bytes[s]; byte += 32) {
      uint32_t value = 0;
      const int first = (8 * byte) / bits, last = min(n - 1, (8 * byte + 7) / bits);
      for (int j = first; j <= last; ++j) {
        const int at = j * bits - 8 * byte;  // bit position of dim j's field relative to this byte
        const uint32_t c = codes[b + j];
        value |= at >= 0 ? c << at : c >> -at;
      }
      row[byte] = static_cast<uint8_t>(value);
    }
  }
  __syncwarp();  // codes[] is reused by the next token
}

template <int kHeadDim, int kMode>
__global__ void __launch_bounds__(kKvWriteWarps * 32) kv_write_kernel(KvWriteArgs a) {
  constexpr int kPerLane = kHeadDim / 32;  // lane owns dims lane + 32 k
  __shared__ float xs[kKvWriteWarps][kKvWriteTokens][kHeadDim];
  __shared__ uint8_t seg_codes[kMode == kKvWriteSeg ? kKvWriteWarps : 1][kHeadDim];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t groups = (a.tokens + kKvWriteTokens - 1) / kKvWriteTokens;
  const int64_t items = groups * a.num_kv_heads;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kKvWriteWarps;

  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kKvWriteWarps + warp; item < items; item += stride) {
    const int head = static_cast<int>(item % a.num_kv_heads);
    const int64_t t0 = (item / a.num_kv_heads) * kKvWriteTokens;
    // Skip groups with nothing to store before rotating them: the engine's bf16 pass covers every prompt token
    // but stores only the sink/recent windows (a few hundred of 32K).
    bool any_slot = false;
#pragma unroll
    for (int t = 0; t < kKvWriteTokens; ++t) any_slot |= t0 + t < a.tokens && a.slots[t0 + t] >= 0;
    if (!any_slot) continue;  // warp-uniform: every lane read the same slots

    __syncwarp();
    float mean[kPerLane];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) mean[k] = head_mean_or_zero(a, head, kHeadDim, lane + 32 * k);
#pragma unroll
    for (int t = 0; t < kKvWriteTokens; ++t) {
      const bool live = t0 + t < a.tokens;
      const uint16_t* src = a.x + (t0 + t) * a.token_stride + static_cast<int64_t>(head) * kHeadDim;
#pragma unroll
      for (int k = 0; k < kPerLane; ++k)
        xs[warp][t][lane + 32 * k] = live ? bf16_bits_to_float(src[lane + 32 * k]) - mean[k] : 0.f;
    }
    __syncwarp();

    float y[kKvWriteTokens][kPerLane];
    const float* rot = head_rotation(a, head);
    if (rot) {
#pragma unroll
      for (int t = 0; t < kKvWriteTokens; ++t)
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) y[t][k] = 0.f;
      // Increasing i with one fma per step: the exact order lib/calib/quantizer_ref.cpp rotate() uses.
#pragma unroll 4
      for (int i = 0; i < kHeadDim; ++i) {
        float r[kPerLane];
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) r[k] = __ldg(rot + i * kHeadDim + lane + 32 * k);
#pragma unroll
        for (int t = 0; t < kKvWriteTokens; ++t) {
          const float xi = xs[warp][t][i];
#pragma unroll
          for (int k = 0; k < kPerLane; ++k) y[t][k] = fmaf(xi, r[k], y[t][k]);
        }
      }
    } else {
#pragma unroll
      for (int t = 0; t < kKvWriteTokens; ++t)
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) y[t][k] = xs[warp][t][lane + 32 * k];
    }

#pragma unroll
    for (int t = 0; t < kKvWriteTokens; ++t) {
      if (t0 + t >= a.tokens) break;  // warp-uniform
      const int32_t slot = a.slots[t0 + t];
      if (slot < 0) continue;
      const int32_t page = slot / a.page_tokens;
      const int32_t offset = slot % a.page_tokens;

      if constexpr (kMode == kKvWriteBf16) {
        const fmt::Bf16PageGeometry geo{kHeadDim, a.page_tokens};
        uint16_t* dst = a.bf16_pool + fmt::page_block_offset(page, head, a.num_kv_heads, geo.page_bytes()) / 2 +
                        static_cast<size_t>(offset) * kHeadDim;
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) dst[lane + 32 * k] = float_to_bf16_bits(y[t][k]);
      } else {
        float v[kPerLane];
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) v[k] = y[t][k];
        if (a.clip_rank >= 0) {
          float mag[kPerLane];
#pragma unroll
          for (int k = 0; k < kPerLane; ++k) mag[k] = fabsf(v[k]);
          const float c = warp_select_nonneg(mag, a.clip_rank);
#pragma unroll
          for (int k = 0; k < kPerLane; ++k) v[k] = fminf(fmaxf(v[k], -c), c);
        }
        if constexpr (kMode == kKvWriteSeg) {
          uint8_t* block = a.int2_pool + fmt::page_block_offset(page, head, a.num_kv_heads, a.seg.page_bytes());
          write_segmented_record<kPerLane>(a.seg, v, seg_codes[warp], block, offset, lane);
          continue;
        }
        float lo = v[0], hi = v[0];
#pragma unroll
        for (int k = 1; k < kPerLane; ++k) {
          lo = fminf(lo, v[k]);
          hi = fmaxf(hi, v[k]);
        }
        lo = warp_min(lo);
        hi = warp_max(hi);
        // fp16 first, codes from the rounded values: decode reads exactly these parameters.
        const __half scale_h = __float2half_rn(__fdiv_rn(hi - lo, 3.0f));
        const __half zero_h = __float2half_rn(lo);
        const float scale = __half2float(scale_h);
        const float zero = __half2float(zero_h);
        uint32_t bit0[kPerLane], bit1[kPerLane];
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) {
          uint32_t code = 0;
          if (scale != 0.f) code = static_cast<uint32_t>(fminf(fmaxf(rintf(__fdiv_rn(v[k] - zero, scale)), 0.f), 3.f));
          bit0[k] = __ballot_sync(0xffffffffu, code & 1u);
          bit1[k] = __ballot_sync(0xffffffffu, code & 2u);
        }
        const fmt::Int2PageGeometry geo{kHeadDim, a.page_tokens};
        uint8_t* block = a.int2_pool + fmt::page_block_offset(page, head, a.num_kv_heads, geo.page_bytes());
        // Word w holds dims 16w .. 16w+15 = lanes 16(w%2) .. +15 of column k = w/2.
        if (lane < kHeadDim / 16) {
          uint32_t lo_bits = 0, hi_bits = 0;
#pragma unroll
          for (int k = 0; k < kPerLane; ++k) {
            if (k == lane / 2) {
              lo_bits = bit0[k];
              hi_bits = bit1[k];
            }
          }
          const int shift = 16 * (lane & 1);
          const uint32_t word = spread_bits16(lo_bits >> shift) | (spread_bits16(hi_bits >> shift) << 1);
          reinterpret_cast<uint32_t*>(block + static_cast<size_t>(offset) * geo.code_row_bytes())[lane] = word;
        }
        if (lane == 0) {
          const uint32_t pair = static_cast<uint32_t>(__half_as_ushort(scale_h)) |
                                (static_cast<uint32_t>(__half_as_ushort(zero_h)) << 16);
          *reinterpret_cast<uint32_t*>(block + geo.params_offset() + static_cast<size_t>(offset) * 4) = pair;
        }
      }
    }
  }
}

}  // namespace oscar::kern::detail
