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
#include <string_view>

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
// L2 traffic); GQA groups of 2, 4, 8 or 16 only (Unsupported otherwise). Measured 15 % slower than v11 (a measured
// variant, like v8; docs/results.md "Descriptors made once (v13) as Auto, …").
// V13: v11 with its wgmma descriptors made once before the loop and offset per K step (fewer uniform instructions).
// (v14 = v12 + v13, v15 = v13 deciding the lazy rescale on P's packed maximum and v16 = v12 + v13 + v15 were
// measured on 2026-12-07 — v14 and v16 as slow as v12, v15 no faster than v11 — and removed.)
enum class PrefillKernel { Auto, V1, V2, V2Keys32, V3, V4, V5, V6, V7, V8, V10, V11, V12, V13 };

// Every kernel once (Auto not included), with its name (the --attn-kernel / --kernels spelling) and what it needs.
// Tests and benchmarks iterate over this table, so a new variant is one enumerator and one row.
struct PrefillKernelInfo {
  PrefillKernel kernel;
  const char* name;
  bool wgmma;    // warpgroup MMAs: head_dim 128, sm_90a builds on sm_90 devices, Unsupported elsewhere
  bool tma;      // K/V by TMA: needs PrefillAttentionArgs::total_tokens (the tensor maps span the rows)
  bool cluster;  // 2-CTA clusters splitting a GQA group: groups 2, 4, 8, 16 only
};
inline constexpr PrefillKernelInfo kPrefillKernels[] = {
    {PrefillKernel::V1, "v1", false, false, false},        {PrefillKernel::V2, "v2", false, false, false},
    {PrefillKernel::V2Keys32, "v2k32", false, false, false}, {PrefillKernel::V3, "v3", false, false, false},
    {PrefillKernel::V4, "v4", true, false, false},         {PrefillKernel::V5, "v5", true, false, false},
    {PrefillKernel::V6, "v6", true, false, false},         {PrefillKernel::V7, "v7", true, true, false},
    {PrefillKernel::V8, "v8", true, true, false},          {PrefillKernel::V10, "v10", true, true, false},
    {PrefillKernel::V11, "v11", true, true, false},        {PrefillKernel::V12, "v12", true, true, true},
    {PrefillKernel::V13, "v13", true, true, false},
};

// k's row of the table; null for Auto (and for a value outside the enum).
constexpr const PrefillKernelInfo* prefill_kernel_info(PrefillKernel k) {
  for (const PrefillKernelInfo& info : kPrefillKernels)
    if (info.kernel == k) return &info;
  return nullptr;
}

constexpr bool prefill_kernel_uses_wgmma(PrefillKernel k) {
  const PrefillKernelInfo* info = prefill_kernel_info(k);
  return info && info->wgmma;
}

constexpr bool prefill_kernel_uses_tma(PrefillKernel k) {
  const PrefillKernelInfo* info = prefill_kernel_info(k);
  return info && info->tma;
}

constexpr bool prefill_kernel_uses_clusters(PrefillKernel k) {
  const PrefillKernelInfo* info = prefill_kernel_info(k);
  return info && info->cluster;
}

constexpr const char* prefill_kernel_name(PrefillKernel k) {
  if (k == PrefillKernel::Auto) return "auto";
  const PrefillKernelInfo* info = prefill_kernel_info(k);
  return info ? info->name : "?";
}

// The kernel named `name` ("auto" or a kPrefillKernels name); false when there is none.
constexpr bool prefill_kernel_from_name(std::string_view name, PrefillKernel* kernel) {
  if (name == "auto") {
    *kernel = PrefillKernel::Auto;
    return true;
  }
  for (const PrefillKernelInfo& info : kPrefillKernels)
    if (name == info.name) {
      *kernel = info.kernel;
      return true;
    }
  return false;
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
