#pragma once
// Device code of prefill attention v2: FlashAttention-2 schedule on mma.sync.m16n8k16 with two changes against v1
// that target the two limits v1 hits at long sequences (see docs/results.md "GPU forward"):
//
// 1. A block holds 128 query rows = (128 / pack) tokens × pack query heads of ONE KV head (pack = the largest
//    power of two ≤ 8 dividing the GQA group). Every K/V tile brought into shared memory serves 128 rows instead of
//    v1's 64 rows of a single head: half the L2→SM traffic at group 1, and at Qwen3's group 4 the four heads that
//    read the same K/V share one copy. At 32K tokens v1 moves ~134 GB of K/V per layer through L2; v2 ~67 GB.
// 2. Each of the 4 warps owns 32 rows (two m16 tiles), so every K or V fragment read from shared memory feeds two
//    MMAs. v1's warps own 16 rows and read 256 bytes of shared memory per MMA, more than the 128 B/clk/SM port
//    delivers at the mma.sync rate; here it is ~160 (Q is re-read from shared memory per 16-dim step, as in FA2,
//    because Q fragments for 32 rows would not fit in registers next to the 32×128 fp32 output).
//
// The softmax folds the scale into one FFMA per score (exp2(s·c − m·c), c = scale·log2 e). Causal masking runs only
// on tiles that cross the block's diagonal or the sequence end. The grid is 1-D and ordered by query tile, largest
// (most keys) first across all heads and sequences, so the last wave is made of short tiles.
//
// Fragment layouts are those of v1 (attention_prefill.cuh), which this file reuses for the PTX wrappers.
#include "kernels/attention_prefill/attention_prefill.cuh"

