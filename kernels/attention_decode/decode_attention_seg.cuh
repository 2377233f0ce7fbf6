#pragma once
// Segmented (spectral) pages for decode_attention: the quantized tokens of a layer whose K and/or V records are
// several contiguous 16-aligned dim segments of widths {0, 1, 2, 3, 4}, each with its own per-token fp16 (scale,
// zero) (formats/kv_layout.h SegmentedPageGeometry). Replaces the INT2 split kernel for such layers; the rotate_q,
// window and merge kernels are shared (decode_attention.cuh).
//
// Same tensor-core structure as the INT2 kernel (read its header comment first), with one change of fragment
// layout so that no MMA mixes segments: the k-dimension of every S = Q·Kᵀ MMA and the rows of every Oᵀ = Vᵀ·Pᵀ
// MMA are ONE 16-dim block of the rotated head. Then, per segment, q·k̂ = s_seg·(q_seg·c_seg) + z_seg·Σq_seg
// (the S accumulators are flushed at each segment's last block), and Σ_t p_t v̂_t over a segment's dims =
// Vᵀ_seg·(p·s_v,seg) + Σ_t p_t z_v,seg (the P operand is rebuilt per segment). 0-bit blocks issue no MMA, read as 0.
//
// Compile-time layouts. The kernel is a template on one 64-bit code per tensor (seg_layout_code: 4 bits per block,
// width | "starts a segment" << 3); every per-block property (width, tile offset, row bytes, pair index, first /
// last) is a constexpr function of it, so after unrolling each block is straight-line code with no table reads and
// the body holds only the unpack variants the layout uses (the generic body held all of them for every block and
// thrashed the instruction cache). Code 0 is the generic kernel: the same body reading decode_attention.cu's
// per-block tables (SegDecodeLayout) at run time, for any layout that has no instantiation.
//
// Code fields become fp16 numbers whose bit pattern, read as an integer P < 2048, is worth P·2^-24 (exact: the
// subnormals and the first normal binade), so a field of b bits may sit at bit offsets p <= 10 - b of a 16-bit half.
// A field at offset p is worth c·f·2^-24 with f = 2^p; Q carries F/f with F = 256 (the largest f: a 3-bit field at
// offset 8), so one dot scale 2^24/(σF) serves all blocks; max|q|·σ < 128 keeps q·σ·F below fp16's 65504.
//   K (B operand, token n = g, k = 2c,2c+1 | 2c+8,2c+9), per block word w of the token:
//     1-bit: p = u | u << 16; (p >> c) & 0x00100001 -> dims c (f 1), 4+c (f 16); (p >> c+8) -> dims 8+c, 12+c
//     2-bit: (w >> 4c) & 0x00030003 -> dims 2c, 8+2c (f 1);  & 0x000c000c -> dims 2c+1, 9+2c (f 4)
//     3-bit: x = the 12 bits of dims 4c..4c+3 (funnel shift of the two aligned words holding them), y = x's low half
//            in both halves (prmt); y & 0x01c00007 -> dims 4c (f 1), 4c+2 (f 64); (y >> 1) & 0x0700001c -> dims
//            4c+1 (f 4), 4c+3 (f 256)
//     4-bit: (w0 >> 4c) & 0x000f000f -> dims c, 4+c;  (w1 >> 4c) & 0x000f000f -> dims 8+c, 12+c (f 1)
//   V (A operand, k = tokens c, c+4 | 8+c, 12+c as in the INT2 kernel; rows g | g+8 = dims 2g | 2g+1 of the block):
//     per token the lane loads the byte (1, 2, 4 bits) or funnel-shifted word (3 bits) holding dims 2g, 2g+1, one
//     prmt pairs two tokens' low halves, and one mask per register picks the dim: a0/a2 = y & M0, a1/a3 = y & M1,
//     with the fields at p0 = 2(g%4) / 4(g%2) / 0 / 0 and p1 = p0 + bits; the 2^p are undone when Oᵀ is stored.
// The tile in shared memory mirrors the page: per segment region 16 rows of that segment's code bytes, then the
// 16 tokens' (scale, zero) pairs; K's tile then V's.
#include <cstdint>

