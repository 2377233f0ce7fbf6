#pragma once
// Device code of prefill attention v4: Hopper warpgroup MMAs (wgmma, sm_90a; kernels/common/wgmma.cuh) in v2's
// block shape. v2/v3 issue mma.sync, whose operands come through the SM's shared-memory port as ldmatrix
// fragments: at head_dim 128 that port, not the tensor cores, bounds them (~270 TFLOP/s causal at 32K, ncu: the
// shared-memory pipe busiest). A wgmma reads its shared-memory operands directly.
//
// Block: 128 query rows (tokens × the GQA pack, as v2: row r is token q0 + r % tokens of head head0 + r / tokens)
// and two warpgroups, warpgroup w owning rows 64w..64w+63; head_dim 128 only (the 7-8B shapes; others run v2).
// Shared memory, all 128B-swizzled regions of 64 bf16 columns (1024-byte aligned):
//   Q   [128 rows][128]  as two column regions of 16 KB,
//   K_s [N keys][128]    as two column regions of N·128 bytes, per stage (N = 64 or 128, 2 or 3 stages),
//   V_s [N keys][128]    likewise: the P·V operand B is V with N = dims contiguous (MN-major, transposed B).
// Per N-key tile: S = Q·Kᵀ (8 wgmma m64nNk16), the mask on tiles crossing the diagonal or the sequence end, v3's
// online softmax on the accumulator fragment (same layout as mma.sync's, per warp 16 rows), P to bf16 A
// fragments in registers, O += P·V (N/16 wgmma m64n128k16). v4 waits for each GEMM before touching its
// registers; v5 and v6 overlap them with the softmax (V4Config below says which variant does what).
// Numerics: fp32 scores and accumulation, exp2 (SFU, ftz) with the folded scale, bf16 P — v3's arithmetic per
// element; the tensor cores' summation order differs, so outputs match v2 within bf16 rounding, not bit for bit.
#include <cuda.h>  // CUtensorMap (v7's TMA descriptors; the driver symbol is fetched at run time, no libcuda link)

#include "kernels/attention_prefill/attention_prefill_v2.cuh"
#include "kernels/common/tma.cuh"
#include "kernels/common/wgmma.cuh"

