#pragma once
#include "kernels/common/device_utils.cuh"
#include "kernels/rope/rope_qkv.h"

namespace oscar::kern::detail {

// One warp per (token, head slot). rotate_half pairs element i with i + d/2, so a lane owns both members of its
// pairs (i = lane + 32 j) and RoPE needs no shuffles; only the q/k norm's mean square crosses lanes.
// d <= 256 gives at most 4 pairs per lane.
__global__ void rope_qkv_kernel(RopeQkvShape s, RopeQkvArgs a) {
  const int64_t warp_global = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t slots = s.num_heads + 2 * s.num_kv_heads;
  if (warp_global >= s.num_tokens * slots) return;
  const int64_t t = warp_global / slots;
  const int64_t slot = warp_global % slots;
  const int d = static_cast<int>(s.head_dim), half = d / 2;

  const float* src = a.qkv + t * s.qkv_row_stride + slot * d;
  const float* bias = a.bias ? a.bias + slot * d : nullptr;
  float lo[4], hi[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = lane + 32 * j;
    lo[j] = hi[j] = 0.f;
    if (i < half) {
      lo[j] = src[i] + (bias ? bias[i] : 0.f);
      hi[j] = src[i + half] + (bias ? bias[i + half] : 0.f);
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
    const float r_lo = lo[j] * c - hi[j] * sn;
    const float r_hi = hi[j] * c + lo[j] * sn;
    out[base + i] = float_to_bf16_bits(r_lo);
    out[base + i + half] = float_to_bf16_bits(r_hi);
    if (out_f32) {
      out_f32[base + i] = r_lo;
      out_f32[base + i + half] = r_hi;
    }
  }
}

}  // namespace oscar::kern::detail