namespace oscar::kern::detail {

constexpr int kV2BlockM = 128;  // query rows per block (tokens × packed heads)
constexpr int kV2Warps = 4;
constexpr int kV2Threads = kV2Warps * 32;
constexpr int kV2MTiles = 2;  // m16 tiles per warp: 32 rows

// kBlockN keys per K/V tile: 64 (FA2's choice) or 32, which at head_dim 128 fits in 255 registers without spills
// (64 spills ~100 bytes) at the cost of twice the per-tile softmax bookkeeping; the device run picks.
template <int kHeadDim, int kBlockN_ = 64>
struct PrefillV2Smem {
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStride = kHeadDim + 8;  // 16 bytes of padding: ldmatrix rows land in distinct bank quads
  static constexpr int kQElems = kV2BlockM * kStride;
  static constexpr int kKvElems = kBlockN * kStride;
  static constexpr int kStageElems = 2 * kKvElems;  // K then V
  static constexpr int kBytes = (kQElems + 2 * kStageElems) * 2;
};

// One K or V tile (kV2BlockN rows of one KV head) into shared memory; rows past the sequence end and columns past
// head_dim are zero-filled.
template <int kHeadDim, int kBlockN>
__device__ __forceinline__ void v2_load_kv_tile(uint16_t* smem, const uint16_t* base, int64_t row_stride,
                                                int64_t seq_begin, int row0, int seqlen, int64_t head_offset,
                                                int head_dim) {
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kStride = PrefillV2Smem<kHeadDim, kBlockN>::kStride;
  constexpr int kV2BlockN = kBlockN;
#pragma unroll
  for (int idx = threadIdx.x; idx < kV2BlockN * kChunks; idx += kV2Threads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = row0 + r < seqlen && c * 8 < head_dim;
    const uint16_t* src = valid ? base + (seq_begin + row0 + r) * row_stride + head_offset + c * 8 : base;
    cp_async_16(smem + r * kStride + c * 8, src, valid);
  }
}

// Linear block index → (query tile, head pack, sequence) of the v2 grid (v2-v5 share it): query tile slowest and
// descending (largest tile first), then sequence, then head pack.
struct PrefillBlock {
  int head0;     // first query head of the pack
  int tokens;    // query tokens per block: kV2BlockM / pack = 128, 64, 32 or 16 (a multiple of 16)
  int q0;        // first query token of the block (the block has nothing to do when q0 >= seqlen)
  int seqlen;
  int kv_head;
  int64_t seq_begin;  // first row of the sequence in the packed batch
  __device__ __forceinline__ static PrefillBlock locate(const PrefillAttentionArgs& a, int pack, int num_q_tiles) {
    const int num_packs = a.num_heads / pack;
    const int per_tile = num_packs * a.num_seqs;
    const int q_tile = num_q_tiles - 1 - static_cast<int>(blockIdx.x) / per_tile;
    const int rest = static_cast<int>(blockIdx.x) % per_tile;
    PrefillBlock b;
    b.head0 = (rest % num_packs) * pack;
    const int seq = rest / num_packs;
    b.tokens = kV2BlockM / pack;
    b.seq_begin = a.cu_seqlens[seq];
    b.seqlen = a.cu_seqlens[seq + 1] - static_cast<int>(b.seq_begin);
    b.q0 = q_tile * b.tokens;
    b.kv_head = b.head0 / (a.num_heads / a.num_kv_heads);
    return b;
  }
};

template <int kHeadDim, int kBlockN>
__global__ void __launch_bounds__(kV2Threads, 2)
    attention_prefill_v2_kernel(PrefillAttentionArgs a, float scale_log2, int pack, int num_q_tiles) {
  using Smem = PrefillV2Smem<kHeadDim, kBlockN>;
  constexpr int kStride = Smem::kStride;
  constexpr int kV2BlockN = Smem::kBlockN;
  constexpr int kKChunks = kHeadDim / 16;  // k-steps of Q·Kᵀ
  constexpr int kDimTiles = kHeadDim / 8;  // n-tiles of P·V
  constexpr int kKeyTiles = kV2BlockN / 8;
  static_assert(kDimTiles % 2 == 0 && kKeyTiles % 2 == 0, "ldmatrix.x4 loads pairs of fragments");

  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;
  auto sK = [&](int stage) { return smem + Smem::kQElems + stage * Smem::kStageElems; };
  auto sV = [&](int stage) { return smem + Smem::kQElems + stage * Smem::kStageElems + Smem::kKvElems; };

  const PrefillBlock blk = PrefillBlock::locate(a, pack, num_q_tiles);
  if (blk.q0 >= blk.seqlen) return;
  const int head0 = blk.head0, tokens = blk.tokens, seqlen = blk.seqlen, q0 = blk.q0, kv_head = blk.kv_head;
  const int64_t seq_begin = blk.seq_begin;
  const int64_t kv_offset = static_cast<int64_t>(kv_head) * a.head_dim;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;

  // Q tile: row r is token q0 + r % tokens of head head0 + r / tokens.
  {
    constexpr int kChunks = kHeadDim / 8;
    for (int idx = threadIdx.x; idx < kV2BlockM * kChunks; idx += kV2Threads) {
      const int r = idx / kChunks, c = idx % kChunks;
      const int tok = q0 + r % tokens, head = head0 + r / tokens;
      const bool valid = tok < seqlen && c * 8 < a.head_dim;
      const uint16_t* src =
          valid ? a.q + (seq_begin + tok) * a.q_row_stride + static_cast<int64_t>(head) * a.head_dim + c * 8 : a.q;
      cp_async_16(sQ + r * kStride + c * 8, src, valid);
    }
  }
  const int kv_end = min(q0 + tokens, seqlen);  // causal: no key after the block's last query
  const int num_kv_tiles = (kv_end + kV2BlockN - 1) / kV2BlockN;
  v2_load_kv_tile<kHeadDim, kBlockN>(sK(0), a.k, a.k_row_stride, seq_begin, 0, seqlen, kv_offset, a.head_dim);
  v2_load_kv_tile<kHeadDim, kBlockN>(sV(0), a.v, a.v_row_stride, seq_begin, 0, seqlen, kv_offset, a.head_dim);
  cp_async_commit();

  // This warp's two m16 tiles: block rows warp*32 + 16*mt + [0, 16). An m-tile never straddles two heads because
  // `tokens` is a multiple of 16; its first row is token q_tok0[mt] (sequence-relative) of head q_head[mt].
  int q_tok0[kV2MTiles], q_head[kV2MTiles];
#pragma unroll
  for (int mt = 0; mt < kV2MTiles; ++mt) {
    const int row0 = warp * 32 + mt * 16;
    q_tok0[mt] = q0 + row0 % tokens;
    q_head[mt] = head0 + row0 / tokens;
  }

  float o_acc[kV2MTiles][kDimTiles][4];
#pragma unroll
  for (int mt = 0; mt < kV2MTiles; ++mt)
#pragma unroll
    for (int i = 0; i < kDimTiles; ++i) o_acc[mt][i][0] = o_acc[mt][i][1] = o_acc[mt][i][2] = o_acc[mt][i][3] = 0.f;
  // Per m-tile, rows g and g+8: running max of the raw (unscaled) scores, and this thread's partial row sums.
  float row_max[kV2MTiles][2], row_sum[kV2MTiles][2];
#pragma unroll
  for (int mt = 0; mt < kV2MTiles; ++mt) {
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  for (int j = 0; j < num_kv_tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < num_kv_tiles) {
      const int next = (j + 1) & 1;
      v2_load_kv_tile<kHeadDim, kBlockN>(sK(next), a.k, a.k_row_stride, seq_begin, (j + 1) * kV2BlockN, seqlen, kv_offset,
                                a.head_dim);
      v2_load_kv_tile<kHeadDim, kBlockN>(sV(next), a.v, a.v_row_stride, seq_begin, (j + 1) * kV2BlockN, seqlen, kv_offset,
                                a.head_dim);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // S = Q·Kᵀ, 32 rows × 64 keys per warp. Q's A fragments come from shared memory per 16-dim step (ldmatrix:
    // lane l addresses row (l & 15), columns 8·(l >> 4)); one K ldmatrix.x4 holds the B fragments of two 8-key
    // tiles (lane l: key (nt + (l >> 4))·8 + (l & 7), dims 8·((l >> 3) & 1)) and feeds four MMAs.
    float s_acc[kV2MTiles][kKeyTiles][4];
#pragma unroll
    for (int mt = 0; mt < kV2MTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) s_acc[mt][nt][0] = s_acc[mt][nt][1] = s_acc[mt][nt][2] = s_acc[mt][nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKChunks; ++kk) {
      uint32_t qa[kV2MTiles][4];
#pragma unroll
      for (int mt = 0; mt < kV2MTiles; ++mt)
        ldmatrix_x4(qa[mt], sQ + (warp * 32 + mt * 16 + (lane & 15)) * kStride + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; nt += 2) {
        uint32_t b[4];
        ldmatrix_x4(b, sK(stage) + ((nt + (lane >> 4)) * 8 + (lane & 7)) * kStride + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int mt = 0; mt < kV2MTiles; ++mt) {
          mma_bf16_16816(s_acc[mt][nt], qa[mt], b[0], b[1]);
          mma_bf16_16816(s_acc[mt][nt + 1], qa[mt], b[2], b[3]);
        }
      }
    }

    const int kv0 = j * kV2BlockN;
    const bool needs_mask = kv0 + kV2BlockN > q0 || kv0 + kV2BlockN > seqlen;
    if (needs_mask) {
#pragma unroll
      for (int mt = 0; mt < kV2MTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kKeyTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = kv0 + nt * 8 + 2 * t + (e & 1);
            const int query = q_tok0[mt] + g + (e >> 1) * 8;
            if (key > query || key >= seqlen) s_acc[mt][nt][e] = -INFINITY;
          }
    }

    // Online softmax per row: rescale the running output by exp2((m_old − m_new)·c), accumulate exp2(s·c − m_new·c).
#pragma unroll
    for (int mt = 0; mt < kV2MTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kKeyTiles; ++nt)
          tile_max = fmaxf(tile_max, fmaxf(s_acc[mt][nt][2 * r], s_acc[mt][nt][2 * r + 1]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float new_max = fmaxf(row_max[mt][r], tile_max);
        // A row whose keys are all masked so far keeps max −inf; 0 as the reference then gives p = 0 and a
        // correction of 0 instead of the NaN of (−inf) − (−inf).
        const float ref = new_max == -INFINITY ? 0.f : new_max * scale_log2;
        const float correction = exp2f(fmaf(row_max[mt][r], scale_log2, -ref));
        row_max[mt][r] = new_max;
        float partial = 0.f;
#pragma unroll
        for (int nt = 0; nt < kKeyTiles; ++nt) {
          s_acc[mt][nt][2 * r] = exp2f(fmaf(s_acc[mt][nt][2 * r], scale_log2, -ref));
          s_acc[mt][nt][2 * r + 1] = exp2f(fmaf(s_acc[mt][nt][2 * r + 1], scale_log2, -ref));
          partial += s_acc[mt][nt][2 * r] + s_acc[mt][nt][2 * r + 1];
        }
        row_sum[mt][r] = row_sum[mt][r] * correction + partial;
#pragma unroll
        for (int dt = 0; dt < kDimTiles; ++dt) {
          o_acc[mt][dt][2 * r] *= correction;
          o_acc[mt][dt][2 * r + 1] *= correction;
        }
      }

    // O += P·V: P's A fragment for keys 16kc..16kc+15 is S tiles 2kc and 2kc+1; one transposing V ldmatrix.x4
    // (lane l: key 16kc + 8·(m & 1) + (l & 7), dims 8·(dt + (m >> 1)), m = l >> 3) feeds both m-tiles.
#pragma unroll
    for (int kc = 0; kc < kV2BlockN / 16; ++kc) {
      uint32_t p_frag[kV2MTiles][4];
#pragma unroll
      for (int mt = 0; mt < kV2MTiles; ++mt) {
        p_frag[mt][0] = pack_bf16x2(s_acc[mt][2 * kc][0], s_acc[mt][2 * kc][1]);
        p_frag[mt][1] = pack_bf16x2(s_acc[mt][2 * kc][2], s_acc[mt][2 * kc][3]);
        p_frag[mt][2] = pack_bf16x2(s_acc[mt][2 * kc + 1][0], s_acc[mt][2 * kc + 1][1]);
        p_frag[mt][3] = pack_bf16x2(s_acc[mt][2 * kc + 1][2], s_acc[mt][2 * kc + 1][3]);
      }
      const int m = lane >> 3;
#pragma unroll
      for (int dt = 0; dt < kDimTiles; dt += 2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, sV(stage) + (kc * 16 + (m & 1) * 8 + (lane & 7)) * kStride + (dt + (m >> 1)) * 8);
#pragma unroll
        for (int mt = 0; mt < kV2MTiles; ++mt) {
          mma_bf16_16816(o_acc[mt][dt], p_frag[mt], b[0], b[1]);
          mma_bf16_16816(o_acc[mt][dt + 1], p_frag[mt], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // the next iteration's copy overwrites this stage
  }

#pragma unroll
  for (int mt = 0; mt < kV2MTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[mt][r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int query = q_tok0[mt] + g + r * 8;
      if (query >= seqlen) continue;
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      uint16_t* out_row =
          a.out + (seq_begin + query) * a.out_row_stride + static_cast<int64_t>(q_head[mt]) * a.head_dim;
#pragma unroll
      for (int dt = 0; dt < kDimTiles; ++dt) {
        const int dim = dt * 8 + 2 * t;
        if (dim < a.head_dim)
          *reinterpret_cast<uint32_t*>(out_row + dim) =
              pack_bf16x2(o_acc[mt][dt][2 * r] * inv, o_acc[mt][dt][2 * r + 1] * inv);
      }
    }
}

}  // namespace oscar::kern::detail
