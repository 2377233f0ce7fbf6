#pragma once
// Device code of prefill attention v3: v2's block shape (128 rows = tokens × packed GQA heads, 4 warps × 32 rows,
// 64-key K/V tiles double-buffered through cp.async) with three changes aimed at the 8×2048 forward, where v2 ran at
// ~198 TFLOP/s with 100 B of register spills per thread in the inner loop:
//
// 1. P is packed to bf16 pairs as soon as each row's exponentials are formed (v2 kept all 64 fp32 scores alive
//    until P·V, 32 more registers at the kernel's peak).
// 2. K and V of a tile are separate cp.async groups: Q·Kᵀ starts when K has landed, V keeps streaming under it.
//    At 2K tokens a block sees ~16 tiles on average, so the first tile's exposed latency is a visible share.
//    The prefetch of tile j+1 is issued after the first barrier of iteration j, which also retires v2's
//    end-of-iteration barrier (still two per tile).
// 3. The MMAs are non-volatile asm, so the compiler may interleave them with the ldmatrix loads and the softmax
//    (mma.sync has no side effects beyond its register outputs).
//
// Numerics are v2's exactly: same fp32 scores, same exp2 with the folded scale, same bf16 rounding of P, same
// order of accumulation per tile; outputs are expected bit-identical to v2 (the test checks it).
#include "kernels/attention_prefill/attention_prefill_v2.cuh"

namespace oscar::kern::detail {

// K/V tile loader with the per-thread source pointer formed once per block: a thread always copies chunk
// (tid % chunks) of rows tid / chunks + k·rows_per_pass, so only the tile's first row changes between tiles.
// (v2's loader recomputes a 64-bit address per copy, and the compiler kept several of them live across the loop.)
template <int kHeadDim, int kBlockN>
struct V3KvLoader {
  static constexpr int kChunks = kHeadDim / 8;
  static constexpr int kRowsPerPass = kV2Threads / kChunks;
  static_assert(kV2Threads % kChunks == 0 && kBlockN % kRowsPerPass == 0, "whole rows per pass");
  const uint16_t* src;  // row tid / kChunks of the sequence, this thread's chunk of the KV head
  int64_t row_stride;
  int row, smem_offset;
  bool col_valid;

