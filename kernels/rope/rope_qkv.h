#pragma once
// The step between the fused QKV projection and attention: bias add (Qwen2 / attention_bias), Qwen3's per-head
// q/k RMSNorm, rotary embedding (rotate_half convention, one position per token, inv_freq from
// model::rope_inv_freq so default / linear / llama3 scaling are all just different tables), and the split of the
// fused buffer into the bf16 Q, K, V that attention reads. Fusing these keeps the fp32 projection output to one
// read: every other layout would re-read it once per step.
#include <cstdint>

#include "kernels/common/status.h"

namespace oscar::kern {

struct RopeQkvShape {
  int64_t num_tokens = 0;
  int64_t num_heads = 0;     // query heads
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;      // even, <= 256
  int64_t qkv_row_stride = 0;  // elements between tokens in qkv; >= (num_heads + 2 * num_kv_heads) * head_dim
};

// Device pointers. qkv [T, row_stride]: query heads, then key heads, then value heads, each head_dim wide, in
// fp32 (qkv) or bf16 bits (qkv_bf16: what transformers' bf16 projections hand to the norm and RoPE when they have
// no bias; with one, this adds the fp32 bias to the bf16 product, where transformers rounds after it): exactly one.
struct RopeQkvArgs {
  const float* qkv = nullptr;
  const uint16_t* qkv_bf16 = nullptr;
  const float* bias = nullptr;              // [(Hq + 2 Hkv) * d] or nullptr
  const uint16_t* q_norm_weight = nullptr;  // [d] bf16, or nullptr for no q/k norm
  const uint16_t* k_norm_weight = nullptr;  // [d] bf16, set together with q_norm_weight
  float norm_eps = 1e-6f;
  const int32_t* positions = nullptr;  // [T] absolute position of each token
  const float* inv_freq = nullptr;     // [d / 2]
  uint16_t* q_out = nullptr;           // [T, Hq, d] bf16
  uint16_t* k_out = nullptr;           // [T, Hkv, d] bf16, post-RoPE
  uint16_t* v_out = nullptr;           // [T, Hkv, d] bf16
  // Optional fp32 copies for observers (calibration statistics want the unrounded values); nullptr skips each.
  float* q_f32 = nullptr;           // [T, Hq, d] post-norm, post-RoPE
  float* k_pre_rope_f32 = nullptr;  // [T, Hkv, d] post-norm, pre-RoPE
  float* k_f32 = nullptr;           // [T, Hkv, d] post-RoPE
  float* v_f32 = nullptr;           // [T, Hkv, d]
};

// can_implement: head_dim even and <= 256, qkv_row_stride covering every head slot, the required pointers set (one
// input), q/k norm weights given together. Any such shape runs; the 16-byte vector kernel is taken when d/2 is a
// multiple of 8 with a power-of-two lane group (d = 16, 32, 64, 128, 256), the row stride 16 bytes' worth of
// elements (4 fp32, 8 bf16) and every pointer 16-byte aligned, the one-warp-per-head scalar kernel otherwise.
Status rope_qkv_can_implement(const RopeQkvShape& shape, const RopeQkvArgs& args);
Status rope_qkv(const RopeQkvShape& shape, const RopeQkvArgs& args, Stream stream);

// CPU reference with host pointers and fp32 everywhere: the same math, outputs [T, H, d] fp32 (no bf16 rounding).
struct RopeQkvRefArgs {
  const float* qkv = nullptr;
  const float* bias = nullptr;
  const float* q_norm_weight = nullptr;
  const float* k_norm_weight = nullptr;
  float norm_eps = 1e-6f;
  const int32_t* positions = nullptr;
  const float* inv_freq = nullptr;
  float* q_out = nullptr;
  float* k_pre_rope_out = nullptr;  // may be nullptr
  float* k_out = nullptr;
  float* v_out = nullptr;
};
void rope_qkv_ref(const RopeQkvShape& shape, const RopeQkvRefArgs& args);

}  // namespace oscar::kern