namespace oscar::kern::detail {

inline constexpr int kV4Threads = 256;  // two warpgroups
inline constexpr int kV4BlockM = 128;
inline constexpr int kV4HeadDim = 128;
inline constexpr uint32_t kV4QRegion = kV4BlockM * 128;  // bytes of one 64-column region of Q
inline constexpr uint32_t kV4QBytes = 2 * kV4QRegion;
static_assert(kV4BlockM == kV2BlockM, "v4 uses v2's grid (rows = tokens x pack)");

// The wgmma kernel family, one body (attention_prefill_v4_kernel<kVersion>):
//   v4: Q in shared memory, 2 K/V stages of 64 keys, every GEMM waited for before its registers are touched.
//   v5: Q in registers (the A operand of S = Q·Kᵀ), 3 stages of 64 keys, FA3's intra-warpgroup overlap.
//   v6: v5's overlap with 128-key tiles: the per-tile costs (the O rescale, 64 multiplies per thread; the row-max
//       shuffles; the barrier and the waits) are paid once per 128 keys instead of per 64. The S accumulator
//       doubles to 64 registers, so Q goes back to shared memory (Q in registers as well would not fit 255).
//   v7: v6 with its K/V tiles loaded by TMA (cp.async.bulk.tensor, 128B swizzle: the layout the wgmmas read),
//       issued by thread 0 on full/empty mbarriers. The other threads' instruction stream loses the per-tile
//       cp.async address arithmetic (16 copies per thread per tile), and the block-wide barrier per tile becomes
//       thread 0's wait for the stage it refills. No separate producer warp: a ninth warp would put 3 warps on one
//       of the SM's four register files and cap every thread at 168 registers (v6 needs 188) unless setmaxnreg
//       moved registers between warpgroups.
//   v8: v7 with FA3's inter-warpgroup ping-pong. Both warpgroups of v7 issue their MMAs and run their softmax at
//       the same time, so the tensor cores idle while both compute exponentials. In v8 they take turns through two
//       named barriers: a warpgroup issues tile j's S and P·V only after the other has issued its own, so one's
//       softmax overlaps the other's GEMMs. Same instructions per warpgroup as v7, only their order in time moves.
//   v10: v7 with lazy rescaling (FA4's): the running max a row's exponentials are taken against moves only when a
//       tile's max exceeds it by more than 8 in log2 units (kV4RescaleThreshold: a factor 2^8), decided per warp
//       by a vote; then O's 64 multiplies per thread, the two correction exponentials and the row-sum rescale run,
//       otherwise they are skipped. Past the first tiles of a long row the max rarely moves that much, so most
//       tiles skip them. The result is the same function: every exponential and O share one reference per row
//       until the final division; P may reach 2^8 (fp32 sums, bf16 P keep their relative precision). At 1 x 32K
//       the GPU sits at its power cap (docs/results.md "The 1 × 32K prefill is power-bound"): fewer instructions
//       per tile is the lever there. (A v9, v7 with Q in registers, ran 2 % slower at the same power; removed.)
//   v11: v10 with the softmax row sums on the tensor cores: each P·V group also multiplies P by an 8-column block
//       of ones (8 wgmma m64n8k16, 1/16 of P·V's MACs) into a 4-register accumulator that the rescale scales with O.
//       That replaces 64 FADDs per thread and tile and the final shuffles (every column of the product is the whole
//       row's sum), and the sum is then of the bf16 P that P·V multiplied, not of the fp32 exponentials.
//   v12: v11 on clusters of two CTAs that share every K/V tile: the CTAs take half of a GQA group each (pack =
//       group / 2, so the pair has the same tokens, sequence and KV head, and so the same tiles), and each tile is
//       loaded once from L2 for both, by multicast TMA (rank 0 copies K, rank 1 copies V, each into both CTAs).
//       Half the L2 -> SM bytes of v11 (4.2 TB/s at 1 x 32K): energy, at the power cap. A stage is refilled once
//       the warps of both CTAs are done with it (each warp arrives on its own CTA's and the peer's empty barrier).
//   v13: v11 with the wgmma descriptors made once: per tile and K step v11 rebuilds each of its 24 descriptors from
//       the address (add, mask, shift, or, move: ~5 uniform instructions each, ~80 per tile in the SASS); v13 adds a
//       compile-time offset (plus the stage's) to the low word of a descriptor made before the loop. Exact: the
//       14-bit address field holds (address >> 4) of any shared-memory byte (< 256 KB), so it never carries.
//   (v14 = v12 + v13, v15 = v13 deciding the lazy rescale on P's packed bf16x2 maximum, v16 = v12 + v13 + v15: measured
//   on 2026-12-07 and removed, docs/results.md "Descriptors made once (v13) as Auto, …".)
template <int kVersion>
struct V4Config {
  static_assert(kVersion >= 4 && kVersion <= 13 && kVersion != 9, "prefill wgmma family: v4 .. v8, v10 .. v13");
  static constexpr bool kQInRegisters = kVersion == 5;
  static constexpr bool kOverlap = kVersion >= 5;
  static constexpr bool kTma = kVersion >= 7;
  static constexpr bool kPingPong = kVersion == 8;
  static constexpr bool kLazyRescale = kVersion >= 10;
  static constexpr bool kRowSumMma = kVersion >= 11;
  static constexpr bool kCluster = kVersion == 12;  // 2-CTA clusters
  static constexpr bool kDescBase = kVersion == 13;
  // empty[s]' arrivals: every thread (v7-v11); one per warp of both CTAs (v12, two of them remote).
  static constexpr uint32_t kEmptyArrivals = kCluster ? 2 * kV4Threads / 32 : kV4Threads;
  static constexpr int kStages = kVersion == 4 ? 2 : 3;
  static constexpr int kBlockN = kVersion >= 6 ? 128 : 64;
  static constexpr uint32_t kKvRegion = kBlockN * 128;  // bytes of one 64-column region of a K or V tile
  static constexpr uint32_t kKvBytes = 2 * kKvRegion;
  // v11: one 1024-byte SW128 region of ones (8 rows of 64), the B operand of the row-sum wgmmas.
  static constexpr uint32_t kOnesOffset = (kQInRegisters ? 0 : kV4QBytes) + kStages * 2 * kKvBytes;
  static constexpr uint32_t kBarrierOffset = kOnesOffset + (kRowSumMma ? 1024 : 0);
  // + full[kStages] and empty[kStages] mbarriers (v7), + the slack that aligns the start to 1024 bytes.
  static constexpr uint32_t kSmemBytes = kBarrierOffset + (kTma ? 2 * kStages * 8 : 0) + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "over the 227 KB a Hopper block may opt in to");
};