#include "kernels/attention_decode/decode_attention.cuh"

namespace oscar::kern::detail {

// ---- compile-time layout codes -----------------------------------------------------------------------------------
// Block b (16 dims) of a tensor is nibble b of the code: bits 0-2 its width, bit 3 set when a segment starts there.
// A valid code always has bit 3 of nibble 0 set, so 0 never names a layout (it is the generic kernel).
__host__ __device__ constexpr int seg_code_bits(uint64_t code, int blk) { return static_cast<int>((code >> (4 * blk)) & 7u); }
__host__ __device__ constexpr bool seg_code_starts(uint64_t code, int blk) { return ((code >> (4 * blk + 3)) & 1u) != 0; }
__host__ __device__ constexpr int seg_code_first_block(uint64_t code, int blk) {
  int f = blk;
  while (f > 0 && !seg_code_starts(code, f)) --f;
  return f;
}
__host__ __device__ constexpr int seg_code_end_block(uint64_t code, int blk, int blocks) {
  int e = blk + 1;
  while (e < blocks && !seg_code_starts(code, e)) ++e;
  return e;
}
// Record bytes of the codes of blocks [0, blk) (a segment's bytes are 2·bits per block: 16 dims, whole bytes).
__host__ __device__ constexpr int seg_code_bytes_before(uint64_t code, int blk) {
  int n = 0;
  for (int b = 0; b < blk; ++b) n += 2 * seg_code_bits(code, b);
  return n;
}
__host__ __device__ constexpr int seg_code_param(uint64_t code, int blk) {
  int pair = -1;
  for (int b = 0; b <= blk; ++b)
    if (seg_code_starts(code, b) && seg_code_bits(code, b) > 0) ++pair;
  return pair < 0 ? 0 : pair;
}
__host__ __device__ constexpr int seg_code_pairs(uint64_t code, int blocks) {
  int n = 0;
  for (int b = 0; b < blocks; ++b)
    if (seg_code_starts(code, b) && seg_code_bits(code, b) > 0) ++n;
  return n;
}

// The code of a segment list (segments on 16-dim boundaries tiling the head) and of decode_attention.cu's tables.
__host__ __device__ constexpr uint64_t seg_layout_code(const fmt::QuantSegment* segs, int n) {
  uint64_t code = 0;
  for (int s = 0; s < n; ++s)
    for (int blk = segs[s].begin / 16; blk < segs[s].end / 16; ++blk)
      code |= static_cast<uint64_t>(segs[s].bits | (blk == segs[s].begin / 16 ? 8 : 0)) << (4 * blk);
  return code;
}
inline uint64_t seg_layout_code(const SegDecodeLayout& L, int blocks) {
  uint64_t code = 0;
  for (int blk = 0; blk < blocks; ++blk)
    code |= static_cast<uint64_t>(L.blk_bits[blk] | (L.blk_first[blk] ? 8 : 0)) << (4 * blk);
  return code;
}

// The (K, V) layouts at head_dim 128 with a compiled kernel; any other pair runs the generic one. Each entry is a
// full kernel instantiation (compile time, binary size), so the list holds what is run: the layout the spectral
// calibrator picks with widths 1/2/3/4 (qwen3-tiny-trained layer 1: K 48x3b + 80x1b, V INT2) and the
// decode_attention_bench layouts (36 bytes per record like INT2), and whole-head INT4 K and V (the int4 baseline
// cache of `oscar eval --device cuda`). Whole-head INT2 K and V (the other layers of such a bundle) never get here:
// decode_attention() sends them to the INT2 kernel.
namespace seg_layouts {
inline constexpr fmt::QuantSegment kInt2[] = {{0, 128, 2}};
inline constexpr fmt::QuantSegment kInt4[] = {{0, 128, 4}};
inline constexpr fmt::QuantSegment kK3b1b[] = {{0, 48, 3}, {48, 128, 1}};
inline constexpr fmt::QuantSegment kBenchK[] = {{0, 32, 4}, {32, 80, 2}, {80, 128, 0}};
inline constexpr fmt::QuantSegment kBenchV[] = {{0, 16, 4}, {16, 96, 2}, {96, 128, 0}};
inline constexpr fmt::QuantSegment kBenchV3b[] = {{0, 32, 3}, {32, 96, 2}, {96, 128, 0}};
}  // namespace seg_layouts
struct SegLayoutPair {
  uint64_t k, v;
};
inline constexpr SegLayoutPair kSegCompiledLayouts128[] = {
    {seg_layout_code(seg_layouts::kK3b1b, 2), seg_layout_code(seg_layouts::kInt2, 1)},
    {seg_layout_code(seg_layouts::kBenchK, 3), seg_layout_code(seg_layouts::kBenchV, 3)},
    {seg_layout_code(seg_layouts::kK3b1b, 2), seg_layout_code(seg_layouts::kBenchV3b, 3)},
    {seg_layout_code(seg_layouts::kInt4, 1), seg_layout_code(seg_layouts::kInt4, 1)},
};
inline constexpr int kSegCompiledLayouts128Count =
    static_cast<int>(sizeof(kSegCompiledLayouts128) / sizeof(kSegCompiledLayouts128[0]));
static_assert(seg_layout_code(seg_layouts::kInt2, 1) == 0x2222222au);
static_assert(seg_code_bytes_before(seg_layout_code(seg_layouts::kK3b1b, 2), 8) == 28, "48x3b + 80x1b = 28 bytes");
static_assert(seg_code_param(seg_layout_code(seg_layouts::kBenchV3b, 3), 7) == 1, "0-bit segment: no pair");

// The one-segment 2-bit layout over kBlocks blocks (byte-identical to Int2PageGeometry).
__host__ __device__ constexpr uint64_t seg_int2_code(int blocks) {
  uint64_t code = 8;
  for (int b = 0; b < blocks; ++b) code |= uint64_t{2} << (4 * b);
  return code;
}

// One tensor's per-block view: constexpr for a layout code, the runtime tables for code 0.
template <int kBlocks, uint64_t kCode>
struct SegView {
  static constexpr bool kStatic = kCode != 0;
  const SegDecodeLayout& L;
  __device__ __forceinline__ int bits(int blk) const {
    if constexpr (kStatic) return seg_code_bits(kCode, blk);
    else return L.blk_bits[blk];
  }
  __device__ __forceinline__ bool first(int blk) const {
    if constexpr (kStatic) return seg_code_starts(kCode, blk) || blk == 0;
    else return L.blk_first[blk] != 0;
  }
  __device__ __forceinline__ bool last(int blk) const {
    if constexpr (kStatic) return blk + 1 == kBlocks || seg_code_starts(kCode, blk + 1);
    else return L.blk_last[blk] != 0;
  }
  __device__ __forceinline__ int param(int blk) const {
    if constexpr (kStatic) return seg_code_param(kCode, blk);
    else return L.blk_param[blk];
  }
  // Byte offset of token 0's codes of block blk in the 16-token tile, and the row stride of its region.
  __device__ __forceinline__ int tile_off(int blk) const {
    if constexpr (kStatic) {
      const int f = seg_code_first_block(kCode, blk);
      return 16 * seg_code_bytes_before(kCode, f) + (blk - f) * 2 * seg_code_bits(kCode, blk);
    } else {
      return L.blk_tile_off[blk];
    }
  }
  __device__ __forceinline__ int row_bytes(int blk) const {
    if constexpr (kStatic) {
      const int f = seg_code_first_block(kCode, blk);
      return 2 * seg_code_bits(kCode, blk) * (seg_code_end_block(kCode, blk, kBlocks) - f);
    } else {
      return L.blk_row_bytes[blk];
    }
  }
  __device__ __forceinline__ int record_bytes() const {
    if constexpr (kStatic) return seg_code_bytes_before(kCode, kBlocks) + 4 * seg_code_pairs(kCode, kBlocks);
    else return L.record_bytes;
  }
  __device__ __forceinline__ int code_bytes() const {
    if constexpr (kStatic) return seg_code_bytes_before(kCode, kBlocks);
    else return L.params_tile_off / 16;
  }
  __device__ __forceinline__ int param_pairs() const {
    if constexpr (kStatic) return seg_code_pairs(kCode, kBlocks);
    else return L.param_pairs;
  }
};

// Chunks of 16 bytes one lane copies per tile and tensor: a record is at most d/2 code bytes (4 bits) plus one
// pair per block, 16 tokens of it are `record_bytes` chunks.
template <int kHeadDim>
inline constexpr int kSegMaxChunks = (kHeadDim / 2 + 4 * (kHeadDim / 16) + 31) / 32;

// Chunk i of this lane is tile bytes [16 (lane + 32 i), +16): its source in the page block is src[i] + (first
// token of the tile) · row[i]; row 0 = no chunk.
template <int kHeadDim>
struct SegCopyPlan {
  int src[kSegMaxChunks<kHeadDim>];
  int row[kSegMaxChunks<kHeadDim>];
};

template <int kHeadDim, int kBlocks, uint64_t kCode>
__device__ __forceinline__ SegCopyPlan<kHeadDim> seg_copy_plan(const SegView<kBlocks, kCode>& V, int page_tokens,
                                                               int lane) {
  SegCopyPlan<kHeadDim> plan;
#pragma unroll
  for (int i = 0; i < kSegMaxChunks<kHeadDim>; ++i) {
    const int chunk = lane + 32 * i;
    plan.src[i] = 0;
    plan.row[i] = 0;
    if constexpr (SegView<kBlocks, kCode>::kStatic) {
      // Regions: each segment with bits > 0 in order, then the pairs.
#pragma unroll
      for (int blk = 0; blk < kBlocks; ++blk) {
        if (!V.first(blk) || V.bits(blk) == 0) continue;
        const int rec_off = V.tile_off(blk) / 16, row = V.row_bytes(blk);
        if (chunk >= rec_off && chunk < rec_off + row) {
          plan.src[i] = page_tokens * rec_off + 16 * (chunk - rec_off);
          plan.row[i] = row;
        }
      }
      const int pairs_off = V.code_bytes(), pairs_row = 4 * V.param_pairs();
      if (pairs_row > 0 && chunk >= pairs_off && chunk < pairs_off + pairs_row) {
        plan.src[i] = page_tokens * pairs_off + 16 * (chunk - pairs_off);
        plan.row[i] = pairs_row;
      }
    } else {
      const SegDecodeLayout& L = V.L;
      if (chunk < L.record_bytes) {
        for (int r = 0; r < L.num_regions; ++r) {
          if (chunk >= L.region_rec_off[r] && chunk < L.region_rec_off[r] + L.region_row_bytes[r]) {
            plan.src[i] = page_tokens * L.region_rec_off[r] + 16 * (chunk - L.region_rec_off[r]);
            plan.row[i] = L.region_row_bytes[r];
          }
        }
      }
    }
  }
  return plan;
}

__device__ __forceinline__ uint32_t lds_u32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// 32 bits of shared memory starting `bit` bits after the 2-byte aligned address p, read as two aligned words and a
// funnel shift; the callers need at most 12 bits at bit <= 42 (a 3-bit block is 6 bytes at a 2-byte boundary).
// Bits past the caller's field are whatever follows in the tile (never past it: a code region is always followed
// by the tile's (scale, zero) pairs).
// `base` is 16-byte aligned (a tile), so the word offset and the shift depend on `off` and `bit` only: per lane
// they are loop invariants the compiler can hoist.
__device__ __forceinline__ uint32_t lds_bits(const uint8_t* base, int off, int bit) {
  const int s = 8 * (off & 3) + bit;
  const uint32_t* w = reinterpret_cast<const uint32_t*>(base + (off & ~3) + 4 * (s >> 5));
  return __funnelshift_r(w[0], w[1], s & 31);
}

// B fragment (b0, b1) of K block `bits` for this lane's (token, c); the token's block starts at tile + off.
template <int kBits>
__device__ __forceinline__ void seg_k_fragment(const uint8_t* tile, int off, int c, uint32_t& b0, uint32_t& b1) {
  const uint8_t* wp = tile + off;
  if constexpr (kBits == 1) {
    const uint32_t u = *reinterpret_cast<const uint16_t*>(wp);
    const uint32_t p = u | (u << 16);
    b0 = (p >> c) & 0x00100001u;
    b1 = (p >> (c + 8)) & 0x00100001u;
  } else if constexpr (kBits == 2) {
    const uint32_t x = lds_u32(wp) >> (4 * c);
    b0 = x & 0x00030003u;
    b1 = x & 0x000c000cu;
  } else if constexpr (kBits == 3) {
    const uint32_t y = __byte_perm(lds_bits(tile, off, 12 * c), 0u, 0x1010);
    b0 = y & 0x01c00007u;
    b1 = (y >> 1) & 0x0700001cu;
  } else {
    const uint2 w = *reinterpret_cast<const uint2*>(wp);
    b0 = (w.x >> (4 * c)) & 0x000f000fu;
    b1 = (w.y >> (4 * c)) & 0x000f000fu;
  }
}

// Dims (within the block) and factors f of the Q fragment slots (b0 lo, b0 hi, b1 lo, b1 hi) for lane c.
__device__ __forceinline__ void seg_k_slots(int bits, int c, int (&dim)[4], int (&fexp)[4]) {
  if (bits == 1) {
    dim[0] = c, dim[1] = 4 + c, dim[2] = 8 + c, dim[3] = 12 + c;
    fexp[0] = 0, fexp[1] = 4, fexp[2] = 0, fexp[3] = 4;
  } else if (bits == 2) {
    dim[0] = 2 * c, dim[1] = 8 + 2 * c, dim[2] = 2 * c + 1, dim[3] = 9 + 2 * c;
    fexp[0] = 0, fexp[1] = 0, fexp[2] = 2, fexp[3] = 2;
  } else if (bits == 3) {
    dim[0] = 4 * c, dim[1] = 4 * c + 2, dim[2] = 4 * c + 1, dim[3] = 4 * c + 3;
    fexp[0] = 0, fexp[1] = 6, fexp[2] = 2, fexp[3] = 8;
  } else {  // 4 bits (0-bit blocks: values unused)
    dim[0] = c, dim[1] = 4 + c, dim[2] = 8 + c, dim[3] = 12 + c;
    fexp[0] = fexp[1] = fexp[2] = fexp[3] = 0;
  }
}

// V: the 32-bit value whose low half holds dims 2g, 2g+1 of the block for one token (row = the token's block word),
// and the offset p0 of dim 2g's field in it (dim 2g+1 at p0 + bits).
template <int kBits>
__device__ __forceinline__ uint32_t seg_v_token(const uint8_t* tile, int off, int g) {
  if constexpr (kBits == 1) return tile[off + (g >> 2)];
  else if constexpr (kBits == 2) return tile[off + (g >> 1)];
  else if constexpr (kBits == 3) return lds_bits(tile, off, 6 * g);
  else return tile[off + g];
}
__host__ __device__ constexpr int seg_v_p0(int bits, int g) {
  return bits == 1 ? 2 * (g & 3) : bits == 2 ? 4 * (g & 1) : 0;
}

template <int kBits>
__device__ __forceinline__ void seg_v_fragment(const uint8_t* tile, int off, int row, const int (&tok)[4], int g,
                                               uint32_t& a0, uint32_t& a1, uint32_t& a2, uint32_t& a3) {
  uint32_t x[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) x[q] = seg_v_token<kBits>(tile, off + tok[q] * row, g);
  const uint32_t y01 = __byte_perm(x[0], x[1], 0x5410);  // dims of tokens c | c+4
  const uint32_t y23 = __byte_perm(x[2], x[3], 0x5410);  // tokens 8+c | 12+c
  const uint32_t field = (1u << kBits) - 1u;
  const uint32_t m0 = (field | (field << 16)) << seg_v_p0(kBits, g);
  const uint32_t m1 = m0 << kBits;
  a0 = y01 & m0;  // row g = dim 2g
  a1 = y01 & m1;  // row g+8 = dim 2g+1
  a2 = y23 & m0;
  a3 = y23 & m1;
}

template <int kHeadDim, uint64_t kKCode, uint64_t kVCode>
__global__ void __launch_bounds__(kDecodeWarps * 32, kHeadDim <= 128 ? 4 : 2)
    decode_attention_seg_kernel(DecodeArgs a) {
  constexpr int kBlocks = kHeadDim / 16;
  constexpr int kMaxGroup = 8;
  constexpr float kF = 256.f;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float warp_max[kDecodeWarps][kMaxGroup];
  __shared__ float warp_sum_l[kDecodeWarps][kMaxGroup];
  const SegView<kBlocks, kKCode> KL{a.k_seg};
  const SegView<kBlocks, kVCode> VL{a.v_seg};
  // A compiled whole-head INT2 V (the calibrator's usual V) uses the INT2 kernel's V fragments instead of one MMA
  // per 16-dim block: one segment needs no per-block rows, and its lane-owns-d/8-dims layout loads one word per
  // token for all m-tiles and unpacks two fields per lop3 (decode_attention.cuh, INT2 path).
  constexpr bool kVInt2 = kVCode == seg_int2_code(kBlocks);

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
  const int k_tile_bytes = 16 * KL.record_bytes();
  const int tile_bytes = k_tile_bytes + 16 * VL.record_bytes();
  uint8_t* ring = smem + warp * (kInt2Stages * kInt2TilesPerStage * tile_bytes);
  const int k_page_bytes = a.page_tokens * KL.record_bytes();
  const int v_page_bytes = a.page_tokens * VL.record_bytes();

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
        const uint8_t* k_block = a.k_int2_pool + fmt::page_block_offset(page, h, a.num_kv_heads, k_page_bytes);
        const uint8_t* v_block = a.v_int2_pool + fmt::page_block_offset(page, h, a.num_kv_heads, v_page_bytes);
        uint8_t* tile = dst + tt * tile_bytes;
#pragma unroll
        for (int ci = 0; ci < kSegMaxChunks<kHeadDim>; ++ci) {
          const int d = 16 * (lane + 32 * ci);
          if (kplan.row[ci] > 0) cp_async16(tile + d, k_block + kplan.src[ci] + offset * kplan.row[ci]);
          if (vplan.row[ci] > 0) cp_async16(tile + k_tile_bytes + d, v_block + vplan.src[ci] + offset * vplan.row[ci]);
        }
      }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < kInt2Stages - 1; ++s) issue_stage(s, load_stage_pages(s));
  int pages_ahead = load_stage_pages(kInt2Stages - 1);

  // Q fragments per block (layout in the header comment) and Σq per K segment, kept at the segment's last block.
  uint32_t qa[kBlocks][4];
  float q_sum_seg[kBlocks];
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
    float run = 0.f;
