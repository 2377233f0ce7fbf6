#pragma once
// Device code of the causal prefill attention (FlashAttention-2 schedule on mma.sync.m16n8k16 bf16 tensor cores).
//
// Tiling: a block owns 64 query rows of one query head; its 4 warps own 16 rows each, so a row's softmax state
// (running max m, running sum l) never leaves its warp. K/V arrive in 64-key tiles, double-buffered in shared
// memory with cp.async so the next tile's copy overlaps this tile's math. Rows are padded by 8 bf16 (16 bytes):
// the 8 rows an ldmatrix or fragment load touches then start in distinct bank quads, with no conflicts.
//
// Register fragments follow the PTX m16n8k16 layouts: with lane = 4*g + t, an A fragment holds row g and g+8,
// columns 2t,2t+1 (+8); a C fragment holds rows g, g+8, columns 2t, 2t+1. Two adjacent 8-key C tiles of S are
// exactly one A fragment of P for the P·V product, so probabilities go from accumulators to operands without
// touching shared memory.
#include "kernels/attention_prefill/attention_prefill.h"
#include "kernels/common/device_utils.cuh"

namespace oscar::kern::detail {

constexpr int kPrefillBlockM = 64;
constexpr int kPrefillBlockN = 64;
constexpr int kPrefillWarps = 4;
constexpr int kPrefillThreads = kPrefillWarps * 32;

template <int kHeadDim>
struct PrefillSmem {
  static constexpr int kStride = kHeadDim + 8;  // elements per shared row (16 bytes of padding)
  static constexpr int kTileElems = kPrefillBlockM * kStride;
  // Q tile, then two stages of (K tile, V tile).
  static constexpr int kBytes = (kTileElems + 4 * kPrefillBlockN * kStride) * 2;
};

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo: the lower column index
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Copies rows [row0, row0 + kRows) of one head into a padded shared tile; rows past the sequence end and
// columns past head_dim are zero-filled (zeros contribute nothing to q·k or to P·V).
template <int kHeadDim, int kRows>
__device__ __forceinline__ void load_tile_async(uint16_t* smem, const uint16_t* base, int64_t row_stride,
                                                int64_t seq_begin, int row0, int seqlen, int64_t head_offset,
                                                int head_dim) {
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kStride = PrefillSmem<kHeadDim>::kStride;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kPrefillThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = row0 + r < seqlen && c * 8 < head_dim;
    const uint16_t* src = valid ? base + (seq_begin + row0 + r) * row_stride + head_offset + c * 8 : base;
    cp_async_16(smem + r * kStride + c * 8, src, valid);
  }
}

