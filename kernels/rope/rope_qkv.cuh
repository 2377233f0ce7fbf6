#pragma once
#include "kernels/common/device_utils.cuh"
#include "kernels/rope/rope_qkv.h"

namespace oscar::kern::detail {

// x·c + y·s with the contraction spelled out, so the scalar and the vector kernel round identically whatever
// the compiler would otherwise fuse (the tests compare the two paths bit for bit).
__device__ __forceinline__ float rope_rotate(float x, float y, float c, float s) {
  return __fmaf_rn(x, c, __fmul_rn(y, s));
}

// One warp per (token, head slot). rotate_half pairs element i with i + d/2, so a lane owns both members of its
// pairs (i = lane + 32 j) and RoPE needs no shuffles; only the q/k norm's mean square crosses lanes.
// d <= 256 gives at most 4 pairs per lane.
// The projection's value as fp32, from an fp32 or a bf16 (bits) buffer.
__device__ __forceinline__ float qkv_value(const float* p, int i) { return p[i]; }
__device__ __forceinline__ float qkv_value(const uint16_t* p, int i) { return bf16_bits_to_float(p[i]); }

template <typename In>
__global__ void rope_qkv_kernel(RopeQkvShape s, RopeQkvArgs a, const In* qkv) {
  const int64_t warp_global = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t slots = s.num_heads + 2 * s.num_kv_heads;
  if (warp_global >= s.num_tokens * slots) return;
  const int64_t t = warp_global / slots;
  const int64_t slot = warp_global % slots;
  const int d = static_cast<int>(s.head_dim), half = d / 2;

  const In* src = qkv + t * s.qkv_row_stride + slot * d;
  const float* bias = a.bias ? a.bias + slot * d : nullptr;
  float lo[4], hi[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = lane + 32 * j;
    lo[j] = hi[j] = 0.f;
    if (i < half) {
      lo[j] = qkv_value(src, i) + (bias ? bias[i] : 0.f);
      hi[j] = qkv_value(src, i + half) + (bias ? bias[i + half] : 0.f);
    }
  }

  const bool is_q = slot < s.num_heads;
  const bool is_k = !is_q && slot < s.num_heads + s.num_kv_heads;
  if (!is_q && !is_k) {
    const int64_t h = slot - s.num_heads - s.num_kv_heads;
    const int64_t base = (t * s.num_kv_heads + h) * d;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int i = lane + 32 * j;
      if (i < half) {
        a.v_out[base + i] = float_to_bf16_bits(lo[j]);
        a.v_out[base + i + half] = float_to_bf16_bits(hi[j]);
        if (a.v_f32) {
          a.v_f32[base + i] = lo[j];
          a.v_f32[base + i + half] = hi[j];
        }
      }
    }
    return;
  }

  const uint16_t* norm_w = is_q ? a.q_norm_weight : a.k_norm_weight;
  if (norm_w) {
    float sum_sq = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) sum_sq += lo[j] * lo[j] + hi[j] * hi[j];
    const float inv_rms = warp_inv_rms(sum_sq, d, a.norm_eps);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int i = lane + 32 * j;
      if (i < half) {
        lo[j] = bf16_bits_to_float(norm_w[i]) * (lo[j] * inv_rms);
        hi[j] = bf16_bits_to_float(norm_w[i + half]) * (hi[j] * inv_rms);
      }
    }
  }

  const int64_t h = is_q ? slot : slot - s.num_heads;
  const int64_t heads = is_q ? s.num_heads : s.num_kv_heads;
  const int64_t base = (t * heads + h) * d;
  uint16_t* out = is_q ? a.q_out : a.k_out;
  float* out_f32 = is_q ? a.q_f32 : a.k_f32;
  const float pos = static_cast<float>(a.positions[t]);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = lane + 32 * j;
    if (i >= half) continue;
    if (is_k && a.k_pre_rope_f32) {
      a.k_pre_rope_f32[base + i] = lo[j];
      a.k_pre_rope_f32[base + i + half] = hi[j];
    }
    // fp32 angle as torch forms it; sin/cos in double because at positions in the tens of thousands the
    // single-precision functions' last-ulp differences are visible against the CPU reference.
    const float angle = a.inv_freq[i] * pos;
    double sd, cd;
    sincos(static_cast<double>(angle), &sd, &cd);
    const float c = static_cast<float>(cd), sn = static_cast<float>(sd);
    const float r_lo = rope_rotate(lo[j], hi[j], c, -sn);
    const float r_hi = rope_rotate(hi[j], lo[j], c, sn);
    out[base + i] = float_to_bf16_bits(r_lo);
    out[base + i + half] = float_to_bf16_bits(r_hi);
    if (out_f32) {
      out_f32[base + i] = r_lo;
      out_f32[base + i + half] = r_hi;
    }
  }
}

}  // namespace oscar::kern::detail