// v7's TMA descriptors of K and V: 2-D [T rows][kv heads × 128 columns] bf16, box 64 columns × kBlockN rows, 128B
// swizzle. Unused (zero) for v4-v6.
struct PrefillTmaMaps {
  CUtensorMap k, v;
};

// exp2 on the SFU without exp2f's range handling: the arguments are <= 0 (scores minus the running max; v10: <= 8),
// and a denormal result flushed to zero is below bf16 P's resolution anyway. About 2 instructions per element fewer.
// v10: how far (log2 units) a tile's max may exceed the reference max before O is rescaled: P <= 2^8.
inline constexpr float kV4RescaleThreshold = 8.f;

__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// v8's turn-taking: warpgroup w waits on barrier kV4TurnBarrier + w before issuing its MMAs and, once they are
// issued, arrives on the other's. Ids 1 and 2 (0 is __syncthreads); both warpgroups count (256 threads).
inline constexpr int kV4TurnBarrier = 1;
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// 16-byte chunk `chunk` (0..15) of row `row` of a 128-column bf16 tile into its swizzled place.
__device__ __forceinline__ uint32_t v4_chunk_offset(uint32_t region_bytes, int row, int chunk) {
  return (chunk >> 3) * region_bytes + detail::sw128_offset(row, (chunk & 7) * 8);
}