template <int kHeadDim>
__global__ void __launch_bounds__(kPrefillThreads)
    attention_prefill_kernel(PrefillAttentionArgs a, float scale_log2) {
  constexpr int kStride = PrefillSmem<kHeadDim>::kStride;
  constexpr int kTile = PrefillSmem<kHeadDim>::kTileElems;
  constexpr int kKChunks = kHeadDim / 16;  // k-steps of Q·Kᵀ
  constexpr int kDimTiles = kHeadDim / 8;  // n-tiles of P·V
  constexpr int kKeyTiles = kPrefillBlockN / 8;
  static_assert(kKChunks % 2 == 0 && kDimTiles % 2 == 0, "ldmatrix.x4 loads pairs of fragments");

  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;
  // Stage s holds K at sK(s) and V right after it. Computed, not indexed from an array: a runtime-indexed
  // pointer array would live in local memory.
  constexpr int kStageElems = 2 * kPrefillBlockN * kStride;
  auto sK = [&](int stage) { return smem + kTile + stage * kStageElems; };
  auto sV = [&](int stage) { return smem + kTile + stage * kStageElems + kPrefillBlockN * kStride; };

  // Largest tiles (most keys) are scheduled first so the tail of the grid is short ones.
  const int q_tile = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y;
  const int seq = blockIdx.z;
  const int64_t seq_begin = a.cu_seqlens[seq];
  const int seqlen = a.cu_seqlens[seq + 1] - static_cast<int>(seq_begin);
  const int q0 = q_tile * kPrefillBlockM;
  if (q0 >= seqlen) return;
  const int kv_head = head / (a.num_heads / a.num_kv_heads);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;

  const int kv_end = min(q0 + kPrefillBlockM, seqlen);  // causal: no key after the tile's last query
  const int num_kv_tiles = (kv_end + kPrefillBlockN - 1) / kPrefillBlockN;

  load_tile_async<kHeadDim, kPrefillBlockM>(sQ, a.q, a.q_row_stride, seq_begin, q0, seqlen,
                                            static_cast<int64_t>(head) * a.head_dim, a.head_dim);
  load_tile_async<kHeadDim, kPrefillBlockN>(sK(0), a.k, a.k_row_stride, seq_begin, 0, seqlen,
                                            static_cast<int64_t>(kv_head) * a.head_dim, a.head_dim);
  load_tile_async<kHeadDim, kPrefillBlockN>(sV(0), a.v, a.v_row_stride, seq_begin, 0, seqlen,
                                            static_cast<int64_t>(kv_head) * a.head_dim, a.head_dim);
  cp_async_commit();

  uint32_t q_frag[kKChunks][4];
  float o_acc[kDimTiles][4];
#pragma unroll
  for (int i = 0; i < kDimTiles; ++i) o_acc[i][0] = o_acc[i][1] = o_acc[i][2] = o_acc[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g+8 of this warp, in log2 units
  float row_sum[2] = {0.f, 0.f};              // this thread's partial sums; the quad is reduced at the end
  const int q_row_lo = q0 + warp * 16 + g;    // sequence-relative query index of row g

  for (int j = 0; j < num_kv_tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < num_kv_tiles) {
      const int next = (j + 1) & 1;
      load_tile_async<kHeadDim, kPrefillBlockN>(sK(next), a.k, a.k_row_stride, seq_begin, (j + 1) * kPrefillBlockN,
                                                seqlen, static_cast<int64_t>(kv_head) * a.head_dim, a.head_dim);
      load_tile_async<kHeadDim, kPrefillBlockN>(sV(next), a.v, a.v_row_stride, seq_begin, (j + 1) * kPrefillBlockN,
                                                seqlen, static_cast<int64_t>(kv_head) * a.head_dim, a.head_dim);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    if (j == 0) {
      const uint16_t* q_lo = sQ + (warp * 16 + g) * kStride;
      const uint16_t* q_hi = q_lo + 8 * kStride;
#pragma unroll
      for (int kk = 0; kk < kKChunks; ++kk) {
        q_frag[kk][0] = *reinterpret_cast<const uint32_t*>(q_lo + kk * 16 + 2 * t);
        q_frag[kk][1] = *reinterpret_cast<const uint32_t*>(q_hi + kk * 16 + 2 * t);
        q_frag[kk][2] = *reinterpret_cast<const uint32_t*>(q_lo + kk * 16 + 8 + 2 * t);
        q_frag[kk][3] = *reinterpret_cast<const uint32_t*>(q_hi + kk * 16 + 8 + 2 * t);
      }
    }

    // S = Q·Kᵀ for this warp's 16 rows × 64 keys. ldmatrix (non-transposed) of K rows gives B fragments
    // directly: lane l supplies the address of key row (l & 7) of matrix (l >> 3) = dims kk*16 + 8*(l >> 3).
    float s_acc[kKeyTiles][4];
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) {
      s_acc[nt][0] = s_acc[nt][1] = s_acc[nt][2] = s_acc[nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kKChunks; kk += 2) {
        uint32_t b[4];
        ldmatrix_x4(b, sK(stage) + (nt * 8 + (lane & 7)) * kStride + kk * 16 + (lane >> 3) * 8);
        mma_bf16_16816(s_acc[nt], q_frag[kk], b[0], b[1]);
        mma_bf16_16816(s_acc[nt], q_frag[kk + 1], b[2], b[3]);
      }
    }

    // Causal / length mask, needed only on the diagonal tile and the tile holding the sequence end.
    const int kv0 = j * kPrefillBlockN;
    const bool needs_mask = kv0 + kPrefillBlockN > q0 || kv0 + kPrefillBlockN > seqlen;
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float s = s_acc[nt][e] * scale_log2;
        if (needs_mask) {
          const int key = kv0 + nt * 8 + 2 * t + (e & 1);
          const int query = q_row_lo + (e >> 1) * 8;
          if (key > query || key >= seqlen) s = -INFINITY;
        }
        s_acc[nt][e] = s;
      }

    // Online softmax: rescale the running output by exp2(m_old - m_new) and accumulate exp2(s - m_new).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) tile_max = fmaxf(tile_max, fmaxf(s_acc[nt][2 * r], s_acc[nt][2 * r + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float new_max = fmaxf(row_max[r], tile_max);
      // A row with every key masked so far keeps max -inf; using 0 as the reference then yields p = 0 and a
      // correction of 0 instead of the NaN of (-inf) - (-inf).
      const float ref = new_max == -INFINITY ? 0.f : new_max;
      const float correction = exp2f(row_max[r] - ref);
      row_max[r] = new_max;
      float partial = 0.f;
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
        s_acc[nt][2 * r] = exp2f(s_acc[nt][2 * r] - ref);
        s_acc[nt][2 * r + 1] = exp2f(s_acc[nt][2 * r + 1] - ref);
        partial += s_acc[nt][2 * r] + s_acc[nt][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * correction + partial;
#pragma unroll
      for (int dt = 0; dt < kDimTiles; ++dt) {
        o_acc[dt][2 * r] *= correction;
        o_acc[dt][2 * r + 1] *= correction;
      }
    }

    // O += P·V. P's A fragment for keys 16kc..16kc+15 is C tiles 2kc and 2kc+1. V's B fragments come from a
    // transposing ldmatrix of V rows (keys): matrix m of lane l covers keys 16kc + 8*(m & 1) + (l & 7) and
    // dims 8*(dt + (m >> 1)), giving B fragments for the dim tiles dt and dt + 1 in one instruction.
#pragma unroll
    for (int kc = 0; kc < kPrefillBlockN / 16; ++kc) {
      uint32_t p_frag[4];
      p_frag[0] = pack_bf16x2(s_acc[2 * kc][0], s_acc[2 * kc][1]);
      p_frag[1] = pack_bf16x2(s_acc[2 * kc][2], s_acc[2 * kc][3]);
      p_frag[2] = pack_bf16x2(s_acc[2 * kc + 1][0], s_acc[2 * kc + 1][1]);
      p_frag[3] = pack_bf16x2(s_acc[2 * kc + 1][2], s_acc[2 * kc + 1][3]);
      const int m = lane >> 3;
#pragma unroll
      for (int dt = 0; dt < kDimTiles; dt += 2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, sV(stage) + (kc * 16 + (m & 1) * 8 + (lane & 7)) * kStride + (dt + (m >> 1)) * 8);
        mma_bf16_16816(o_acc[dt], p_frag, b[0], b[1]);
        mma_bf16_16816(o_acc[dt + 1], p_frag, b[2], b[3]);
      }
    }
    __syncthreads();  // the next iteration's copy overwrites this stage
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int query = q_row_lo + r * 8;
    if (query >= seqlen) continue;
    const float inv = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
    uint16_t* out_row = a.out + (seq_begin + query) * a.out_row_stride + static_cast<int64_t>(head) * a.head_dim;
#pragma unroll
    for (int dt = 0; dt < kDimTiles; ++dt) {
      const int dim = dt * 8 + 2 * t;
      if (dim < a.head_dim)
        *reinterpret_cast<uint32_t*>(out_row + dim) = pack_bf16x2(o_acc[dt][2 * r] * inv, o_acc[dt][2 * r + 1] * inv);
    }
  }
}

}  // namespace oscar::kern::detail