namespace oscar::kern::detail {

// Vector path: one block per token, thread groups of kTph = (d/2)/8 lanes per head slot, each lane owning 8
// consecutive rotate_half pairs (elements i0..i0+7 and half+i0..half+i0+7), so every global access is a 16-byte
// load or store. The old one-warp-per-head kernel issued 4-byte accesses and evaluated a double-precision sincos
// per (token, head, pair); here cos/sin are evaluated once per (token, pair) into shared memory and shared by all
// q/k heads (40 of them at Llama-3-8B). The table values are bit-identical to the scalar kernel's (same fp32 angle,
// same double sincos), so only the q/k norm's summation order differs between the two paths.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8_bf16(uint16_t* p, const float (&v)[8]) {
  uint4 o;
  o.x = static_cast<uint32_t>(float_to_bf16_bits(v[0])) | (static_cast<uint32_t>(float_to_bf16_bits(v[1])) << 16);
  o.y = static_cast<uint32_t>(float_to_bf16_bits(v[2])) | (static_cast<uint32_t>(float_to_bf16_bits(v[3])) << 16);
  o.z = static_cast<uint32_t>(float_to_bf16_bits(v[4])) | (static_cast<uint32_t>(float_to_bf16_bits(v[5])) << 16);
  o.w = static_cast<uint32_t>(float_to_bf16_bits(v[6])) | (static_cast<uint32_t>(float_to_bf16_bits(v[7])) << 16);
  *reinterpret_cast<uint4*>(p) = o;
}
__device__ __forceinline__ void load8_bf16(const uint16_t* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    v[2 * k] = __uint_as_float(w[k] << 16);
    v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
  }
}

constexpr int kRopeVecThreads = 128;

// Eight consecutive projection values as fp32 (16-byte loads: two of fp32, one of bf16).
__device__ __forceinline__ void load8_in(const float* p, float (&v)[8]) { load8(p, v); }
__device__ __forceinline__ void load8_in(const uint16_t* p, float (&v)[8]) { load8_bf16(p, v); }