  __device__ __forceinline__ V3KvLoader(const uint16_t* base, int64_t stride, int64_t seq_begin, int64_t head_offset,
                                        int head_dim) {
    const int c = threadIdx.x % kChunks;
    row = threadIdx.x / kChunks;
    row_stride = stride;
    col_valid = c * 8 < head_dim;
    src = base + (seq_begin + row) * stride + head_offset + c * 8;
    smem_offset = row * PrefillV2Smem<kHeadDim, kBlockN>::kStride + c * 8;
  }
  __device__ __forceinline__ void load(uint16_t* smem, int row0, int seqlen, const uint16_t* fallback) const {
#pragma unroll
    for (int k = 0; k < kBlockN / kRowsPerPass; ++k) {
      const int r = row0 + row + k * kRowsPerPass;
      const bool valid = col_valid && r < seqlen;
      const uint16_t* p = valid ? src + static_cast<int64_t>(row0 + k * kRowsPerPass) * row_stride : fallback;
      cp_async_16(smem + smem_offset + k * kRowsPerPass * PrefillV2Smem<kHeadDim, kBlockN>::kStride, p, valid);
    }
  }
};

__device__ __forceinline__ void mma_bf16_16816_sched(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                     uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int kHeadDim, int kBlockN>
__global__ void __launch_bounds__(kV2Threads, 2)
    attention_prefill_v3_kernel(PrefillAttentionArgs a, float scale_log2, int pack, int num_q_tiles) {
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
  // Two cp.async groups per tile, K then V, so Q·Kᵀ of a tile waits only for its K (and the first tile's for Q+K).
  const V3KvLoader<kHeadDim, kBlockN> k_loader(a.k, a.k_row_stride, seq_begin, kv_offset, a.head_dim);
  const V3KvLoader<kHeadDim, kBlockN> v_loader(a.v, a.v_row_stride, seq_begin, kv_offset, a.head_dim);
  k_loader.load(sK(0), 0, seqlen, a.k);
  cp_async_commit();
  v_loader.load(sV(0), 0, seqlen, a.v);
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
    // Committed so far: ..., K_j, V_j. Waiting for K_j leaves V_j in flight. After the barrier every warp has
    // finished P·V of tile j−1, so the other stage (K_{j−1}, V_{j−1}) is free for tile j+1: this barrier doubles
    // as v2's end-of-iteration one.
    cp_async_wait<1>();
    __syncthreads();
    const bool prefetch = j + 1 < num_kv_tiles;
    if (prefetch) {
      const int next = (j + 1) & 1;
      k_loader.load(sK(next), (j + 1) * kV2BlockN, seqlen, a.k);
      cp_async_commit();
      v_loader.load(sV(next), (j + 1) * kV2BlockN, seqlen, a.v);
      cp_async_commit();
    }

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
          mma_bf16_16816_sched(s_acc[mt][nt], qa[mt], b[0], b[1]);
          mma_bf16_16816_sched(s_acc[mt][nt + 1], qa[mt], b[2], b[3]);
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

    // P as packed bf16 pairs, filled row by row as the exponentials are formed: the fp32 scores die right away,
    // which is what lets the 64-key tile fit without v2's spills. Pairs are (row, keys 2t, 2t+1), exactly the
    // halves of the A-fragment registers, so P·V reads p_pack directly.
    uint32_t p_pack[kV2MTiles][kKeyTiles][2];
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
          const float p0 = exp2f(fmaf(s_acc[mt][nt][2 * r], scale_log2, -ref));
          const float p1 = exp2f(fmaf(s_acc[mt][nt][2 * r + 1], scale_log2, -ref));
          partial += p0 + p1;
          p_pack[mt][nt][r] = pack_bf16x2(p0, p1);
        }
        row_sum[mt][r] = row_sum[mt][r] * correction + partial;
#pragma unroll
        for (int dt = 0; dt < kDimTiles; ++dt) {
          o_acc[mt][dt][2 * r] *= correction;
          o_acc[mt][dt][2 * r + 1] *= correction;
        }
      }

    // V_j: committed after it are K_{j+1} and V_{j+1} when this iteration prefetched, nothing otherwise.
    if (prefetch)
      cp_async_wait<2>();
    else
      cp_async_wait<0>();
    __syncthreads();

    // O += P·V: P's A fragment for keys 16kc..16kc+15 is S tiles 2kc and 2kc+1; one transposing V ldmatrix.x4
    // (lane l: key 16kc + 8·(m & 1) + (l & 7), dims 8·(dt + (m >> 1)), m = l >> 3) feeds both m-tiles.
#pragma unroll
    for (int kc = 0; kc < kV2BlockN / 16; ++kc) {
      uint32_t p_frag[kV2MTiles][4];
#pragma unroll
      for (int mt = 0; mt < kV2MTiles; ++mt) {
        p_frag[mt][0] = p_pack[mt][2 * kc][0];
        p_frag[mt][1] = p_pack[mt][2 * kc][1];
        p_frag[mt][2] = p_pack[mt][2 * kc + 1][0];
        p_frag[mt][3] = p_pack[mt][2 * kc + 1][1];
      }
      const int m = lane >> 3;
#pragma unroll
      for (int dt = 0; dt < kDimTiles; dt += 2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, sV(stage) + (kc * 16 + (m & 1) * 8 + (lane & 7)) * kStride + (dt + (m >> 1)) * 8);
#pragma unroll
        for (int mt = 0; mt < kV2MTiles; ++mt) {
          mma_bf16_16816_sched(o_acc[mt][dt], p_frag[mt], b[0], b[1]);
          mma_bf16_16816_sched(o_acc[mt][dt + 1], p_frag[mt], b[2], b[3]);
        }
      }
    }
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
