#pragma once
// Causal prefill attention over a packed batch of variable-length sequences (cu_seqlens), with GQA.
// Flash-attention-2 structure, K/V streamed in 64-key tiles through shared memory with an online softmax, so memory
// is O(tile) at any length (32K tokens and beyond). The kernels compute the same function:
//   v1: one block per (64-query tile, query head), 4 warps × 16 rows (attention_prefill.cuh).
//   v2: one block per (128 rows = tokens × the query heads of one KV head), 4 warps × 32 rows, K/V tiles shared by
//       the GQA group (attention_prefill_v2.cuh). The default where the wgmma kernels cannot run.
//   v3: v2's tiling without v2's register spills, K and V waited for separately (attention_prefill_v3.cuh);
//       bit-identical output to v2.
//   v4-v7: v2's grid on Hopper warpgroup MMAs (attention_prefill_v4.cuh), head_dim 128, sm_90a.
#include <cstdint>
#include <span>

#include "kernels/common/status.h"

namespace oscar::kern {

// Auto: a wgmma kernel (attention_prefill.cu says which, and why) at head_dim 128 on an sm_90 device in a build
// with sm_90a code, V2 everywhere else. V2Keys32: v2 with 32-key tiles at head_dim > 64 (= V2 below that).
// V3: v2's tiling with P packed early (no spills at 64-key tiles), split K/V waits and schedulable MMAs
// (attention_prefill_v3.cuh); same numerics as v2.
// V4: v2's grid with Hopper warpgroup MMAs (attention_prefill_v4.cuh): head_dim 128 on an sm_90 device in a build
// with sm_90a code (CMAKE_CUDA_ARCHITECTURES 90a); Unsupported otherwise.
// V5: v4 with Q in registers (S = Q·Kᵀ reads only K from shared memory), a 3-stage K/V ring and FA3's
// intra-warpgroup overlap (the next tile's S and this tile's P·V run while the softmax computes); as V4 otherwise.
// V6: v5's overlap on 128-key tiles with Q back in shared memory (per-tile costs paid once per 128 keys).
// V7: v6 with K/V loaded by TMA, issued by thread 0 on mbarriers (needs PrefillAttentionArgs::total_tokens).
// V8: v7 with FA3's inter-warpgroup ping-pong: the two warpgroups take turns issuing their tile's MMAs, so one's
// softmax runs while the other's GEMMs occupy the tensor cores; as V7 otherwise (same arithmetic per warpgroup).
// V10: v7 with lazy rescaling: O and the row sums are rescaled only when a row's max grows by more than 8 in
// log2 units (warp vote): fewer instructions per tile for the power-capped long prefill; as V7 otherwise. (There
// is no V9: a v7 with Q in registers ran 2 % slower and was removed.)
// V11: v10 with the softmax row sums on the tensor cores (P times a block of ones in each P·V group).
// V12: v11 on clusters of two CTAs, half a GQA group each, that share every K/V tile through multicast TMA (half the
// L2 traffic); GQA groups of 2, 4, 8 or 16 only (Unsupported otherwise).
enum class PrefillKernel { Auto, V1, V2, V2Keys32, V3, V4, V5, V6, V7, V8, V10, V11, V12 };

// The kernels built on warpgroup MMAs: head_dim 128, sm_90a builds on sm_90 devices, Unsupported elsewhere.
constexpr bool prefill_kernel_uses_wgmma(PrefillKernel k) {
  return k == PrefillKernel::V4 || k == PrefillKernel::V5 || k == PrefillKernel::V6 || k == PrefillKernel::V7 ||
         k == PrefillKernel::V8 || k == PrefillKernel::V10 ||
         k == PrefillKernel::V11 || k == PrefillKernel::V12;
}

// The kernels that load K/V by TMA: they need PrefillAttentionArgs::total_tokens (their tensor maps span the rows).
constexpr bool prefill_kernel_uses_tma(PrefillKernel k) {
  return k == PrefillKernel::V7 || k == PrefillKernel::V8 || k == PrefillKernel::V10 ||
         k == PrefillKernel::V11 || k == PrefillKernel::V12;
}

constexpr const char* prefill_kernel_name(PrefillKernel k) {
  switch (k) {
    case PrefillKernel::Auto: return "auto";
    case PrefillKernel::V1: return "v1";
    case PrefillKernel::V2: return "v2";
    case PrefillKernel::V2Keys32: return "v2k32";
    case PrefillKernel::V3: return "v3";
    case PrefillKernel::V4: return "v4";
    case PrefillKernel::V5: return "v5";
    case PrefillKernel::V6: return "v6";
    case PrefillKernel::V7: return "v7";
    case PrefillKernel::V8: return "v8";
    case PrefillKernel::V10: return "v10";
    case PrefillKernel::V11: return "v11";
    case PrefillKernel::V12: return "v12";
  }
  return "?";
}

// Device pointers. Token t of the packed batch lives at row t of q/k/v/out; head h of a row starts at h*head_dim.
// Sequence s owns rows [cu_seqlens[s], cu_seqlens[s+1]) and attends causally within itself only.
struct PrefillAttentionArgs {
  const uint16_t* q = nullptr;  // bf16 [T, q_row_stride], heads [num_heads, head_dim]
  const uint16_t* k = nullptr;  // bf16 [T, k_row_stride], heads [num_kv_heads, head_dim]
  const uint16_t* v = nullptr;  // bf16 [T, v_row_stride]
  uint16_t* out = nullptr;      // bf16 [T, out_row_stride], heads [num_heads, head_dim] (o_proj's input layout)
  int64_t q_row_stride = 0, k_row_stride = 0, v_row_stride = 0, out_row_stride = 0;  // in elements
  const int32_t* cu_seqlens = nullptr;  // device, [num_seqs + 1], cu_seqlens[0] == 0, non-decreasing
  int32_t num_seqs = 0;
  int32_t max_seqlen = 0;  // max over sequences (sizes the grid; the host knows it)
  int64_t total_tokens = 0;  // T = cu_seqlens[num_seqs], the rows of q/k/v; 0 = not given (v7's TMA bounds need it)
  int32_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  float scale = 0.f;  // softmax scale, normally 1/sqrt(head_dim)
  PrefillKernel kernel = PrefillKernel::Auto;
};

// can_implement: head_dim % 8 == 0 and <= 128 (dims are zero-padded to 32/64/128 inside), num_heads a multiple
// of num_kv_heads, 16-byte aligned pointers and row strides that are multiples of 8 elements.
Status attention_prefill_can_implement(const PrefillAttentionArgs& args);
// The kernel PrefillKernel::Auto runs for this head_dim on the current device (for reports and tests).
PrefillKernel attention_prefill_auto_kernel(int32_t head_dim);
Status attention_prefill(const PrefillAttentionArgs& args, Stream stream);

// CPU reference: host pointers, fp32 in/out, same layouts and semantics, exact softmax per query in double.
struct PrefillAttentionRefArgs {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  float* out = nullptr;
  int64_t q_row_stride = 0, k_row_stride = 0, v_row_stride = 0, out_row_stride = 0;
  std::span<const int32_t> cu_seqlens;  // host
  int32_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  float scale = 0.f;
};
void attention_prefill_ref(const PrefillAttentionRefArgs& args);

}  // namespace oscar::kern