template <typename In>
__global__ void __launch_bounds__(kRopeVecThreads)
    rope_qkv_vec_kernel(RopeQkvShape s, RopeQkvArgs a, const In* qkv, int tph) {
  extern __shared__ float rope_table[];  // cos [half], then sin [half]
  const int d = static_cast<int>(s.head_dim), half = d / 2;
  const int64_t t = blockIdx.x;
  {
    const float pos = static_cast<float>(a.positions[t]);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      // Same fp32 angle and double sincos as the scalar kernel (see there for why double).
      const float angle = a.inv_freq[i] * pos;
      double sd, cd;
      sincos(static_cast<double>(angle), &sd, &cd);
      rope_table[i] = static_cast<float>(cd);
      rope_table[half + i] = static_cast<float>(sd);
    }
  }
  __syncthreads();

  const int slots = static_cast<int>(s.num_heads + 2 * s.num_kv_heads);
  const int items = slots * tph;
  const int lane = threadIdx.x & 31;
  // The lanes of one head slot are tph consecutive lanes starting at a multiple of tph, and items come in whole
  // slots, so a group is either entirely active or entirely idle in every iteration: its own mask suffices.
  const unsigned group_mask = (tph == 32 ? 0xffffffffu : ((1u << tph) - 1u)) << (lane & ~(tph - 1));
  const In* row = qkv + t * s.qkv_row_stride;
  for (int item = threadIdx.x; item < items; item += blockDim.x) {
    const int slot = item / tph;
    const int i0 = (item % tph) * 8;
    float lo[8], hi[8];
    load8_in(row + slot * d + i0, lo);
    load8_in(row + slot * d + half + i0, hi);
    if (a.bias) {
      float blo[8], bhi[8];
      load8(a.bias + slot * d + i0, blo);
      load8(a.bias + slot * d + half + i0, bhi);
#pragma unroll
      for (int k = 0; k < 8; ++k) lo[k] += blo[k], hi[k] += bhi[k];
    } else {
      // The scalar kernel and rope_qkv_ref add 0.f without a bias, which turns -0 into +0 (IEEE: -0 + +0 = +0,
      // not folded away); do the same so -0 inputs give the same bits on both paths.
#pragma unroll
      for (int k = 0; k < 8; ++k) lo[k] += 0.f, hi[k] += 0.f;
    }
    const bool is_q = slot < s.num_heads;
    const bool is_k = !is_q && slot < s.num_heads + s.num_kv_heads;
    if (!is_q && !is_k) {
      const int64_t h = slot - s.num_heads - s.num_kv_heads;
      const int64_t base = (t * s.num_kv_heads + h) * d;
      store8_bf16(a.v_out + base + i0, lo);
      store8_bf16(a.v_out + base + half + i0, hi);
      if (a.v_f32) {
        store8(a.v_f32 + base + i0, lo);
        store8(a.v_f32 + base + half + i0, hi);
      }
      continue;
    }
    const uint16_t* norm_w = is_q ? a.q_norm_weight : a.k_norm_weight;
    if (norm_w) {
      float sum_sq = 0.f;
#pragma unroll
      for (int k = 0; k < 8; ++k) sum_sq += lo[k] * lo[k] + hi[k] * hi[k];
      for (int off = 1; off < tph; off <<= 1) sum_sq += __shfl_xor_sync(group_mask, sum_sq, off);
      const float inv_rms = rsqrtf(sum_sq / static_cast<float>(d) + a.norm_eps);
      float wlo[8], whi[8];
      load8_bf16(norm_w + i0, wlo);
      load8_bf16(norm_w + half + i0, whi);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        lo[k] = wlo[k] * (lo[k] * inv_rms);
        hi[k] = whi[k] * (hi[k] * inv_rms);
      }
    }
    const int64_t h = is_q ? slot : slot - s.num_heads;
    const int64_t heads = is_q ? s.num_heads : s.num_kv_heads;
    const int64_t base = (t * heads + h) * d;
    if (is_k && a.k_pre_rope_f32) {
      store8(a.k_pre_rope_f32 + base + i0, lo);
      store8(a.k_pre_rope_f32 + base + half + i0, hi);
    }
    float r_lo[8], r_hi[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float c = rope_table[i0 + k], sn = rope_table[half + i0 + k];
      r_lo[k] = rope_rotate(lo[k], hi[k], c, -sn);
      r_hi[k] = rope_rotate(hi[k], lo[k], c, sn);
    }
    uint16_t* out = is_q ? a.q_out : a.k_out;
    store8_bf16(out + base + i0, r_lo);
    store8_bf16(out + base + half + i0, r_hi);
    float* out_f32 = is_q ? a.q_f32 : a.k_f32;
    if (out_f32) {
      store8(out_f32 + base + i0, r_lo);
      store8(out_f32 + base + half + i0, r_hi);
    }
  }
}

}  // namespace oscar::kern::detail