// v4 / v6 (Q in shared memory): with Q and K both in shared memory each m64nNk16 reads as many bytes per MAC as
// the shared-memory port delivers while the tensor cores run at peak, and both warpgroups read their Q rows again
// for every tile.
// v5 (Q in registers, 32 per thread, loaded once): S reads only K.
// v5 / v6 (kOverlap): FA3's intra-warpgroup overlap on a 3-stage K/V ring. While P_j·V_j and
// S_{j+1} = Q·K_{j+1}ᵀ run on the tensor cores, the warpgroup computes tile j+1's max, exponentials and P; only the
// rescale of O by the new max waits for P_j·V_j. The third stage is what lets tile j+2's load start while tile j's V
// is still being read (with two stages the load could only start once P_j·V_j is done, leaving it no time).
template <int kVersion>
__global__ void __launch_bounds__(kV4Threads, 1)
    attention_prefill_v4_kernel(PrefillAttentionArgs a, float scale_log2, int pack, int num_q_tiles,
                                const __grid_constant__ PrefillTmaMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = V4Config<kVersion>;
  constexpr int kStages = Cfg::kStages, kBlockN = Cfg::kBlockN;
  constexpr bool kQInRegisters = Cfg::kQInRegisters;
  constexpr uint32_t kKvRegion = Cfg::kKvRegion, kKvBytes = Cfg::kKvBytes;
  constexpr int kSRegs = kBlockN / 2;     // S accumulator m64nN: N/8 n-blocks × 4 per thread
  constexpr int kPSteps = kBlockN / 16;   // K steps of P·V
  extern __shared__ uint8_t smem_raw[];
  // Swizzle atoms must sit on 1024-byte boundaries (the hardware swizzles address bits 4-6 with 7-9).
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint8_t* sQ = smem;
  constexpr uint32_t kKvBase = kQInRegisters ? 0 : kV4QBytes;
  auto sK = [&](int stage) { return smem + kKvBase + stage * 2 * kKvBytes; };
  auto sV = [&](int stage) { return smem + kKvBase + stage * 2 * kKvBytes + kKvBytes; };

  const PrefillBlock blk = PrefillBlock::locate(a, pack, num_q_tiles);
  if (blk.q0 >= blk.seqlen) return;
  const int head0 = blk.head0, tokens = blk.tokens, seqlen = blk.seqlen, q0 = blk.q0, kv_head = blk.kv_head;
  const int64_t seq_begin = blk.seq_begin;
  const int64_t kv_offset = static_cast<int64_t>(kv_head) * kV4HeadDim;
  const int tid = threadIdx.x;
  const int wg = tid >> 7;                 // warpgroup: rows 64wg..64wg+63
  const int warp = (tid >> 5) & 3;         // warp in the warpgroup: rows +16warp..+16warp+15
  const int lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int kv_end = min(q0 + tokens, seqlen);  // causal: no key after the block's last query
  const int num_kv_tiles = (kv_end + kBlockN - 1) / kBlockN;

  // v7: stage s is full[s] (thread 0's expect_tx, completed by the TMA bytes) and empty[s] (every thread arrives
  // once it is done reading the stage). Use n of a stage completes phase n: a waiter asks for parity n & 1.
  uint64_t* full_bar = reinterpret_cast<uint64_t*>(smem + Cfg::kBarrierOffset);
  const uint32_t cluster_rank = Cfg::kCluster ? tma::cluster_ctarank() : 0;
  uint64_t* empty_bar = full_bar + kStages;
  if constexpr (Cfg::kTma) {
    if (tid == 0) {
      for (int s = 0; s < kStages; ++s) {
        tma::mbarrier_init(full_bar + s, 1);
        tma::mbarrier_init(empty_bar + s, Cfg::kEmptyArrivals);
      }
      tma::fence_mbarrier_init();
    }
    if constexpr (Cfg::kCluster)
      tma::cluster_sync();  // the peer's barriers exist before this CTA's copies and arrivals reach them
    else
      __syncthreads();
  }
  // Thread 0: tile j's K and V (two 64-column boxes each) into stage j % kStages.
  auto tma_tile = [&](int j) {
    const int s = j % kStages;
    const int col = kv_head * kV4HeadDim, row = static_cast<int>(seq_begin) + j * kBlockN;
    tma::mbarrier_arrive_expect_tx(full_bar + s, 2 * kKvBytes);  // v12: half from this CTA's copies, half the peer's
    if constexpr (Cfg::kCluster) {
      uint8_t* dst = cluster_rank == 0 ? sK(s) : sV(s);
      const void* map = cluster_rank == 0 ? static_cast<const void*>(&maps.k) : static_cast<const void*>(&maps.v);
      tma::load_2d_multicast(dst, map, col, row, full_bar + s, 0x3);
      tma::load_2d_multicast(dst + kKvRegion, map, col + 64, row, full_bar + s, 0x3);
    } else {
      tma::load_2d(sK(s), &maps.k, col, row, full_bar + s);
      tma::load_2d(sK(s) + kKvRegion, &maps.k, col + 64, row, full_bar + s);
      tma::load_2d(sV(s), &maps.v, col, row, full_bar + s);
      tma::load_2d(sV(s) + kKvRegion, &maps.v, col + 64, row, full_bar + s);
    }
  };

  // v11: bf16 1.0 in every element of the ones region (no swizzle to respect); made visible to the wgmmas by the
  // async-proxy fence and barrier before the first MMA.
  if constexpr (Cfg::kRowSumMma) reinterpret_cast<uint32_t*>(smem + Cfg::kOnesOffset)[tid] = 0x3F803F80u;
  static_assert(!Cfg::kRowSumMma || kV4Threads * 4 == 1024, "one word of ones per thread");
  // Q (v4): 128 rows × 16 chunks into shared memory, zero-filled past the sequence.
  for (int idx = tid; idx < (kQInRegisters ? 0 : kV4BlockM * 16); idx += kV4Threads) {
    const int r = idx >> 4, ch = idx & 15;
    const int tok = q0 + r % tokens, head = head0 + r / tokens;
    const bool valid = tok < seqlen;
    const uint16_t* src =
        valid ? a.q + (seq_begin + tok) * a.q_row_stride + static_cast<int64_t>(head) * kV4HeadDim + ch * 8 : a.q;
    cp_async_16(sQ + v4_chunk_offset(kV4QRegion, r, ch), src, valid);
  }
  // K/V tile loader: kBlockN keys × 16 chunks, kBlockN / 16 per thread.
  auto load_kv = [&](uint8_t* dst, const uint16_t* base, int64_t stride, int key0) {
#pragma unroll
    for (int i = 0; i < kBlockN * 16 / kV4Threads; ++i) {
      const int idx = tid + i * kV4Threads;
      const int r = idx >> 4, ch = idx & 15;
      const bool valid = key0 + r < seqlen;
      const uint16_t* src = valid ? base + (seq_begin + key0 + r) * stride + kv_offset + ch * 8 : base;
      cp_async_16(dst + v4_chunk_offset(kKvRegion, r, ch), src, valid);
    }
  };
  auto load_tile = [&](int j) {
    load_kv(sK(j % kStages), a.k, a.k_row_stride, j * kBlockN);
    load_kv(sV(j % kStages), a.v, a.v_row_stride, j * kBlockN);
  };
  if constexpr (!Cfg::kTma) load_tile(0);
  cp_async_commit();  // group: Q + tile 0 (v7: Q alone)

  // This warp's 16 rows: block rows 64wg + 16warp + [0, 16), one head (tokens is a multiple of 16).
  const int row0 = 64 * wg + 16 * warp;
  const int q_tok0 = q0 + row0 % tokens;
  const int q_head = head0 + row0 / tokens;

  // Q (v5): this warp's rows g, g+8 as the A fragments of the 8 K steps of S (dims 16ks + 2t, +1 and +8), zero
  // past the sequence.
  uint32_t qa[kQInRegisters ? 8 : 1][4];
  if constexpr (kQInRegisters) {
    const uint16_t* qrow[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int tok = q_tok0 + g + 8 * r;
      qrow[r] = tok < seqlen ? a.q + (seq_begin + tok) * a.q_row_stride + static_cast<int64_t>(q_head) * kV4HeadDim
                             : nullptr;
    }
#pragma unroll
    for (int ks = 0; ks < 8; ++ks)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint16_t* row = qrow[i & 1];
        qa[ks][i] = row ? *reinterpret_cast<const uint32_t*>(row + 16 * ks + 8 * (i >> 1) + 2 * t) : 0u;
      }
  }

  float o[64];  // m64n128 accumulator: n-block j (dims 8j..8j+7): o[4j..4j+3] = rows g, g+8 × dims 8j+2t, +1
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  // v11: P·ones, m64n8: l[0], l[1] = row g's sum (columns 2t, 2t+1, equal), l[2], l[3] = row g+8's.
  float l[4] = {0.f, 0.f, 0.f, 0.f};

  // S = Q·Kᵀ of tile j: 8 K steps of 16 dims, A = this warpgroup's 64 Q rows, B = the tile's keys (both K-major).
  // Issued and committed as one group; the caller waits.
  // v13: the descriptors of stage 0's K and V and of this warpgroup's Q rows, made once; a K step's is one of these
  // plus its offset in 16-byte units (stage * kStageUnits + a compile-time constant).
  constexpr uint32_t kStageUnits = 2 * kKvBytes >> 4;
  const uint64_t desc_k0 = detail::wgmma_desc_sw128(sK(0), 16, 1024);
  const uint64_t desc_v0 = detail::wgmma_desc_sw128(sV(0), kKvRegion, 1024);
  const uint64_t desc_q0 = detail::wgmma_desc_sw128(sQ + 64 * wg * 128, 16, 1024);
  // v11: every K step of the row-sum wgmmas reads the same 16 columns of ones.
  const uint64_t desc_ones = detail::wgmma_desc_sw128(smem + Cfg::kOnesOffset, 16, 1024);
  auto issue_s = [&](float (&s)[kSRegs], int j) {
    detail::wgmma_fence();
    const uint32_t stage_units = (j % kStages) * kStageUnits;
#pragma unroll
    for (int ks = 0; ks < kV4HeadDim / 16; ++ks) {
      const uint32_t col = (ks & 3) * 32;  // 16 dims = 32 bytes into the region
      const uint64_t db =
          Cfg::kDescBase
              ? detail::wgmma_desc_add(desc_k0, stage_units + (((ks >> 2) * kKvRegion + col) >> 4))
              : detail::wgmma_desc_sw128(sK(j % kStages) + (ks >> 2) * kKvRegion + col, 16, 1024);
      if constexpr (kQInRegisters) {
        if constexpr (kBlockN == 128)
          detail::wgmma_m64n128k16_rs<false>(s, qa[ks], db, ks > 0);
        else
          detail::wgmma_m64n64k16_rs(s, qa[ks], db, ks > 0);
      } else {
        const uint64_t da =
            Cfg::kDescBase ? detail::wgmma_desc_add(desc_q0, ((ks >> 2) * kV4QRegion + col) >> 4)
                           : detail::wgmma_desc_sw128(sQ + (ks >> 2) * kV4QRegion + 64 * wg * 128 + col, 16, 1024);
        if constexpr (kBlockN == 128)
          detail::wgmma_m64n128k16_ss(s, da, db, ks > 0);
        else
          detail::wgmma_m64n64k16_ss(s, da, db, ks > 0);
      }
    }
    detail::wgmma_commit();
  };
  // O += P·V of tile j: kBlockN / 16 K steps of 16 keys; B = V rows 16kk.. (N = dims contiguous: MN-major,
  // 64-column atoms one region apart (LBO), 8-key groups 1 KB apart (SBO)). One group; the caller waits.
  auto issue_pv = [&](const uint32_t (&p)[kPSteps][4], int j) {
    detail::wgmma_fence();
    const uint32_t stage_units = (j % kStages) * kStageUnits;
#pragma unroll
    for (int kk = 0; kk < kPSteps; ++kk)
      detail::wgmma_m64n128k16_rs<true>(
          o, p[kk],
          Cfg::kDescBase ? detail::wgmma_desc_add(desc_v0, stage_units + ((kk * 16 * 128) >> 4))
                         : detail::wgmma_desc_sw128(sV(j % kStages) + kk * 16 * 128, kKvRegion, 1024),
          true);
    if constexpr (Cfg::kRowSumMma) {
#pragma unroll
      for (int kk = 0; kk < kPSteps; ++kk) detail::wgmma_m64n8k16_rs(l, p[kk], desc_ones, true);
    }
    detail::wgmma_commit();
  };
  // Mask and online softmax of tile j's scores (v3's arithmetic): updates the row max and sum, writes P as the A
  // fragments of the 4 K steps of P·V (step kk covers keys 16kk..16kk+15 = n-blocks 2kk, 2kk+1 of S) and returns
  // the factor O must be rescaled by before P·V of this tile accumulates, and whether it must be at all (v10's lazy
  // rescale: false for the whole warp when no row's max grew past the threshold; always true before v10).
  auto softmax = [&](float (&s)[kSRegs], int j, uint32_t (&p)[kPSteps][4], float (&correction)[2], bool& rescale) {
    const int kv0 = j * kBlockN;
    if (kv0 + kBlockN > q_tok0 || kv0 + kBlockN > seqlen) {
#pragma unroll
      for (int i = 0; i < kSRegs; ++i) {
        const int key = kv0 + 8 * (i >> 2) + 2 * t + (i & 1);
        const int query = q_tok0 + g + 8 * ((i >> 1) & 1);
        if (key > query || key >= seqlen) s[i] = -INFINITY;
      }
    }
    float tile_max[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float m = -INFINITY;
#pragma unroll
      for (int jb = 0; jb < kBlockN / 8; ++jb) m = fmaxf(m, fmaxf(s[4 * jb + 2 * r], s[4 * jb + 2 * r + 1]));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      tile_max[r] = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    }
    rescale = true;
    if constexpr (Cfg::kLazyRescale) {
      // A row whose max is still -inf grows by +inf (unless this tile is masked for it too: NaN, false).
      const bool grow0 = fmaf(tile_max[0], scale_log2, -row_max[0] * scale_log2) > kV4RescaleThreshold;
      const bool grow1 = fmaf(tile_max[1], scale_log2, -row_max[1] * scale_log2) > kV4RescaleThreshold;
      rescale = __any_sync(0xffffffffu, grow0 || grow1);
    }
    if (rescale) {  // warp-uniform
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float new_max = fmaxf(row_max[r], tile_max[r]);
        const float ref = new_max == -INFINITY ? 0.f : new_max * scale_log2;
        correction[r] = ex2_approx(fmaf(row_max[r], scale_log2, -ref));
        row_max[r] = new_max;
      }
    } else {
      correction[0] = correction[1] = 1.f;  // exact: the row sums below stay one rounding per tile
    }
    // The exponentials against the rows' reference max, packed as P's A fragments (and, before v11, the row sums
    // rescaled by `correction`).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float ref = row_max[r] == -INFINITY ? 0.f : row_max[r] * scale_log2;
      float partial = 0.f;