#pragma unroll
    for (int blk = 0; blk < kBlocks; ++blk) {
      const int bits = KL.bits(blk);
      int dim[4], fexp[4];
      seg_k_slots(bits, c, dim, fexp);
      float x[4], qs = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float qv = (g < group && bits != 0) ? qrow[16 * blk + dim[i]] : 0.f;
        qs += qv;
        x[i] = qv * sigma * ldexpf(kF, -fexp[i]);
      }
      qs += __shfl_xor_sync(0xffffffffu, qs, 1);
      qs += __shfl_xor_sync(0xffffffffu, qs, 2);
      if (KL.first(blk)) run = 0.f;
      run += qs;
      q_sum_seg[blk] = KL.last(blk) ? run : 0.f;
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

  float o[kBlocks][4];   // Oᵀ accumulators: m-tile = block, rows dims 2g / 2g+1, columns heads 2c / 2c+1
  float z_seg[kBlocks];  // head g: Σ_t p_t z_v,t of the segment starting at this block (this lane's tokens)
#pragma unroll
  for (int blk = 0; blk < kBlocks; ++blk) {
    z_seg[blk] = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) o[blk][i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const int k_token = (g >> 1) + 4 * (g & 1);
  int tok[4];  // V k-slots: tokens c, c+4, 8+c, 12+c of the tile
#pragma unroll
  for (int q = 0; q < 4; ++q) tok[q] = 8 * (q >> 1) + c + 4 * (q & 1);

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
        float sp[2] = {0.f, 0.f};
#pragma unroll
        for (int blk = 0; blk < kBlocks; ++blk) {
          const int bits = KL.bits(blk);
          if (bits == 0) continue;
          const int off = KL.tile_off(blk) + ktok * KL.row_bytes(blk);
          uint32_t b0, b1;
          if (bits == 1) seg_k_fragment<1>(tile, off, c, b0, b1);
          else if (bits == 2) seg_k_fragment<2>(tile, off, c, b0, b1);
          else if (bits == 3) seg_k_fragment<3>(tile, off, c, b0, b1);
          else seg_k_fragment<4>(tile, off, c, b0, b1);
          mma_f16_16816(acc, qa[blk][0], qa[blk][1], qa[blk][2], qa[blk][3], b0, b1);
          if (KL.last(blk)) {
#pragma unroll
            for (int col = 0; col < 2; ++col) {
              const int tk = 8 * j + c + 4 * col;
              const float2 kp = half2_bits_to_float2(
                  lds_u32(tile + 16 * KL.code_bytes() + (tk * KL.param_pairs() + KL.param(blk)) * 4));
              sp[col] = fmaf((acc[col] + acc[2 + col]) * dot_scale, kp.x, fmaf(kp.y, q_sum_seg[blk], sp[col]));
            }
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[r] = 0.f;
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
        if (VL.bits(blk) == 0) continue;
        if (VL.first(blk)) z_seg[blk] *= corr;
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
      const uint8_t* tile = st + tt * tile_bytes + k_tile_bytes;
      float p[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        p[q] = exp2f(s[tt][q] - m);  // 0 for masked tokens
        l += p[q];
      }
      uint32_t pb0 = 0, pb1 = 0;
#pragma unroll
      for (int blk = 0; blk < kBlocks; ++blk) {
        const int bits = VL.bits(blk);
        if (bits == 0) continue;
        if (VL.first(blk)) {
          float pv[4], z = 0.f;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            // Masked tokens may sit on never-written bytes: their scale/zero must not reach the sums (0·NaN).
            const float2 vp = s[tt][q] == -INFINITY
                                  ? make_float2(0.f, 0.f)
                                  : half2_bits_to_float2(lds_u32(tile + 16 * VL.code_bytes() +
                                                                 (tok[q] * VL.param_pairs() + VL.param(blk)) * 4));
            z = fmaf(p[q], vp.y, z);
            pv[q] = p[q] * vp.x;
          }
          z_seg[blk] += z;
          pb0 = pack_half2(pv[0], pv[1]);
          pb1 = pack_half2(pv[2], pv[3]);
        }
        if constexpr (kVInt2) {
          // Rows g, g+8 of m-tile mt are dims g·d/8 + 2mt, +1 (code fields e = 2mt % 8, 2mt % 8 + 1 of chunk mt/4).
          constexpr int kVBytes = kHeadDim / 32, kVChunks = kHeadDim / 64;
          if (blk == 0) {
            uint32_t vw[4][(kVChunks + 1) / 2];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              const uint8_t* src = tile + tok[q] * (kHeadDim / 4) + g * kVBytes;
              if constexpr (kVBytes == 2) vw[q][0] = *reinterpret_cast<const uint16_t*>(src);
              else lds_words<kVBytes / 4>(src, vw[q]);
            }
#pragma unroll
            for (int ch = 0; ch < kVChunks; ++ch) {
              const uint32_t sel = (ch & 1) ? 0x7632u : 0x5410u;
              const uint32_t y0 = __byte_perm(vw[0][ch / 2], vw[1][ch / 2], sel);  // tokens c | c+4
              const uint32_t y1 = __byte_perm(vw[2][ch / 2], vw[3][ch / 2], sel);  // tokens 8+c | 12+c
              const uint32_t y0s = y0 >> 6, y1s = y1 >> 6;
#pragma unroll
              for (int e2 = 0; e2 < 4; ++e2)
                mma_f16_16816(o[4 * ch + e2], code_pair(y0, y0s, 2 * e2), code_pair(y0, y0s, 2 * e2 + 1),
                              code_pair(y1, y1s, 2 * e2), code_pair(y1, y1s, 2 * e2 + 1), pb0, pb1);
            }
          }
          continue;
        }
        const int off = VL.tile_off(blk), row = VL.row_bytes(blk);
        uint32_t a0, a1, a2, a3;
        if (bits == 1) seg_v_fragment<1>(tile, off, row, tok, g, a0, a1, a2, a3);
        else if (bits == 2) seg_v_fragment<2>(tile, off, row, tok, g, a0, a1, a2, a3);
        else if (bits == 3) seg_v_fragment<3>(tile, off, row, tok, g, a0, a1, a2, a3);
        else seg_v_fragment<4>(tile, off, row, tok, g, a0, a1, a2, a3);
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
    float z_a = 0.f, z_b = 0.f;
#pragma unroll
    for (int blk = 0; blk < kBlocks; ++blk) {
      const int bits = VL.bits(blk);
      if (VL.first(blk)) {
        float z = bits == 0 ? 0.f : z_seg[blk];
        z += __shfl_xor_sync(0xffffffffu, z, 1);
        z += __shfl_xor_sync(0xffffffffu, z, 2);
        z_a = __shfl_sync(0xffffffffu, z, 8 * c);
        z_b = __shfl_sync(0xffffffffu, z, 8 * c + 4);
      }
      const int p0 = seg_v_p0(bits, g);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int dim = kVInt2 ? g * (kHeadDim / 8) + 2 * blk + r : 16 * blk + 2 * g + r;
        const float unscale = kVInt2     ? static_cast<float>(1 << (24 - 2 * code_pow4((2 * blk + r) % 8)))
                              : bits == 0 ? 0.f
                                          : ldexpf(1.f, 24 - p0 - r * bits);
        if (2 * c < group) warp_acc[(warp * kMaxGroup + 2 * c) * kHeadDim + dim] = fmaf(o[blk][2 * r], unscale, z_a);
        if (2 * c + 1 < group)
          warp_acc[(warp * kMaxGroup + 2 * c + 1) * kHeadDim + dim] = fmaf(o[blk][2 * r + 1], unscale, z_b);
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
