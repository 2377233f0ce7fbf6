#pragma once
// Segmented (spectral) pages for decode_attention: the quantized tokens of a layer whose K and/or V records are
// several contiguous 16-aligned dim segments of widths {0, 1, 2, 4}, each with its own per-token fp16 (scale, zero)
// (formats/kv_layout.h SegmentedPageGeometry). Replaces the INT2 split kernel for such layers; the rotate_q,
// window and merge kernels are shared (decode_attention.cuh).
//
// Same tensor-core structure as the INT2 kernel (read its header comment first), with one change of fragment
// layout so that no MMA mixes segments: the k-dimension of every S = Q·Kᵀ MMA and the rows of every Oᵀ = Vᵀ·Pᵀ
// MMA are ONE 16-dim block of the rotated head (the INT2 kernel spreads one MMA over four lanes' dim quarters).
// Then, per segment, q·k̂ = s_seg·(q_seg·c_seg) + z_seg·Σq_seg, accumulated once per segment (the S accumulators
// are flushed at each segment's last block), and Σ_t p_t v̂_t over a segment's dims = Vᵀ_seg·(p·s_v,seg) + Σ_t p_t
// z_v,seg: the P operand is rebuilt per segment. 0-bit blocks issue no MMA and read as 0.
//
// Code fields become fp16 subnormals with a shift and a mask (per lane, the shift is fixed): c·f·2^-24 where the
// factor f is 1, 4 (2-bit odd fields) or 16 (1-bit high fields); Q carries F/f with F = 16 for every width, so one
// dot scale 2^24/(σF) serves all blocks. Which dims of a block a lane's fragment registers stand for depends on
// the width (chosen so each is one shift + mask of the block's word); Q is laid out to match:
//   K (B operand, token n = g, k = 2c,2c+1 | 2c+8,2c+9):
//     2-bit: (w >> 4c) & 0x00030003 -> dims 2c, 8+2c (f 1);  & 0x000c000c -> dims 2c+1, 9+2c (f 4)
//     4-bit: (w0 >> 4c) & 0x000f000f -> dims c, 4+c;         (w1 >> 4c) & 0x000f000f -> dims 8+c, 12+c (f 1)
//     1-bit: p = u | u << 16; (p >> c) & 0x00100001 -> dims c (f 1), 4+c (f 16); (p >> c+8) -> dims 8+c, 12+c
//   V (A operand, rows g | g+8 = dims g | 8+g of the block, k = tokens c, c+4 | 8+c, 12+c as in the INT2 kernel):
//     the lane shifts each token's word by the field position of dim g and pairs two tokens with one prmt.
// The tile in shared memory mirrors the page: per segment region 16 rows of that segment's code bytes, then the
// 16 tokens' (scale, zero) pairs; K's tile then V's.
#include "kernels/attention_decode/decode_attention.cuh"