#pragma unroll
      for (int jb = 0; jb < kBlockN / 8; ++jb) {
        const float p0 = ex2_approx(fmaf(s[4 * jb + 2 * r], scale_log2, -ref));
        const float p1 = ex2_approx(fmaf(s[4 * jb + 2 * r + 1], scale_log2, -ref));
        if constexpr (!Cfg::kRowSumMma) partial += p0 + p1;
        // A fragment of step jb / 2: regs 0, 1 = rows g, g+8 at keys 2t, 2t+1; regs 2, 3 = the same at +8.
        p[jb >> 1][(jb & 1) * 2 + r] = pack_bf16x2(p0, p1);
      }
      if constexpr (!Cfg::kRowSumMma) row_sum[r] = row_sum[r] * correction[r] + partial;
    }
  };
  auto rescale_o = [&](const float (&correction)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int jb = 0; jb < 16; ++jb) {
        o[4 * jb + 2 * r] *= correction[r];
        o[4 * jb + 2 * r + 1] *= correction[r];
      }
  };
  // v10: the rescale as predicated multiplies, not a branch around them. O is the accumulator of the P·V wgmma in
  // flight across the loop, and ptxas serializes every wgmma of the kernel (C7513) when a branch may or may not
  // define it; a predicated instruction defines it on every path.
  auto rescale_o_if = [&](bool rescale, const float (&correction)[2]) {
    const uint32_t pred = rescale;
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int jb = 0; jb < 16; ++jb)
        asm("{\n .reg .pred p;\n setp.ne.u32 p, %2, 0;\n @p mul.f32 %0, %0, %3;\n @p mul.f32 %1, %1, %3;\n}"
            : "+f"(o[4 * jb + 2 * r]), "+f"(o[4 * jb + 2 * r + 1])
            : "r"(pred), "f"(correction[r]));
    if constexpr (Cfg::kRowSumMma) {
#pragma unroll
      for (int r = 0; r < 2; ++r)  // l[1], l[3] (the same sums again) are never read
        asm("{\n .reg .pred p;\n setp.ne.u32 p, %1, 0;\n @p mul.f32 %0, %0, %2;\n}"
            : "+f"(l[2 * r])
            : "r"(pred), "f"(correction[r]));
    }
  };

  float s[kSRegs];
  uint32_t p[kPSteps][4];
  float correction[2];
  bool rescale;
  if constexpr (!Cfg::kOverlap) {
    for (int j = 0; j < num_kv_tiles; ++j) {
      cp_async_wait<0>();
      detail::fence_proxy_async_shared();  // the cp.async writes, for the wgmma reads (async proxy)
      __syncthreads();                     // ... of every thread; and every warpgroup is done with tile j-1
      if (j + 1 < num_kv_tiles) load_tile(j + 1);
      cp_async_commit();
      issue_s(s, j);
      detail::wgmma_wait<0>();
      detail::wgmma_fence_operands(s);
      softmax(s, j, p, correction, rescale);
      rescale_o(correction);
      issue_pv(p, j);
      detail::wgmma_wait<0>();
      detail::wgmma_fence_operands(o);
    }
  } else {
    // Prologue: tiles 0 and 1 in flight, S_0 and its softmax (O is zero: no rescale needed).
    if constexpr (Cfg::kTma) {
      if (tid == 0) {
        tma_tile(0);
        if (num_kv_tiles > 1) tma_tile(1);
      }
      cp_async_wait<0>();                  // Q
      detail::fence_proxy_async_shared();  // ... for the wgmma reads
      __syncthreads();
      tma::mbarrier_wait(full_bar, 0);     // tile 0
      __syncwarp();                        // converged again before the warpgroup-wide wgmmas
    } else {
      if (num_kv_tiles > 1) load_tile(1);
      cp_async_commit();
      cp_async_wait<1>();
      detail::fence_proxy_async_shared();
      __syncthreads();
    }
    issue_s(s, 0);
    detail::wgmma_wait<0>();
    detail::wgmma_fence_operands(s);
    softmax(s, 0, p, correction, rescale);
    // No branch between a wgmma's issue and its wait: ptxas serializes the wgmmas when it cannot prove that
    // nothing reads their accumulators in between, so the last tile is peeled off the loop.
    uint32_t p_cur[kPSteps][4];
    // v8: each warpgroup issues num_kv_tiles MMA groups (the loop's and the last P·V), each after a wait on its own
    // barrier and followed by an arrive on the other's. Warpgroup 0 goes first (it arrives on its own barrier
    // once); warpgroup 1 skips its last arrive, so every barrier phase that is opened is also completed.
    if constexpr (Cfg::kPingPong) {
      if (wg == 0) named_barrier_arrive(kV4TurnBarrier, kV4Threads);
    }
    for (int j = 0; j + 1 < num_kv_tiles; ++j) {
      if constexpr (Cfg::kTma) {
        // Tile j+2 goes into the stage of tile j-1, once every thread has arrived on its empty barrier (end of
        // iteration j-1; use (j-1)/3 of that stage). Only warp 0 waits for it, and only at its own pace.
        if (tid == 0 && j + 2 < num_kv_tiles) {
          if (j >= 1) {
            tma::mbarrier_wait<Cfg::kCluster>(empty_bar + (j + 2) % kStages, ((j - 1) / kStages) & 1);
          }
          tma_tile(j + 2);
        }
        tma::mbarrier_wait(full_bar + (j + 1) % kStages, ((j + 1) / kStages) & 1);
        __syncwarp();
      } else {
        // Tile j+1 has landed (every thread's copies), and every warpgroup is done with tile j-1, whose stage
        // (j+2) % 3 the load of tile j+2 now overwrites.
        cp_async_wait<0>();
        detail::fence_proxy_async_shared();
        __syncthreads();
        if (j + 2 < num_kv_tiles) load_tile(j + 2);
        cp_async_commit();
      }
#pragma unroll
      for (int kk = 0; kk < kPSteps; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i) p_cur[kk][i] = p[kk][i];
      if constexpr (Cfg::kPingPong) named_barrier_sync(kV4TurnBarrier + wg, kV4Threads);
      issue_s(s, j + 1);
      issue_pv(p_cur, j);
      if constexpr (Cfg::kPingPong) named_barrier_arrive(kV4TurnBarrier + (wg ^ 1), kV4Threads);
      detail::wgmma_wait<1>();  // S_{j+1} (the older group); P_j·V_j may still run
      detail::wgmma_fence_operands(s);
      softmax(s, j + 1, p, correction, rescale);
      detail::wgmma_wait<0>();
      detail::wgmma_fence_operands(o);
      if constexpr (Cfg::kRowSumMma) detail::wgmma_fence_operands(l);
      // p_cur is read by the P·V wgmma until the wait: keep its registers from being reused before it.
      detail::wgmma_fence_operands(p_cur);
      // Tile j's K and V are read (the waits above are warp-wide: every lane's wgmmas are done).
      if constexpr (Cfg::kCluster) {
        if (lane == 0) {
          tma::mbarrier_arrive(empty_bar + j % kStages);
          tma::mbarrier_arrive_cluster(empty_bar + j % kStages, cluster_rank ^ 1u);
        }
      } else if constexpr (Cfg::kTma) {
        tma::mbarrier_arrive(empty_bar + j % kStages);
      }
      if constexpr (Cfg::kLazyRescale)
        rescale_o_if(rescale, correction);
      else
        rescale_o(correction);
    }
    // The last tile: its copies were waited for at the top of the previous iteration (or in the prologue).
#pragma unroll
    for (int kk = 0; kk < kPSteps; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) p_cur[kk][i] = p[kk][i];
    if constexpr (Cfg::kPingPong) named_barrier_sync(kV4TurnBarrier + wg, kV4Threads);
    issue_pv(p_cur, num_kv_tiles - 1);
    detail::wgmma_wait<0>();
    detail::wgmma_fence_operands(o);
    if constexpr (Cfg::kRowSumMma) detail::wgmma_fence_operands(l);
    detail::wgmma_fence_operands(p_cur);
    // After the wait, not between issue and wait (a branch there would serialize the wgmmas).
    if constexpr (Cfg::kPingPong) {
      if (wg == 0) named_barrier_arrive(kV4TurnBarrier + 1, kV4Threads);
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    if constexpr (Cfg::kRowSumMma) {
      sum = l[2 * r];
    } else {
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    }
    const int query = q_tok0 + g + r * 8;
    if (query >= seqlen) continue;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    uint16_t* out_row = a.out + (seq_begin + query) * a.out_row_stride + static_cast<int64_t>(q_head) * kV4HeadDim;
#pragma unroll
    for (int jb = 0; jb < 16; ++jb)
      *reinterpret_cast<uint32_t*>(out_row + 8 * jb + 2 * t) =
          pack_bf16x2(o[4 * jb + 2 * r] * inv, o[4 * jb + 2 * r + 1] * inv);
  }
  // v12: stay until the peer is done: its last arrivals on this CTA's empty barriers are still on their way.
  if constexpr (Cfg::kCluster) tma::cluster_sync();
#else
  __trap();  // built without sm_90a code: the launcher refuses before getting here
#endif
}

}  // namespace oscar::kern::detail
