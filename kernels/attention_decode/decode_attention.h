#pragma once
// Fused decode attention over the paged OSCAR KV cache (formats/kv_layout.h): one query token per sequence,
// GQA, INT2 pages for the quantized middle of each sequence and bf16 pages for the sink / recent windows, all
// stored in the rotated basis. The query is rotated once by R_k (q·k = (qR)·(kR) for orthogonal R), the output
// is accumulated in the rotated V basis and rotated back once by R_vᵀ. Split-K over the sequence: partial
// (max, sum, acc) per split, merged by the last-arriving split block (DecodeAttentionVariant::Fused) or a last
// kernel. The INT2 tokens run on tensor cores (decode_attention.cuh explains the fragment layout); the bf16 window
// tokens inside the INT2 split blocks (Fused) or on a separate small kernel.
//
// The bf16 baseline is the same kernel with every token in the bf16 window (sink_tokens >= every length). The FP8
// baseline (quant_storage = Fp8E4M3) reads fmt::Fp8PageGeometry pages from the quantized pools instead of INT2 ones,
// on its own CUDA-core split kernel (decode_attention_fp8.cuh) inside the Separate variant.
#include <cstddef>
#include <cstdint>

#include "formats/kv_layout.h"
#include "kernels/common/status.h"

namespace oscar::kern {

// How the INT2 launch is organized (the segmented kernel and the all-bf16 baseline always use Separate).
//  * Fused: q rotation, then ONE INT2 kernel chained to it with programmatic dependent launch: each split block
//    also takes an even share of the bf16 sink/recent tokens (staged into its shared ring after its INT2 tiles),
//    and the last block of each (sequence, KV head) to finish, found with an atomic ticket, merges all splits in
//    split order and applies R_vᵀ. Two dependent kernels instead of four.
//    At groups of up to 4 query heads it computes the scores transposed (tokens as MMA rows, half the score
//    MMAs; decode_attention.cuh, kNarrow).
//  * Separate: the four kernels (rotate_q, window, INT2, merge), kept for the segmented layers and for comparison.
//  * FusedWide: Fused with the heads-as-rows score layout at every group size (what groups 5-8 use), to compare
//    the two layouts at groups <= 4; same results up to fp32 rounding.
enum class DecodeAttentionVariant : int32_t { Fused = 0, Separate = 1, FusedWide = 2 };

struct DecodeAttentionParams {
  int32_t batch = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;  // query head hq reads KV head hq / (num_q_heads / num_kv_heads), as HF repeat_kv
  int32_t head_dim = 128;
  int32_t page_tokens = 64;
  const uint16_t* q = nullptr;          // [batch, num_q_heads, head_dim] bf16 bits, original basis (after RoPE)
  const float* rotation_k = nullptr;    // [head_dim, head_dim] row-major fp32, null = identity
  const float* rotation_v = nullptr;    // same for V: o = o_rot · R_vᵀ
  // Per-KV-head matrices (bundle format 2.0 storage transforms): KV head h reads rotation_k + h * stride and
  // rotation_v + h * stride (0 = one matrix for every head, head_dim² = one per KV head). For a transform A the
  // caller passes A⁻ᵀ for both: q' = q·A_K⁻ᵀ, and o = o'·A_V⁻¹ = o'·(A_V⁻ᵀ)ᵀ.
  int64_t rotation_k_head_stride = 0;
  int64_t rotation_v_head_stride = 0;
  float softmax_scale = 0.0f;           // usually 1/sqrt(head_dim)
  const int32_t* seq_lens = nullptr;    // [batch] tokens in the cache (including this step's)
  int32_t max_seq_len = 0;              // host-side bound on seq_lens: sizes the split-K partition
  int64_t sink_tokens = 0;              // tokens t < sink_tokens are read from bf16 pages
  int64_t recent_tokens = 0;            // tokens t >= len - recent_tokens too; the rest from INT2 pages
  const uint8_t* k_int2_pool = nullptr;  // Int2PageGeometry pages, page p of KV head h at page_block_offset
  const uint8_t* v_int2_pool = nullptr;
  // What the quantized pools hold: Int (INT2 pages, or the geometries' below) or Fp8E4M3 (Fp8PageGeometry pages,
  // no geometries; always runs the Separate variant). BF16 is not a pool format: use sink_tokens >= every length.
  fmt::KvStorage quant_storage = fmt::KvStorage::Int;
  // Segmented (spectral) layers: the pools above hold these geometries' pages instead of INT2 ones (host memory,
  // read at launch). Both or neither; a tensor stored as plain INT2 passes its one-segment geometry.
  const fmt::SegmentedPageGeometry* k_geometry = nullptr;
  const fmt::SegmentedPageGeometry* v_geometry = nullptr;
  const uint16_t* k_bf16_pool = nullptr;  // Bf16PageGeometry pages
  const uint16_t* v_bf16_pool = nullptr;
  const int32_t* int2_page_table = nullptr;  // [batch, max_pages]: page id of logical page t / page_tokens
  const int32_t* bf16_page_table = nullptr;  // [batch, max_pages]; entries never read may hold anything
  int32_t max_pages = 0;                     // row stride of the page tables
  float* out = nullptr;                      // [batch, num_q_heads, head_dim] fp32, or
  uint16_t* out_bf16 = nullptr;              // bf16 bits (exactly one of out / out_bf16)
  int32_t num_splits = 0;                    // 0 = decode_attention_num_splits()
  void* workspace = nullptr;                 // decode_attention_workspace_bytes() bytes of device memory
  size_t workspace_bytes = 0;
  DecodeAttentionVariant variant = DecodeAttentionVariant::Fused;
  // Profiling (decode_attention_bench --trace), null otherwise: per block of the fused INT2 kernel,
  // kDecodePhaseTraceWords words: globaltimer at entry and exit, clock64 offsets from entry to the end of the
  // query setup, of warp 0's tiles, of the block's tiles, of the window share, of the ticket and of the merge (0
  // in blocks that do not merge), the SM id and whether the block merged. Block index x + splits·(h + kv_heads·b).
  unsigned long long* phase_trace = nullptr;
};
inline constexpr int kDecodePhaseTraceWords = 10;

// Splits chosen so that batch * num_kv_heads * splits blocks fill the INT2 kernel's resident-block slots (four
// per SM) once, without a partial second wave (batch 1 at 128K fills the GPU), and no split is shorter than two
// pages; except at batch * num_kv_heads <= 8 where that fill would cut splits under 1024 tokens: there splits
// of ~2K tokens, at least 64 blocks (the per-split costs lead when the work per SM is small). No split is longer
// than 16K tokens (past one wave, several waves balance the SMs' uneven pace), and none longer than 8K for groups
// of at most 4 query heads per KV head (the narrow layout, whose blocks are quicker to start and merge).
int32_t decode_attention_num_splits(int32_t batch, int32_t num_q_heads, int32_t num_kv_heads, int32_t max_seq_len,
                                    int32_t page_tokens, int32_t sm_count);
// Dynamic shared memory to launch `blocks` fused INT2 blocks with (kernel_smem, what the kernel's ring needs, or
// more): when the grid leaves resident slots free, enough that at most ceil(blocks / sms) blocks fit one SM, so the
// block scheduler spreads them instead of stacking some SMs while others stay empty. static_smem is the kernel's
// static shared memory, most_dynamic the most dynamic bytes a block may take (the opt-in limit less static_smem),
// smem_per_sm and reserved_per_block the device's (cudaDevAttrMaxSharedMemoryPerMultiprocessor,
// cudaDevAttrReservedSharedMemoryPerBlock). Returns kernel_smem when the grid fills the slots anyway.
size_t decode_attention_spread_smem_bytes(size_t kernel_smem, int64_t blocks, int sms, size_t static_smem,
                                          int most_dynamic, int smem_per_sm, int reserved_per_block);

// Workspace for `splits` splits: the rotated query, partial max, sum and head_dim accumulators per split and
// query head for the INT2 pass and the bf16-window pass each, and one arrival ticket per (sequence, KV head) for
// the fused variant (zeroed by the q-rotation kernel of every call, so the workspace needs no clearing).
size_t decode_attention_workspace_bytes(int32_t batch, int32_t num_q_heads, int32_t head_dim, int32_t splits);

// head_dim in {64, 128, 256}, group size 1..8, num_q_heads % num_kv_heads == 0, 16-byte aligned pools and R_v,
// page_tokens a positive multiple of 16, the pools and tables that the windows need present. Geometries: both
// given, of head_dim and page_tokens, segments on 16-dim boundaries with widths 0 to 4 (8 is not implemented by
// the segmented kernel). Fp8E4M3: no geometries.
Status decode_attention_can_implement(const DecodeAttentionParams& p);

// Device pointers. `p.num_splits` 0 picks splits from the current device's SM count.
Status decode_attention(const DecodeAttentionParams& p, Stream stream);

}  // namespace oscar::kern