namespace oscar::kern::detail {

// Chunks of 16 bytes one lane copies per tile and tensor: a record is at most d/2 code bytes (4 bits) plus one
// pair per block, 16 tokens of it are `record_bytes` chunks.
template <int kHeadDim>
inline constexpr int kSegMaxChunks = (kHeadDim / 2 + 4 * (kHeadDim / 16) + 31) / 32;

template <int kHeadDim>
struct SegCopyPlan {
  int dst[kSegMaxChunks<kHeadDim>];  // byte offset in the tensor's tile, -1 = no chunk
  int src[kSegMaxChunks<kHeadDim>];  // byte offset in the page block, plus `row` times the tile's first token
  int row[kSegMaxChunks<kHeadDim>];
};

template <int kHeadDim>
__device__ __forceinline__ SegCopyPlan<kHeadDim> seg_copy_plan(const SegDecodeLayout& L, int page_tokens, int lane) {
  SegCopyPlan<kHeadDim> plan;
#pragma unroll
  for (int i = 0; i < kSegMaxChunks<kHeadDim>; ++i) {
    const int chunk = lane + 32 * i;
    plan.dst[i] = -1;
    plan.src[i] = 0;
    plan.row[i] = 0;
    if (chunk < L.record_bytes) {
      for (int r = 0; r < L.num_regions; ++r) {
        if (chunk >= L.region_rec_off[r] && chunk < L.region_rec_off[r] + L.region_row_bytes[r]) {
          plan.dst[i] = 16 * chunk;
          plan.src[i] = page_tokens * L.region_rec_off[r] + 16 * (chunk - L.region_rec_off[r]);
          plan.row[i] = L.region_row_bytes[r];
        }
      }
    }
  }
  return plan;
}

__device__ __forceinline__ uint32_t lds_u32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

template <int kHeadDim>
__global__ void __launch_bounds__(kDecodeWarps * 32, kHeadDim <= 128 ? 4 : 2)
    decode_attention_seg_kernel(DecodeArgs a) {
  constexpr int kBlocks = kHeadDim / 16;
  constexpr int kMaxGroup = 8;
  constexpr float kF = 16.f;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float warp_max[kDecodeWarps][kMaxGroup];
  __shared__ float warp_sum_l[kDecodeWarps][kMaxGroup];
  const SegDecodeLayout& KL = a.k_seg;
  const SegDecodeLayout& VL = a.v_seg;

  const int split = blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int c = lane & 3;
  const int group = a.group;
  const int len = a.seq_lens[b];

  const WindowCounts wc = window_counts(a, len);
  const int lo = wc.sink_count;
  const int hi = len - wc.recent_count;
  int begin = 0, end = 0, tile_begin = 0, tile_end = 0;
  if (hi > lo) {
    const int first = lo / kInt2TileTokens;
    const int tiles = (hi - 1) / kInt2TileTokens + 1 - first;
    const int per_split = (tiles + a.int2_splits - 1) / a.int2_splits;
    tile_begin = first + min(tiles, split * per_split);
    tile_end = first + min(tiles, (split + 1) * per_split);
    begin = max(lo, tile_begin * kInt2TileTokens);
    end = min(hi, tile_end * kInt2TileTokens);
  }
  const int warp_tiles = tile_end - tile_begin > warp ? (tile_end - tile_begin - warp + kDecodeWarps - 1) / kDecodeWarps : 0;
  const int stages = (warp_tiles + kInt2TilesPerStage - 1) / kInt2TilesPerStage;
  const int tile_bytes = 16 * (KL.record_bytes + VL.record_bytes);
  const int v_tile0 = 16 * KL.record_bytes;
  uint8_t* ring = smem + warp * (kInt2Stages * kInt2TilesPerStage * tile_bytes);

  const SegCopyPlan<kHeadDim> kplan = seg_copy_plan<kHeadDim>(KL, a.page_tokens, lane);
  const SegCopyPlan<kHeadDim> vplan = seg_copy_plan<kHeadDim>(VL, a.page_tokens, lane);
  const size_t table_row = static_cast<size_t>(b) * a.max_pages;
  auto load_stage_pages = [&](int stage) {
    const int i = stage * kInt2TilesPerStage + lane;
    if (lane >= kInt2TilesPerStage || i >= warp_tiles) return 0;
    const int t0 = (tile_begin + warp + i * kDecodeWarps) * kInt2TileTokens;
    return a.int2_page_table[table_row + t0 / a.page_tokens];
  };
  auto issue_stage = [&](int stage, int stage_pages) {
    if (stage < stages) {
      uint8_t* dst = ring + (stage % kInt2Stages) * (kInt2TilesPerStage * tile_bytes);
#pragma unroll
      for (int tt = 0; tt < kInt2TilesPerStage; ++tt) {
        const int page = __shfl_sync(0xffffffffu, stage_pages, tt);
        const int i = stage * kInt2TilesPerStage + tt;
        if (i >= warp_tiles) break;
        const int t0 = (tile_begin + warp + i * kDecodeWarps) * kInt2TileTokens;
        const int offset = t0 - (t0 / a.page_tokens) * a.page_tokens;
        const uint8_t* k_block = a.k_int2_pool + fmt::page_block_offset(page, h, a.num_kv_heads, KL.page_bytes);
        const uint8_t* v_block = a.v_int2_pool + fmt::page_block_offset(page, h, a.num_kv_heads, VL.page_bytes);
        uint8_t* tile = dst + tt * tile_bytes;
#pragma unroll
        for (int ci = 0; ci < kSegMaxChunks<kHeadDim>; ++ci) {
          if (kplan.dst[ci] >= 0) cp_async16(tile + kplan.dst[ci], k_block + kplan.src[ci] + offset * kplan.row[ci]);
          if (vplan.dst[ci] >= 0)
            cp_async16(tile + v_tile0 + vplan.dst[ci], v_block + vplan.src[ci] + offset * vplan.row[ci]);
        }
      }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < kInt2Stages - 1; ++s) issue_stage(s, load_stage_pages(s));
  int pages_ahead = load_stage_pages(kInt2Stages - 1);

  // Q fragments per block (layout in the header comment) and Σq per block for the zero terms.
  uint32_t qa[kBlocks][4];
  float q_sum_blk[kBlocks];
  float dot_scale = 1.f;
  {
    const float* qrow = a.q_rot + (static_cast<size_t>(b) * a.num_q_heads + h * group + (g < group ? g : 0)) * kHeadDim;
    float q_max = 0.f;
    if (g < group) {
      const float4* src = reinterpret_cast<const float4*>(qrow + c * (kHeadDim / 4));
#pragma unroll
      for (int i = 0; i < kHeadDim / 16; ++i) {
        const float4 v = src[i];
        q_max = fmaxf(q_max, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
      }
    }
    q_max = fmaxf(q_max, __shfl_xor_sync(0xffffffffu, q_max, 1));
    q_max = fmaxf(q_max, __shfl_xor_sync(0xffffffffu, q_max, 2));
    int exponent = 0;
    frexpf(q_max, &exponent);
    const float sigma = q_max > 0.f ? ldexpf(1.f, 7 - exponent) : 1.f;  // max|q|·σ in [64, 128)
    dot_scale = 16777216.f / (sigma * kF);
#pragma unroll
    for (int blk = 0; blk < kBlocks; ++blk) {
      const int bits = KL.blk_bits[blk];
      int dim[4];
      float mul[4];
      if (bits == 2) {
        dim[0] = 2 * c, dim[1] = 8 + 2 * c, dim[2] = 2 * c + 1, dim[3] = 9 + 2 * c;
        mul[0] = mul[1] = kF, mul[2] = mul[3] = kF / 4.f;
      } else if (bits == 4) {
        dim[0] = c, dim[1] = 4 + c, dim[2] = 8 + c, dim[3] = 12 + c;
        mul[0] = mul[1] = mul[2] = mul[3] = kF;
      } else {  // 1 bit (0-bit blocks: values unused)
        dim[0] = c, dim[1] = 4 + c, dim[2] = 8 + c, dim[3] = 12 + c;
        mul[0] = mul[2] = kF, mul[1] = mul[3] = kF / 16.f;
      }
      float x[4], qs = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float qv = (g < group && bits != 0) ? qrow[16 * blk + dim[i]] : 0.f;
        qs += qv;
        x[i] = qv * sigma * mul[i];
      }
      qs += __shfl_xor_sync(0xffffffffu, qs, 1);
      qs += __shfl_xor_sync(0xffffffffu, qs, 2);
      q_sum_blk[blk] = qs;
      __half hi_part[4], lo_part[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        hi_part[i] = __float2half_rn(x[i]);
        lo_part[i] = __float2half_rn(x[i] - __half2float(hi_part[i]));
      }
      qa[blk][0] = pack_half2(__half2float(hi_part[0]), __half2float(hi_part[1]));  // row g, k 2c, 2c+1
      qa[blk][1] = pack_half2(__half2float(lo_part[0]), __half2float(lo_part[1]));  // row g+8
      qa[blk][2] = pack_half2(__half2float(hi_part[2]), __half2float(hi_part[3]));  // row g, k 2c+8, 2c+9
      qa[blk][3] = pack_half2(__half2float(lo_part[2]), __half2float(lo_part[3]));
    }
  }

  float o[kBlocks][4];   // Oᵀ accumulators: m-tile = block, rows dims g / 8+g, columns heads 2c / 2c+1
  float z_blk[kBlocks];  // head g: Σ_t p_t z_v,t of the block's segment (this lane's tokens)
#pragma unroll
  for (int blk = 0; blk < kBlocks; ++blk) {
    z_blk[blk] = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) o[blk][i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const int k_token = (g >> 1) + 4 * (g & 1);

  for (int stage = 0; stage < stages; ++stage) {
    issue_stage(stage + kInt2Stages - 1, pages_ahead);
    pages_ahead = load_stage_pages(stage + kInt2Stages);
    cp_async_wait<kInt2Stages - 1>();
    __syncwarp();
    const uint8_t* st = ring + (stage % kInt2Stages) * (kInt2TilesPerStage * tile_bytes);

    float s[kInt2TilesPerStage][4];
    float stage_max = -INFINITY;
#pragma unroll
    for (int tt = 0; tt < kInt2TilesPerStage; ++tt) {
      const int i = stage * kInt2TilesPerStage + tt;
#pragma unroll
      for (int q = 0; q < 4; ++q) s[tt][q] = -INFINITY;
      if (i >= warp_tiles) continue;
      const uint8_t* tile = st + tt * tile_bytes;
      const int t0 = (tile_begin + warp + i * kDecodeWarps) * kInt2TileTokens;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int ktok = 8 * j + k_token;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        float sp[2] = {0.f, 0.f}, qs = 0.f;
#pragma unroll
        for (int blk = 0; blk < kBlocks; ++blk) {
          const int bits = KL.blk_bits[blk];
          if (bits == 0) continue;
          const uint8_t* wp = tile + KL.blk_tile_off[blk] + ktok * KL.blk_row_bytes[blk];
          uint32_t b0, b1;
          if (bits == 2) {
            const uint32_t x = lds_u32(wp) >> (4 * c);
            b0 = x & 0x00030003u;
            b1 = x & 0x000c000cu;
          } else if (bits == 4) {
            const uint2 w = *reinterpret_cast<const uint2*>(wp);
            b0 = (w.x >> (4 * c)) & 0x000f000fu;
            b1 = (w.y >> (4 * c)) & 0x000f000fu;
          } else {
            const uint32_t u = *reinterpret_cast<const uint16_t*>(wp);
            const uint32_t p = u | (u << 16);
            b0 = (p >> c) & 0x00100001u;
            b1 = (p >> (c + 8)) & 0x00100001u;
          }
          mma_f16_16816(acc, qa[blk][0], qa[blk][1], qa[blk][2], qa[blk][3], b0, b1);
          qs += q_sum_blk[blk];
          if (KL.blk_last[blk]) {
#pragma unroll
            for (int col = 0; col < 2; ++col) {
              const int tok = 8 * j + c + 4 * col;
              const float2 kp = half2_bits_to_float2(
                  lds_u32(tile + KL.params_tile_off + (tok * KL.param_pairs + KL.blk_param[blk]) * 4));
              sp[col] = fmaf((acc[col] + acc[2 + col]) * dot_scale, kp.x, fmaf(kp.y, qs, sp[col]));
            }
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[r] = 0.f;
            qs = 0.f;
          }
        }
#pragma unroll
        for (int col = 0; col < 2; ++col) {
          const int t = t0 + 8 * j + c + 4 * col;
          if (t >= begin && t < end) {
            s[tt][2 * j + col] = sp[col];
            stage_max = fmaxf(stage_max, sp[col]);
          }
        }
      }
    }
    stage_max = fmaxf(stage_max, __shfl_xor_sync(0xffffffffu, stage_max, 1));
    stage_max = fmaxf(stage_max, __shfl_xor_sync(0xffffffffu, stage_max, 2));
    const float m_new = fmaxf(m, stage_max);
    if (__any_sync(0xffffffffu, m_new > m)) {
      const float corr = exp2f(m - m_new);
      l *= corr;
      const float corr_a = __shfl_sync(0xffffffffu, corr, 8 * c);
      const float corr_b = __shfl_sync(0xffffffffu, corr, 8 * c + 4);
#pragma unroll
      for (int blk = 0; blk < kBlocks; ++blk) {
        z_blk[blk] *= corr;
        o[blk][0] *= corr_a;
        o[blk][1] *= corr_b;
        o[blk][2] *= corr_a;
        o[blk][3] *= corr_b;
      }
      m = m_new;
    }

#pragma unroll
    for (int tt = 0; tt < kInt2TilesPerStage; ++tt) {
      const int i = stage * kInt2TilesPerStage + tt;
      if (i >= warp_tiles) continue;
      const uint8_t* tile = st + tt * tile_bytes + v_tile0;
      float p[4];
      int tok[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        tok[q] = 8 * (q >> 1) + c + 4 * (q & 1);
        p[q] = exp2f(s[tt][q] - m);  // 0 for masked tokens
        l += p[q];
      }
      uint32_t pb0 = 0, pb1 = 0;
      float z_seg = 0.f;
#pragma unroll
      for (int blk = 0; blk < kBlocks; ++blk) {
        const int bits = VL.blk_bits[blk];
        if (bits == 0) continue;
        if (VL.blk_first[blk]) {
          float pv[4];
          z_seg = 0.f;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            // Masked tokens may sit on never-written bytes: their scale/zero must not reach the sums (0·NaN).
            const float2 vp = s[tt][q] == -INFINITY
                                  ? make_float2(0.f, 0.f)
                                  : half2_bits_to_float2(lds_u32(tile + VL.params_tile_off +
                                                                 (tok[q] * VL.param_pairs + VL.blk_param[blk]) * 4));
            z_seg = fmaf(p[q], vp.y, z_seg);
            pv[q] = p[q] * vp.x;
          }
          pb0 = pack_half2(pv[0], pv[1]);
          pb1 = pack_half2(pv[2], pv[3]);
        }
        z_blk[blk] += z_seg;
        const uint8_t* base = tile + VL.blk_tile_off[blk];
        const int row = VL.blk_row_bytes[blk];
        uint32_t a0, a1, a2, a3;
        if (bits == 2) {
          uint32_t x[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) x[q] = lds_u32(base + tok[q] * row) >> (2 * g);
          a0 = __byte_perm(x[0], x[1], 0x5410) & 0x00030003u;  // dim g, tokens c | c+4
          a1 = __byte_perm(x[0], x[1], 0x7632) & 0x00030003u;  // dim 8+g
          a2 = __byte_perm(x[2], x[3], 0x5410) & 0x00030003u;
          a3 = __byte_perm(x[2], x[3], 0x7632) & 0x00030003u;
        } else if (bits == 4) {
          uint32_t x[4], y[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const uint2 w = *reinterpret_cast<const uint2*>(base + tok[q] * row);
            x[q] = w.x >> (4 * g);
            y[q] = w.y >> (4 * g);
          }
          a0 = __byte_perm(x[0], x[1], 0x5410) & 0x000f000fu;
          a1 = __byte_perm(y[0], y[1], 0x5410) & 0x000f000fu;
          a2 = __byte_perm(x[2], x[3], 0x5410) & 0x000f000fu;
          a3 = __byte_perm(y[2], y[3], 0x5410) & 0x000f000fu;
        } else {
          uint32_t x[4];
#pragma unroll
          for (int q = 0; q < 4; ++q)
            x[q] = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(base + tok[q] * row)) >> g;
          a0 = __byte_perm(x[0], x[1], 0x5410) & 0x00010001u;
          a1 = __byte_perm(x[0] >> 8, x[1] >> 8, 0x5410) & 0x00010001u;
          a2 = __byte_perm(x[2], x[3], 0x5410) & 0x00010001u;
          a3 = __byte_perm(x[2] >> 8, x[3] >> 8, 0x5410) & 0x00010001u;
        }
        mma_f16_16816(o[blk], a0, a1, a2, a3, pb0, pb1);
      }
    }
    __syncwarp();
  }
  cp_async_wait<0>();

  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  __syncthreads();
  float* warp_acc = reinterpret_cast<float*>(smem);
  if (stages > 0) {
#pragma unroll
    for (int blk = 0; blk < kBlocks; ++blk) {
      float z = z_blk[blk];
      z += __shfl_xor_sync(0xffffffffu, z, 1);
      z += __shfl_xor_sync(0xffffffffu, z, 2);
      const float z_a = __shfl_sync(0xffffffffu, z, 8 * c);
      const float z_b = __shfl_sync(0xffffffffu, z, 8 * c + 4);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int dim = 16 * blk + g + 8 * r;
        if (2 * c < group) warp_acc[(warp * kMaxGroup + 2 * c) * kHeadDim + dim] = fmaf(o[blk][2 * r], 16777216.f, z_a);
        if (2 * c + 1 < group)
          warp_acc[(warp * kMaxGroup + 2 * c + 1) * kHeadDim + dim] = fmaf(o[blk][2 * r + 1], 16777216.f, z_b);
      }
    }
  }
  if (c == 0) {
    warp_max[warp][g] = m;
    warp_sum_l[warp][g] = l;
  }
  __syncthreads();
  write_block_partial<kHeadDim, kMaxGroup>(a, b, h, split, warp_acc, warp_max, warp_sum_l);
}

}  // namespace oscar::kern::detail
